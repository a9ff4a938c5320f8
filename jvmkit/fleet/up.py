"""`jvmkit up FILE`: start a fleet's VMs, supervise them, stop them all as one.

The supervisor (this process, or with `-d` one it leaves running, its output in
`<run root>/.fleet/NAME.log`) starts each VM as its own `jvmkit run` process, so each VM keeps its
own supervisor for QEMU, its console and its balloon lease. It
- admits each VM before starting it (jvmkit.fleet.state.admit). A VM whose floor does not fit in
  what is left of the budget waits up to ADMIT_WAIT_S while the balloon brain has the idle VMs'
  shrinker hooks make room (a claim, jvmkit.fleet.lease.write_claim; the VMs after it wait their
  turn); if it still does not fit, or no brain runs VMs to ask, it is not started, with one line
  saying how much is missing;
- starts at most `parallel` VMs at a time (default: all of them): the next one starts when a
  booting VM printed its first line, or after BOOT_SLOT_S. Measured on this 2-core TCG host
  (benchmarks/density.py, crowd boot), all at once was done sooner than 2 at a time: 8 linux
  VMs all answered after 47 s against 60 s, 4 after 17 s against 16-48 s;
- prefixes each line a VM prints with its name;
- restarts a VM that ended as `restart` says ("no", "on-failure": a status other than 0,
  "always"; never one stopped on purpose, status 130), after a backoff doubling from 1 s to 60 s
  (reset once it ran for a minute);
- on Ctrl-C or SIGTERM (`jvmkit down`) stops every VM (SIGTERM to its `jvmkit run`, which stops
  QEMU) and returns 130; otherwise it returns when no VM is left to run: 0 if every VM's last
  exit was 0, else 1.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from jvmkit import proc, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.fleet import lease, state
from jvmkit.fleet.file import Fleet, VmSpec, load
from jvmkit.vm import rundir

BOOT_SLOT_S = 30.0
BACKOFF_MAX_S = 60.0
STEADY_S = 60.0        # a VM that ran this long starts its backoff again at 1 s
STOP_TIMEOUT_S = 30.0
EXIT_INTERRUPTED = 130
# How long a VM that does not fit waits for the idle VMs to make room. Measured with density.py's
# cache-service fleet (1G VMs, min_memory 160M, TCG): admitted after 7 s for 10M missing, after
# 26 s for 263M (the hooks are asked, the heaps shrink and the floors show it once the guests'
# stats settle, over several controller steps).
ADMIT_WAIT_S = 60.0


@dataclass
class Member:
    spec: VmSpec
    process: proc.Popen | None = None
    phase: str = "pending"       # pending, admitting, booting, running, waiting (to restart), exited, refused
    started: float = 0.0
    first_line: float | None = None
    restarts: int = 0
    next_start: float = 0.0
    status: int | None = None
    note: str = ""
    readers: list = field(default_factory=list)
    admit_until: float = 0.0     # admitting: monotonic time it gives up at
    admit_since: float = 0.0


def backoff_s(restarts: int) -> float:
    """The wait before restart number `restarts` (1-based) (pure): 1, 2, 4, ... 60 s."""
    return min(BACKOFF_MAX_S, 2.0 ** max(0, restarts - 1))


def wants_restart(policy: str, status: int) -> bool:
    """Whether a VM that ended with `status` is started again (pure). 130 is a VM stopped on
    purpose (`jvmkit stop NAME`, Ctrl-C at its own terminal): never restarted."""
    if status == EXIT_INTERRUPTED:
        return False
    return policy == "always" or (policy == "on-failure" and status != 0)


def image_memory_mib(image: Path) -> int:
    from jvmkit.packager import bundle as bundles

    return bundles.load(image, verify=False).manifest.defaults.memory_mib


def image_start_floor_mib(image: Path, memory_mib: int) -> int | None:
    """state.start_floor_mib of IMAGE's manifest; None where it cannot be read (its `jvmkit run`
    then says why, in its own words)."""
    from jvmkit.packager import bundle as bundles

    try:
        manifest = bundles.load(image, verify=False).manifest
    except JvmkitError:
        return None
    return state.start_floor_mib(manifest, memory_mib)


def accel_guess(spec: VmSpec) -> str:
    """The accelerator `jvmkit run` will pick (for the QEMU overhead in the budget)."""
    if spec.accel != "auto":
        return spec.accel
    from jvmkit.vm import kvm

    verdict = kvm.cached_verdict()
    return "kvm" if verdict is not None and verdict.usable else "tcg"


class Supervisor:
    def __init__(self, fleet: Fleet, out=None):
        self.fleet = fleet
        self.members = [Member(v) for v in fleet.vms]
        self.stopping = threading.Event()
        self.out = out or sys.stdout
        self.out_lock = threading.Lock()
        self.width = max(len(v.name) for v in fleet.vms)
        self.parallel = fleet.parallel or len(self.members)
        self.memory: dict[str, int] = {}
        self.start_floor: dict[str, int | None] = {}  # state.start_floor_mib by VM name
        self.started_at = time.time()

    # -- the fleet's state file --
    def save(self, phase: str) -> None:
        state.write({"name": self.fleet.name, "file": str(self.fleet.path), "pid": os.getpid(), "phase": phase,
                     "host_memory_mib": self.fleet.host_memory_mib, "started": self.started_at,
                     "members": [m.spec.name for m in self.members],
                     "vms": {m.spec.name: {"phase": m.phase, "restarts": m.restarts, "status": m.status,
                                           "note": m.note, "pid": m.process.pid if m.process else None,
                                           "publish": list(m.spec.publish)} for m in self.members}})

    def say(self, name: str, line: str) -> None:
        with self.out_lock:
            self.out.write(f"{name:<{self.width}} | {line}\n")
            self.out.flush()

    # -- starting --
    def check_names(self) -> None:
        running = {r.name for r in rundir.running()}
        taken = [m.spec.name for m in self.members if m.spec.name in running]
        if taken:
            raise UsageError(f"VMs named {', '.join(taken)} are already running",
                             hint="stop them (`jvmkit stop NAME`) or rename the [[vm]] entries")

    def pending_reservations(self) -> dict[str, int]:
        """Floors of the members being started that may have no run directory yet."""
        result = {}
        for m in self.members:
            if m.phase in ("booting", "running") and m.spec.name in self.memory:
                floor = state.vm_floor_mib(m.spec.balloon, self.memory[m.spec.name], m.spec.min_memory_mib,
                                           self.start_floor.get(m.spec.name))
                result[m.spec.name] = floor + state.overhead_mib({"accel": accel_guess(m.spec),
                                                                  "tcg_tb_mib": m.spec.tcg_cache_mib})
        return result

    def admit(self, m: Member) -> bool:
        spec = m.spec
        if spec.name not in self.memory:
            self.memory[spec.name] = spec.memory_mib or image_memory_mib(spec.image)
        memory = self.memory[spec.name]
        if spec.balloon and spec.name not in self.start_floor:
            self.start_floor[spec.name] = image_start_floor_mib(spec.image, memory)
        floor = state.vm_floor_mib(spec.balloon, memory, spec.min_memory_mib, self.start_floor.get(spec.name))
        verdict = state.admit(spec.name, floor, accel_guess(spec), self.fleet.host_memory_mib, self.fleet.name,
                              self.pending_reservations(), tcg_tb_mib=spec.tcg_cache_mib)
        now = time.monotonic()
        waited = m.phase == "admitting"
        if verdict.admitted:
            if waited:
                lease.remove_claim(spec.name)
                self.say(spec.name, f"admitted after {now - m.admit_since:.0f}s: the idle VMs made room")
            return True
        if not waited and self.others_can_give(verdict.missing_mib):
            m.phase, m.admit_since, m.admit_until = "admitting", now, now + ADMIT_WAIT_S
            lease.write_claim(spec.name, verdict.floor_mib + verdict.overhead_mib, time.time() + ADMIT_WAIT_S + 5)
            self.say(spec.name, f"waiting for {verdict.missing_mib}M of the host budget: the idle VMs' shrinker "
                                f"hooks are asked to make room (up to {ADMIT_WAIT_S:g}s)")
            return False
        if waited and now < m.admit_until:
            return False
        if waited:
            lease.remove_claim(spec.name)
        m.phase, m.note = "refused", verdict.refusal() + (
            f" (after {ADMIT_WAIT_S:g}s of asking the idle VMs to make room)" if waited else "")
        ui.current().notice(f"jvmkit up: {m.note}")
        return False

    def others_can_give(self, missing_mib: int) -> bool:
        """The balloon brain is up, and the live heaps of the VMs it decides for could cover
        `missing_mib` (its status' releasable_mib)."""
        alive, _why = lease.brain_alive()
        if not alive:
            return False
        status = lease.read_json(lease.brain_dir() / "status.json") or {}
        return int(status.get("releasable_mib") or 0) >= missing_mib

    def start(self, m: Member) -> None:
        if m.spec.balloon_log:
            m.spec.balloon_log.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "jvmkit", *m.spec.run_args()]
        m.process = proc.start(argv, what=f"jvmkit run ({m.spec.name})", stdout=proc.PIPE, stderr=proc.PIPE,
                               start_new_session=True, cwd=os.getcwd())
        m.phase, m.started, m.first_line, m.status = "booting", time.monotonic(), None, None
        m.readers = [threading.Thread(target=self._pump, args=(m, m.process.stdout, True), daemon=True),
                     threading.Thread(target=self._pump, args=(m, m.process.stderr, False), daemon=True)]
        for t in m.readers:
            t.start()
        self.say(m.spec.name, "starting" + (f" (restart {m.restarts})" if m.restarts else "")
                 + (f", {', '.join(m.spec.publish)}" if m.spec.publish else ""))

    def _pump(self, m: Member, stream, is_stdout: bool) -> None:
        for raw in stream:
            if is_stdout and m.first_line is None:
                m.first_line = time.monotonic()
            self.say(m.spec.name, raw.decode(errors="replace").rstrip("\r\n"))

    # -- the loop --
    def booting(self) -> int:
        now = time.monotonic()
        return sum(1 for m in self.members if m.phase == "booting" and m.first_line is None
                   and now - m.started < BOOT_SLOT_S)

    def step(self) -> None:
        now = time.monotonic()
        for m in self.members:
            if m.process is not None and m.phase in ("booting", "running"):
                if m.phase == "booting" and m.first_line is not None:
                    m.phase = "running"
                rc = m.process.poll()
                if rc is None:
                    continue
                for t in m.readers:
                    t.join(timeout=2)
                m.status, ran = rc, now - m.started
                if ran >= STEADY_S:
                    m.restarts = 0
                if not self.stopping.is_set() and wants_restart(m.spec.restart, rc):
                    m.restarts += 1
                    wait = backoff_s(m.restarts)
                    m.phase, m.next_start = "waiting", now + wait
                    self.say(m.spec.name, f"exited with status {rc}; restart {m.restarts} in {wait:g}s "
                                          f"(restart = {m.spec.restart})")
                else:
                    m.phase = "exited"
                    self.say(m.spec.name, f"exited with status {rc}")
        if self.stopping.is_set():
            return
        for m in self.members:
            ready = m.phase in ("pending", "admitting") or (m.phase == "waiting" and now >= m.next_start)
            if ready and self.booting() < self.parallel:
                if self.admit(m):
                    self.start(m)
                elif m.phase == "admitting":
                    break  # the VMs after it wait their turn: what is freed is for this one

    def done(self) -> bool:
        return all(m.phase in ("exited", "refused") for m in self.members)

    def up(self) -> bool:
        """All admitted VMs have booted (printed a line or had their boot slot) or ended."""
        return all(m.phase in ("running", "exited", "refused")
                   or (m.phase == "booting" and time.monotonic() - m.started >= BOOT_SLOT_S)
                   for m in self.members)

    def stop_all(self) -> None:
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                try:
                    os.kill(m.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for m in self.members:
            if m.process is None:
                continue
            try:
                m.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except proc.TimeoutExpired:
                m.process.kill()  # its QEMU dies with it (PR_SET_PDEATHSIG)
                m.process.wait()
            if m.phase in ("booting", "running"):
                m.phase, m.status = "exited", m.process.returncode
        for m in self.members:
            for t in m.readers:
                t.join(timeout=2)

    def run(self) -> int:
        self.check_names()
        previous = {}

        def request_stop(signum, _frame):
            self.stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
        reported = False
        try:
            self.save("starting")
            while not self.stopping.is_set():
                self.step()
                if not reported and self.up():
                    reported = True
                    self.save("up")
                elif reported:
                    self.save("up")
                if self.done():
                    break
                self.stopping.wait(0.25)
            if self.stopping.is_set():
                self.save("stopping")
                self.stop_all()
                return EXIT_INTERRUPTED
            refused = any(m.phase == "refused" for m in self.members)
            return 0 if not refused and all(m.status == 0 for m in self.members) else 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for m in self.members:
                if m.phase == "admitting":
                    lease.remove_claim(m.spec.name)
                    m.phase, m.note = "refused", f"{m.spec.name} not started: the fleet stopped while it waited for room"
            self.save("ended")
            last = state.state_path(self.fleet.name)
            try:
                last.replace(last.with_suffix(".last"))  # what `up -d` reports when the supervisor ended at once
            except OSError:
                pass


def foreground(path: Path) -> int:
    fleet = load(path)
    _refuse_if_up(fleet)
    return Supervisor(fleet).run()


def _refuse_if_up(fleet: Fleet) -> None:
    current = state.read(fleet.name)
    if current and rundir.pid_alive(current.get("pid")) and current.get("pid") != os.getpid():
        raise UsageError(f"fleet {fleet.name!r} is already up (supervisor pid {current['pid']})",
                         hint=f"`jvmkit down {fleet.name}` first, or give the file another `name`")


def _last_said(log_text: str) -> dict[str, str]:
    """Each VM's last line in a supervisor's output (`NAME | line`), but for the supervisor's own
    "starting" and "exited with status N" (pure)."""
    said: dict[str, str] = {}
    for line in log_text.splitlines():
        name, sep, text = line.partition(" | ")
        text = text.strip()
        if sep and text and text != "starting" and not text.startswith("exited with status"):
            said[name.strip()] = text
    return said


def detach(path: Path, timeout: float = 900.0) -> tuple[int, dict]:
    """`up -d`: start a supervisor that outlives this process, wait until the fleet is up."""
    fleet = load(path)
    _refuse_if_up(fleet)
    Supervisor(fleet).check_names()
    log_path = lease.fleet_dir() / f"{fleet.name}.log"
    with open(log_path, "ab") as log:
        child = proc.start([sys.executable, "-m", "jvmkit", "up", str(fleet.path), "--supervise"],
                           what="the fleet supervisor", stdout=log, stderr=proc.STDOUT, start_new_session=True,
                           cwd=os.getcwd())
    deadline = time.monotonic() + timeout
    data: dict = {}
    while time.monotonic() < deadline:
        data = state.read(fleet.name) or {}
        if child.poll() is not None:
            break
        if data.get("pid") == child.pid and data.get("phase") in ("up", "stopping"):
            break
        time.sleep(0.25)
    if child.poll() is not None:
        data = lease.read_json(state.state_path(fleet.name).with_suffix(".last")) or {}
    vms = data.get("vms", {})
    if child.poll() is not None and not vms:
        raise UsageError(f"the fleet supervisor ended at once (exit status {child.returncode}): "
                         f"{proc.last_line(log_path.read_text(errors='replace'))}")
    refused = [v["note"] for v in vms.values() if v.get("phase") == "refused"]
    ended = None
    if child.poll() is not None and not refused:
        # The supervisor ended before the fleet was up, with no VM refused: its VMs ended. Say so,
        # with what each said last (a VM that ended at once said why).
        text = log_path.read_text(errors="replace")
        said = _last_said(text)
        ended = "; ".join(f"{name} ended before the fleet was up (exit status {v.get('status')})"
                          + (f": {said[name]}" if name in said else "") for name, v in vms.items())
        own = [line for line in text.splitlines() if line.strip() and " | " not in line]
        ended += (f"; the supervisor said: {own[-1].strip()}" if own else "") + f" (the fleet's output: {log_path})"
    status = 1 if refused or child.poll() is not None else 0
    return status, {"fleet": fleet.name, "supervisor_pid": child.pid, "log": str(log_path), "vms": vms,
                    "refused": refused, "ended": ended}
