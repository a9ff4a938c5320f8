"""The host agent: sensors → policy → actuators, one controller per VM, run by the host's brain.

Sensors: the guest agent's MXBean over JMX (jvmkit.balloon.jmx), QEMU's virtio-balloon over QMP
(query-balloon, guest-stats), and the host's /proc/meminfo and /proc/pressure/memory. A decision
comes from the host-wide brain (jvmkit.fleet.brain: `jvmkit.fleet.fleet_policy` over every VM,
itself built on the per-VM `policy.decide()`), or from `policy.decide()` alone for a controller
without one. Actuators: shrink = guest agent shrinkTo (hooks + GC steering) and then inflate the
balloon; grow = deflate first, then growTo. A lost JMX or QMP connection means deflate to the
ceiling and back off. Every decision is logged (and written as a JSON line with --balloon-log);
the latest one is kept in the run directory for `balloon status`. Requests from `jvmkit balloon
set` arrive as `balloon-request.json` in the run directory.

The controllers run in the brain's process (one JVM for every JMX connection on the host);
`run_with_balloon` is what `jvmkit run --balloon` runs: the VM plus its lease on the brain
(jvmkit.fleet.lease), which deflates the balloon if the brain goes away.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from jvmkit import ui
from jvmkit.balloon import policy
from jvmkit.balloon.policy import MIB
from jvmkit.errors import JvmkitError
from jvmkit.vm.qmp import QmpClient, QmpError

STATUS_FILE = "balloon.json"
REQUEST_FILE = "balloon-request.json"
RESULT_FILE = "balloon-result.json"
BALLOON_QOM = "/machine/peripheral/balloon0"
HEAP_MOVED = 8 * 2**20  # a heap used or committed size that moved more than this is a new reading
SHRINK_RETRY_S = 15.0  # a shrink that stopped at its floor is tried again after this long (see _shrink_floor)


# ---- sensors ----------------------------------------------------------------------------------

def process_rss(pid: int | None) -> int | None:
    """Resident memory of a host process (QEMU) in bytes, or None."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_host_memory(meminfo: str | None = None, pressure: str | None = None) -> dict:
    """MemTotal/MemAvailable (bytes) and memory PSI some avg10 from /proc (or given texts)."""
    result: dict = {"total": None, "available": None, "psi_some_avg10": None}
    try:
        meminfo = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
        for line in meminfo.splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                result["total" if key == "MemTotal" else "available"] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        pressure = pressure if pressure is not None else Path("/proc/pressure/memory").read_text()
        for line in pressure.splitlines():
            if line.startswith("some"):
                fields = dict(part.split("=") for part in line.split()[1:])
                result["psi_some_avg10"] = float(fields["avg10"])
    except (OSError, ValueError, KeyError):
        pass
    return result


class DeviceLost(OSError):
    """The balloon device cannot be reached (its VM or domain is gone, the libvirt connection is
    lost): the controller deflates and backs off, as for a lost QMP socket."""


class BalloonDevice:
    """What the controller steers: a VM's virtio-balloon, read and set in bytes.

    `read()` returns {"actual", "updated", "total", "available", "free"} (the guest's own stats, None
    where not reported; "updated" is the stats' last-update time, 0 if never); `set(bytes)` moves
    the balloon. A device that cannot be reached raises OSError (DeviceLost) or QmpError.
    Implementations: QmpBalloon (jvmkit's own QEMU), engines.libvirt.LibvirtBalloon (a libvirt
    domain, through libvirt's API)."""

    changed_at = 0.0
    settle_s = 3.0  # the guest needs a moment to move pages, and stats are polled every 2 s

    def read(self) -> dict:
        raise NotImplementedError

    def set(self, target_bytes: int) -> None:
        raise NotImplementedError

    def fresh(self, guest: dict) -> bool:
        """Guest stats taken after the last balloon change had time to settle."""
        return guest.get("total") is None or guest.get("updated", 0) >= self.changed_at + self.settle_s


def with_jvm_memory(guest: dict, reading: tuple[int, int] | None, now: float | None = None) -> dict:
    """The balloon's reading, with the guest's total and available memory taken from its JVM
    where the balloon reports none (pure but for the clock): OSv's virtio-balloon has no stats
    queue, and its JVM's OperatingSystem MXBean reads OSv's own counters (sysinfo: all memory,
    and what is free of it). Free is what is available there: OSv keeps no page cache that it
    gives back on demand. The reading is taken now, so it is as fresh as the balloon it sits beside.
    Without it the policy assumes Settings.no_stats_non_heap_mib besides the heap, a guess."""
    if reading is None or guest.get("total") is not None:
        return guest
    total, free = reading
    return {**guest, "total": total, "available": free, "free": free,
            "updated": time.time() if now is None else now, "source": "jvm"}


class VmHandle(Protocol):
    """A started VM as the balloon sees it (runner.RunningVm, engines.libvirt.LibvirtVm)."""

    name: str
    run: Any                 # its vm.rundir.RunDir
    memory_mib: int
    jmx: dict | None

    @property
    def qemu_pid(self) -> int | None: ...

    def balloon_device(self) -> BalloonDevice: ...


class QmpBalloon(BalloonDevice):
    """virtio-balloon over QMP; connects per use so other jvmkit commands can use the socket too."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self._polling = False

    def _client(self) -> QmpClient:
        return QmpClient.connect(self.socket_path, timeout=3.0)

    def read(self) -> dict:
        with self._client() as qmp:
            if not self._polling:
                try:
                    qmp.execute("qom-set", path=BALLOON_QOM, property="guest-stats-polling-interval", value=2)
                except QmpError:
                    pass
                self._polling = True
            actual = qmp.execute("query-balloon")["actual"]
            stats, updated = {}, 0
            try:
                reply = qmp.execute("qom-get", path=BALLOON_QOM, property="guest-stats")
                stats, updated = reply.get("stats", {}), int(reply.get("last-update", 0))
            except QmpError:
                pass
        def stat(name):
            # -1 (or 2**64-1) means "not reported"; a guest without a stats queue (OSv) never
            # updates them at all (last-update stays 0).
            value = stats.get(name)
            if not updated or value is None or value < 0 or value >= 2**63:
                return None
            return int(value)
        return {"actual": int(actual), "updated": updated, "total": stat("stat-total-memory"),
                "available": stat("stat-available-memory"), "free": stat("stat-free-memory")}

    def set(self, target_bytes: int) -> None:
        with self._client() as qmp:
            qmp.execute("balloon", value=int(target_bytes))
        self.changed_at = time.time()


def device_for(qmp_socket: Path, state: dict) -> BalloonDevice:
    """A running VM's balloon from its run directory's state.json (`balloon status`): QMP for
    jvmkit's QEMU, libvirt for `--engine libvirt` (which has no QMP socket of its own)."""
    if state.get("engine") == "libvirt":
        from jvmkit.engines import libvirt

        return libvirt.attach(state)
    return QmpBalloon(qmp_socket)


# ---- the controller -------------------------------------------------------------------------------

@dataclass
class Controller:
    name: str
    run_dir: Path
    qmp_socket: Path
    jmx: dict
    settings: policy.Settings
    interval: float = 2.0
    log_path: Path | None = None
    qemu_pid: int | None = None
    exit_marker: str | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    decisions: list = field(default_factory=list)
    device: BalloonDevice | None = None   # None: QMP on qmp_socket
    # The brain (jvmkit.fleet.brain) decides for the whole host: decide(controller, inputs, settings,
    # request) -> (Decision, record extras); None decides for this VM alone (policy.decide).
    decide: Callable | None = None
    may_inflate: Callable[[], bool] | None = None  # False: the brain's lease lapsed, take nothing
    after_step: Callable[[str], None] | None = None
    wake: threading.Event = field(default_factory=threading.Event)  # step now, not after the interval
    keep_decisions: int = 200

    def __post_init__(self):
        self.balloon = self.device if self.device is not None else QmpBalloon(self.qmp_socket)
        self.client = None
        self.failures = 0
        self.last_gc_ms: float | None = None
        self.last_time = time.monotonic()
        self.connected_once = False
        self.last_heap_used: int | None = None
        self.manual_mib: int | None = None  # from `jvmkit balloon set`: a ceiling (the floor still applies)
        self.pending_request: int | None = None  # a request waiting for fresh guest stats
        self.last_floor: policy.Floor | None = None
        self.non_heap_seen: int | None = None
        self.committed_at: tuple[int, float] | None = None  # (heap committed, wall time first seen):
        # guest stats older than that were taken while the heap moved
        # (floor MiB, heap used, committed) after a shrink that stopped at its floor
        self.shrink_stop: tuple[int, int, int, float] | None = None  # (..., when to try again)
        self.shrink_stop_expired = False  # the stop ran out with the heap unchanged: back off further
        self.shrink_backoff = 0
        self._log = open(self.log_path, "a", buffering=1) if self.log_path else None

    # -- logging --
    def log(self, event: str, **data) -> None:
        record = {"time": round(time.time(), 3), "vm": self.name, "event": event, **data}
        rss = process_rss(self.qemu_pid)
        if rss is not None:
            record["qemu_rss_mib"] = round(rss / MIB, 1)
        self.decisions.append(record)
        del self.decisions[:-self.keep_decisions]
        if self._log:
            self._log.write(json.dumps(record, sort_keys=True) + "\n")
        if event in ("decision", "lost-contact", "connected", "request") and data.get("action", "x") != "hold":
            ui.current().info(f"jvmkit-balloon: {self.name}: {data.get('reason', event)}")
        status = {"vm": self.name, "updated": record["time"], "last": record, "settings": self.settings.__dict__}
        tmp = self.run_dir / (STATUS_FILE + ".tmp")
        try:
            tmp.write_text(json.dumps(status, sort_keys=True))
            tmp.replace(self.run_dir / STATUS_FILE)
        except OSError:
            pass

    # -- connections --
    def _connect_jmx(self) -> bool:
        from jvmkit.balloon.jmx import JmxClient

        try:
            self.client = JmxClient.connect(self.jmx["host"], self.jmx["port"], self.jmx["user"],
                                            self.jmx["password"], timeout=5.0)
        except JvmkitError:
            self.client = None
            return False
        self.connected_once = True
        self.log("connected", reason=f"connected to the guest agent on {self.jmx['host']}:{self.jmx['port']}")
        return True

    def _close_jmx(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None

    # -- one step --
    def step(self) -> None:
        if self.client is None and not self._connect_jmx():
            if self.connected_once:
                self._lost("the guest agent (JMX)")
            else:  # not up yet: the balloon stays deflated, which never starves the guest
                self.log("waiting", reason="waiting for the guest agent's JMX connector")
            return
        try:
            stats = self.client.balloon_stats()
        except JvmkitError as exc:
            self._close_jmx()
            self._lost(f"the guest agent ({exc})")
            return
        try:
            guest = self.balloon.read()
        except (QmpError, OSError, KeyError, TypeError) as exc:
            self._lost(f"the balloon device ({exc})")
            return
        if guest.get("total") is None:
            try:
                guest = with_jvm_memory(guest, self.client.guest_memory())
            except JvmkitError as exc:
                self._close_jmx()
                self._lost(f"the guest agent ({exc})")
                return
        now = time.monotonic()
        gc_ms = float(stats.gc_time_millis)
        delta = 0.0 if self.last_gc_ms is None else max(0.0, gc_ms - self.last_gc_ms)
        interval, self.last_gc_ms, self.last_time = now - self.last_time, gc_ms, now
        host = read_host_memory()
        if self.committed_at is None or abs(stats.heap_committed - self.committed_at[0]) > HEAP_MOVED:
            self.committed_at = (stats.heap_committed, time.time())
        inputs = policy.Inputs(
            heap_used=stats.heap_used, heap_committed=stats.heap_committed,
            heap_max=stats.heap_max, gc_time_delta_ms=delta, interval_s=max(interval, 0.001),
            balloon_actual_mib=guest["actual"] // MIB, guest_total=guest["total"], guest_available=guest["available"],
            host_total=host["total"], host_available=host["available"], host_psi_some_avg10=host["psi_some_avg10"],
            stats_fresh=self.balloon.fresh(guest), heap_used_prev=self.last_heap_used,
            non_heap_seen=self.non_heap_seen, shrink_floor_mib=self._shrink_floor(stats),
            heap_settled=guest.get("updated", 0) >= self.committed_at[1] + self.balloon.settle_s,
            recheck_live=self.shrink_stop_expired)
        if inputs.stats_fresh and inputs.heap_settled and inputs.guest_total is not None:
            # Only consistent readings are kept (policy.non_heap_bytes says why).
            self.non_heap_seen = max(self.non_heap_seen or 0, policy.non_heap_reading(inputs, self.settings) or 0)
        self.last_heap_used = stats.heap_used
        request = self._take_request()
        settings = self.settings
        if self.manual_mib is not None:
            settings = policy.with_manual_ceiling(settings, self.manual_mib)
        extra: dict = {}
        if self.decide is not None:
            decision, extra = self.decide(self, inputs, settings, request is not None)
        else:
            decision = policy.decide(inputs, settings, request=request is not None)
        achieved = self.apply(decision, inputs, settings, request=request is not None)
        self.failures = 0
        record = {**decision.to_dict(), **extra}
        if achieved.get("balloon_target_mib", decision.balloon_target_mib) > decision.balloon_target_mib \
                and self.last_floor is not None:  # the floor raised the target: say so, with its numbers
            record["reason"] += f"; {self.last_floor.describe()}"
        self.log("decision", **record, achieved=achieved, request_mib=request,
                 set_ceiling_mib=settings.ceiling if settings.set_ceiling else None)
        if self.after_step is not None:
            self.after_step(self.name)
        if request is not None:
            if decision.stale_stats:  # answer once the guest's stats show the last change
                self.pending_request = request
            else:
                self._write_result(request, decision, achieved)

    def apply(self, d: policy.Decision, before: policy.Inputs, settings: policy.Settings,
              request: bool = False) -> dict:
        achieved: dict = {}
        if d.action == "shrink":
            achieved["heap_committed"] = int(self.client.shrink_to(d.heap_target))
            after_stats = self.client.balloon_stats()
            # The collections the shrink ran are ours, not the app's: don't count them as GC overhead.
            self.last_gc_ms = float(after_stats.gc_time_millis)
            after = policy.after_shrink(before, after_stats.heap_used, after_stats.heap_committed)
            target = policy.final_balloon_target(d, after, settings)
            self.last_floor = policy.floor_for(after, settings)
            # stopped at the floor, or a re-check that found no garbage: hold (retried later)
            found_nothing = before.recheck_live and abs(after_stats.heap_used - before.heap_used) <= HEAP_MOVED
            stopped = (target > d.balloon_target_mib or found_nothing) and not request
            if stopped:  # retried after SHRINK_RETRY_S, doubling while it keeps stopping there (at most 8x)
                self.shrink_backoff = min(self.shrink_backoff + 1, 4) if self.shrink_stop_expired else 0
                retry_at = time.monotonic() + SHRINK_RETRY_S * 2 ** max(0, self.shrink_backoff - 1)
                self.shrink_stop = (target, after_stats.heap_used, after_stats.heap_committed, retry_at)
            else:
                self.shrink_stop, self.shrink_backoff = None, 0
            self.shrink_stop_expired = False
            achieved.update(heap_used_after=after_stats.heap_used, balloon_target_mib=target,
                            floor=self.last_floor.to_dict())
            if target > before.balloon_actual_mib or (target < before.balloon_actual_mib and self._may_inflate()):
                self.balloon.set(target * MIB)  # above it too: a guest under its floor gets memory back
            elif target < before.balloon_actual_mib:
                achieved["inflate_skipped"] = "the balloon brain's lease lapsed"
            return achieved
        target = d.balloon_target_mib
        self.last_floor = policy.floor_for(before, settings)
        if request and not d.stale_stats:
            # A `balloon set` never leaves the guest below its floor, even when it holds.
            target = policy.final_balloon_target(d, before, settings)
            achieved["floor"] = self.last_floor.to_dict()
        if d.action == "grow" or target > before.balloon_actual_mib:
            self.balloon.set(target * MIB)
        if d.action == "grow":
            achieved["heap_committed"] = int(self.client.grow_to(d.heap_target))
        achieved["balloon_target_mib"] = target
        return achieved

    def _shrink_floor(self, stats) -> int | None:
        """The floor the last shrink stopped at, while the heap is within 8 MiB of what it was and
        for at most SHRINK_RETRY_S: an idle app's dropped objects stay counted as used until a GC
        runs, and only a shrink runs one (measured: the phases app dropped 300 MiB right after a
        shrink had stopped at its floor, and the balloon held at 752M through the whole idle phase;
        CI's balloon tests failed on it)."""
        if self.shrink_stop is None:
            return None
        floor, used, committed, retry_at = self.shrink_stop
        if abs(stats.heap_used - used) > HEAP_MOVED or abs(stats.heap_committed - committed) > HEAP_MOVED:
            self.shrink_stop, self.shrink_backoff = None, 0
            return None
        if time.monotonic() >= retry_at:
            self.shrink_stop, self.shrink_stop_expired = None, True
            return None
        return floor

    def _may_inflate(self) -> bool:
        return self.may_inflate is None or self.may_inflate()

    def _guest_exited(self) -> bool:
        """The app ended (the guest wrote its exit line): a closed JMX port is expected then."""
        if not self.exit_marker:
            return False
        try:
            return self.exit_marker in (self.run_dir / "console.log").read_text(errors="replace")
        except OSError:
            return False

    def _lost(self, what: str) -> None:
        if self._guest_exited():
            self.log("guest-exited", reason="the app ended; the balloon stops")
            self.stop_event.set()
            return
        self.failures += 1
        decision, backoff = policy.on_lost_contact(self.settings, self.failures, what)
        try:
            self.balloon.set(decision.balloon_target_mib * MIB)
        except (QmpError, OSError):
            pass
        self.log("lost-contact", **decision.to_dict())
        self.stop_event.wait(backoff)

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    # -- balloon set --
    def _take_request(self) -> int | None:
        """A new `balloon set` request (it replaces one still waiting), or the one waiting."""
        path = self.run_dir / REQUEST_FILE
        try:
            data = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            request, self.pending_request = self.pending_request, None
            return request
        requested = int(data["target_mib"])
        self.pending_request = None
        # A request for all of --memory lifts the ceiling.
        self.manual_mib = requested if requested < self.settings.memory_mib else None
        return requested

    def _write_result(self, requested: int, d: policy.Decision, achieved: dict) -> None:
        target = achieved.get("balloon_target_mib", d.balloon_target_mib)
        result = {**achieved, **policy.set_outcome(requested, target, self.last_floor, d)}
        tmp = self.run_dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(self.run_dir / RESULT_FILE)

    def run(self) -> None:
        self.log("start", reason=f"balloon for {self.name}: floor {self.settings.min_memory_mib} MiB, "
                                 f"ceiling {self.settings.memory_mib} MiB, every {self.interval:g}s")
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception as exc:  # never let the controller die silently: deflate and go on
                self._close_jmx()
                self._lost(f"an error ({type(exc).__name__}: {exc})")
            self.wake.wait(self.interval)
            self.wake.clear()
        self._close_jmx()
        if self._log:
            self._log.close()


JMX_SECRET = "jmx-password"


def run_with_balloon(image: Path, options, *, min_memory_mib: int | None, interval: float,
                     log_path: Path | None, weight: int = 1) -> int:
    """`jvmkit run --balloon`: the runner plus the VM's lease on the host's balloon brain.

    The brain (jvmkit.fleet.brain, one per host) reads this VM's heap over JMX and its balloon
    over QMP and decides for every VM together; this process stays the VM's supervisor and
    deflates its balloon if the brain goes away (jvmkit.fleet.lease)."""
    from jvmkit.fleet import state as fleet_state
    from jvmkit.fleet.lease import LeaseWatch
    from jvmkit.packager import bundle as bundles
    from jvmkit.packager import targets
    from jvmkit.vm import runner

    manifest = bundles.load(image, verify=False).manifest
    target = targets.get(manifest.target, "image target")
    warning = target.balloon_warning(manifest)
    if warning:
        ui.current().warn(warning)
    state: dict = {}

    def started(vm: VmHandle) -> None:
        floor = min_memory_mib or policy.default_floor_mib(vm.memory_mib)
        if floor > vm.memory_mib:
            ui.current().warn(f"--min-memory {floor}M is above --memory {vm.memory_mib}M; using {vm.memory_mib}M")
            floor = vm.memory_mib
        vm.run.write_secret(JMX_SECRET, vm.jmx["password"].encode())
        st = vm.run.read_state()
        st["balloon"] = {"floor_mib": floor, "ceiling_mib": vm.memory_mib, "interval": interval, "weight": weight,
                         "log": str(log_path.resolve()) if log_path else None, "brain": 1,
                         "exit_marker": manifest.boot.exit_marker, "deflate_on_oom": target.balloon_deflates_on_oom,
                         "start_floor_mib": fleet_state.start_floor_mib(manifest, vm.memory_mib)}
        vm.run.write_state(st)
        watch = LeaseWatch(vm.name, vm.run.path, vm.run.qmp_socket, vm.memory_mib, log_path)
        state["watch"] = watch
        watch.start()

    def stopping(vm: VmHandle) -> None:
        watch = state.get("watch")
        if watch is not None:
            watch.close()

    return runner.run(image, runner.RunOptions(**{**options.__dict__, "jmx": True}), on_started=started,
                      on_stopping=stopping)
