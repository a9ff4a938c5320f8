"""The host agent: sensors → policy → actuators, one controller thread per VM.

Sensors: the guest agent's MXBean over JMX (jvmkit.balloon.jmx), QEMU's virtio-balloon over QMP
(query-balloon, guest-stats), and the host's /proc/meminfo and /proc/pressure/memory. The pure
`policy.decide()` turns them into targets. Actuators: shrink = guest agent shrinkTo (hooks + GC
steering) and then inflate the balloon; grow = deflate first, then growTo. A lost JMX or QMP
connection means deflate to the ceiling and back off. Every decision is logged (and written as a
JSON line with --balloon-log); the latest one is kept in the run directory for `balloon status`.
Requests from `jvmkit balloon set` arrive as `balloon-request.json` in the run directory.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from jvmkit import ui
from jvmkit.balloon import policy
from jvmkit.balloon.policy import MIB
from jvmkit.errors import JvmkitError
from jvmkit.vm.qmp import QmpClient, QmpError

STATUS_FILE = "balloon.json"
REQUEST_FILE = "balloon-request.json"
RESULT_FILE = "balloon-result.json"
BALLOON_QOM = "/machine/peripheral/balloon0"


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


class QmpBalloon:
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

    changed_at = 0.0
    settle_s = 3.0  # the guest needs a moment to move pages, and stats are polled every 2 s

    def fresh(self, guest: dict) -> bool:
        """Guest stats taken after the last balloon change had time to settle."""
        return guest.get("total") is None or guest.get("updated", 0) >= self.changed_at + self.settle_s


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

    def __post_init__(self):
        self.balloon = QmpBalloon(self.qmp_socket)
        self.client = None
        self.failures = 0
        self.last_gc_ms: float | None = None
        self.last_time = time.monotonic()
        self.connected_once = False
        self.last_heap_used: int | None = None
        self.manual_mib: int | None = None  # from `jvmkit balloon set`: a ceiling above the safe floor
        self._log = open(self.log_path, "a", buffering=1) if self.log_path else None

    # -- logging --
    def log(self, event: str, **data) -> None:
        record = {"time": round(time.time(), 3), "vm": self.name, "event": event, **data}
        rss = process_rss(self.qemu_pid)
        if rss is not None:
            record["qemu_rss_mib"] = round(rss / MIB, 1)
        self.decisions.append(record)
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
            self._lost(f"QMP ({exc})")
            return
        now = time.monotonic()
        gc_ms = float(stats.gc_time_millis)
        delta = 0.0 if self.last_gc_ms is None else max(0.0, gc_ms - self.last_gc_ms)
        interval, self.last_gc_ms, self.last_time = now - self.last_time, gc_ms, now
        host = read_host_memory()
        inputs = policy.Inputs(
            heap_used=stats.heap_used, heap_committed=stats.heap_committed,
            heap_max=stats.heap_max, gc_time_delta_ms=delta, interval_s=max(interval, 0.001),
            balloon_actual_mib=guest["actual"] // MIB, guest_total=guest["total"], guest_available=guest["available"],
            host_total=host["total"], host_available=host["available"], host_psi_some_avg10=host["psi_some_avg10"],
            stats_fresh=self.balloon.fresh(guest), heap_used_prev=self.last_heap_used)
        self.last_heap_used = stats.heap_used
        request = self._take_request()
        settings = self.settings
        if self.manual_mib is not None:
            settings = policy.with_manual_ceiling(settings, self.manual_mib)
        decision = policy.decide(inputs, settings)
        achieved = self.apply(decision, inputs, settings)
        self.failures = 0
        self.log("decision", **decision.to_dict(), achieved=achieved, request_mib=request)
        if request is not None:
            self._write_result(request, decision, achieved)

    def apply(self, d: policy.Decision, before: policy.Inputs, settings: policy.Settings) -> dict:
        achieved: dict = {}
        if d.action == "shrink":
            achieved["heap_committed"] = int(self.client.shrink_to(d.heap_target))
            after_stats = self.client.balloon_stats()
            # The collections the shrink ran are ours, not the app's: don't count them as GC overhead.
            self.last_gc_ms = float(after_stats.gc_time_millis)
            after = policy.after_shrink(before, after_stats.heap_used, after_stats.heap_committed)
            target = policy.final_balloon_target(d, after, settings)
            achieved.update(heap_used_after=after_stats.heap_used, balloon_target_mib=target)
            if target < before.balloon_actual_mib:
                self.balloon.set(target * MIB)
            return achieved
        elif d.action == "grow":
            self.balloon.set(d.balloon_target_mib * MIB)
            achieved["heap_committed"] = int(self.client.grow_to(d.heap_target))
        achieved["balloon_target_mib"] = d.balloon_target_mib
        return achieved

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

    # -- balloon set --
    def _take_request(self) -> int | None:
        path = self.run_dir / REQUEST_FILE
        try:
            data = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return None
        self.manual_mib = int(data["target_mib"])
        return self.manual_mib

    def _write_result(self, requested: int, d: policy.Decision, achieved: dict) -> None:
        target = achieved.get("balloon_target_mib", d.balloon_target_mib)
        result = {"requested_mib": requested, "target_mib": target, "action": d.action,
                  "reason": d.reason, "floor_limited": target > requested, **achieved}
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
            self.stop_event.wait(self.interval)
        self._close_jmx()
        if self._log:
            self._log.close()


def run_with_balloon(image: Path, options, *, min_memory_mib: int | None, interval: float,
                     log_path: Path | None) -> int:
    """`jvmkit run --balloon`: the runner plus one controller thread for the VM."""
    from jvmkit.vm import runner
    from jvmkit.packager import bundle as bundles
    from jvmkit.packager import targets

    manifest = bundles.load(image, verify=False).manifest
    if not targets.get(manifest.target).has_balloon(manifest):
        ui.current().warn("this image's OSv kernel has no virtio-balloon driver: the guest heap will shrink, "
                          "but the host cannot take the memory back (use an OSv kernel built since 2026-07)")
    state: dict = {}

    def started(vm: runner.RunningVm) -> None:
        floor = min_memory_mib or policy.default_floor_mib(vm.memory_mib)
        if floor > vm.memory_mib:
            ui.current().warn(f"--min-memory {floor}M is above --memory {vm.memory_mib}M; using {vm.memory_mib}M")
            floor = vm.memory_mib
        settings = policy.Settings(memory_mib=vm.memory_mib, min_memory_mib=floor)
        controller = Controller(vm.name, vm.run.path, vm.config.qmp_socket, vm.jmx, settings, interval, log_path,
                                qemu_pid=vm.process.pid, exit_marker=manifest.boot.exit_marker)
        state["controller"] = controller
        thread = threading.Thread(target=controller.run, name=f"balloon-{vm.name}", daemon=True)
        state["thread"] = thread
        st = vm.run.read_state()
        st["balloon"] = {"floor_mib": floor, "ceiling_mib": vm.memory_mib, "interval": interval}
        vm.run.write_state(st)
        thread.start()

    def stopping(vm: runner.RunningVm) -> None:
        controller = state.get("controller")
        if controller is not None:
            controller.stop_event.set()
            state["thread"].join(timeout=10)

    return runner.run(image, runner.RunOptions(**{**options.__dict__, "jmx": True}), on_started=started,
                      on_stopping=stopping)
