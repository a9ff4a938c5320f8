"""The balloon brain: the one decision-maker of a host (of a run root), `python -m jvmkit.fleet.brain`.

Started on demand by the first `jvmkit run --balloon` (jvmkit.fleet.lease.start_brain) and found
through its lock, `<run root>/.brain/lock` (exclusive while it lives; a second brain exits at
once). Every half second its main loop
- scans the run directories: a VM whose state says `balloon.brain` gets a controller thread
  (jvmkit.balloon.host.Controller: JMX to its guest agent, QMP to its balloon); every other VM
  counts in the budget at its --memory; controllers of VMs that are gone stop;
- writes the heartbeat the VMs' leases check (`.brain/heartbeat.json`) and the fleet's status for
  `jvmkit balloon status` (`.brain/status.json`).
Each controller steps on its own interval: it reads its VM and asks `decide_for`, which runs the
pure fleet policy (jvmkit.fleet.fleet_policy) over the latest readings of every VM and returns
this VM's target; a VM that must give memory is woken at once, and a VM waiting for memory is
woken when a giver has stepped. Decisions that move memory between VMs are appended to
`.brain/decisions.jsonl` and to each VM's --balloon-log.

The budget is the smallest `host_memory` of the fleets that are up (`.fleet/NAME.json`), else
MemTotal minus a reserve. The brain exits when no balloon VM has been left for `IDLE_EXIT_S`.
A controller inflates only while the main loop is healthy: a brain frozen with SIGSTOP and then
resumed does not squeeze a guest its VM's lease has deflated before its heartbeat is back.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from jvmkit.balloon import policy
from jvmkit.balloon.host import JMX_SECRET, Controller, device_for, read_host_memory
from jvmkit.fleet import fleet_policy, lease
from jvmkit.vm import rundir
from jvmkit.vm.qemu import TCG_TB_MIB

TICK_S = 0.5
IDLE_EXIT_S = 20.0
HOOKS_BACKOFF_S = 30.0   # hooks that gave nothing are not asked again for this long
HEALTHY_S = 2.0          # a controller inflates only if the main loop ticked this recently
# The heap "grew" when its use rose this far above where it last grew or fell to (fleet_policy's
# quiet_s): more than what the cache-service's idle replicas moved between collections with a
# probe a second (6-10 MiB), less than one 10 MiB fill plus its garbage.
HEAP_GREW_MIB = 16
# What a VM costs the host besides its guest memory, counted in the budget. Measured here with
# samples/cache-service on a 1 GiB linux guest under TCG (benchmarks/density.py, smaps of QEMU):
# QEMU itself ~70 MiB RSS outside guest RAM and the translation cache, the `jvmkit run` process
# ~30 MiB; under TCG the translation cache adds up to tb-size (TCG_TB_MIB), which KVM does not have.
QEMU_OVERHEAD_MIB = 100
DECISIONS_MAX_BYTES = 20 * 2**20


def overhead_mib(state: dict) -> int:
    if state.get("accel") != "tcg":
        return QEMU_OVERHEAD_MIB
    return QEMU_OVERHEAD_MIB + int(state.get("tcg_tb_mib") or TCG_TB_MIB)


def default_budget_mib(host_total: int | None) -> int:
    """MemTotal minus a reserve for the host itself: a tenth, at least 512 MiB."""
    total = (host_total or 0) // policy.MIB
    return max(0, total - max(512, total // 10))


def fleet_states(root: Path) -> list[dict]:
    """The fleets that are up (their supervisor lives), from `.fleet/NAME.json`."""
    result = []
    for path in sorted(lease.fleet_dir(root).glob("*.json")):
        data = lease.read_json(path)
        if data and rundir.pid_alive(data.get("pid")):
            result.append(data)
    return result


def budget_for(fleets: list[dict], host_total: int | None) -> tuple[int, str]:
    """(budget MiB, where it comes from) (pure)."""
    set_by = [(f["host_memory_mib"], f["name"]) for f in fleets if f.get("host_memory_mib")]
    if set_by:
        mib, name = min(set_by)
        return mib, f"host_memory of fleet {name}"
    return default_budget_mib(host_total), "MemTotal minus a reserve"


class Brain:
    def __init__(self, root: Path):
        self.root = root
        self.dir = lease.brain_dir(root)
        self.lock = threading.Lock()
        self.controllers: dict[str, tuple[Controller, threading.Thread]] = {}
        self.views: dict[str, fleet_policy.VmView] = {}
        self.meta: dict[str, dict] = {}      # name -> weight, overhead, fleet
        self.outside: dict[str, fleet_policy.VmView] = {}
        self.hooks: dict[str, tuple[float, int]] = {}  # name -> (asked at, floor then)
        self.heap_marks: dict[str, tuple[int, float]] = {}  # name -> (heap used it last grew or fell to, grew at)
        self.last: fleet_policy.FleetDecision | None = None
        self.budget, self.budget_from = default_budget_mib(read_host_memory()["total"]), "MemTotal minus a reserve"
        self.members: dict[str, str] = {}
        self.claims: dict[str, int] = {}     # VMs waiting for admission (lease.read_claims)
        self.ticked = time.monotonic()
        self.empty_since = time.monotonic()

    # -- the decision, for each controller's step --
    def healthy(self) -> bool:
        return time.monotonic() - self.ticked < HEALTHY_S

    def _hooks_tried(self, name: str, inputs: policy.Inputs, settings: policy.Settings) -> bool:
        asked = self.hooks.get(name)
        if asked is None or time.monotonic() - asked[0] > HOOKS_BACKOFF_S:
            return False
        return policy.squeeze_floor_mib(inputs, settings) >= asked[1] - 8

    def _quiet_s(self, name: str, heap_used: int, now: float) -> float:
        """How long the VM's heap has not grown by HEAP_GREW_MIB (a fall moves the mark down, and
        its time stays)."""
        mark = self.heap_marks.get(name)
        step = HEAP_GREW_MIB * policy.MIB
        if mark is None or heap_used > mark[0] + step:
            mark = (heap_used, now)
        elif heap_used < mark[0] - step:
            mark = (heap_used, mark[1])
        self.heap_marks[name] = mark
        return now - mark[1]

    def decide_for(self, controller: Controller, inputs: policy.Inputs, settings: policy.Settings,
                   request: bool) -> tuple[policy.Decision, dict]:
        name = controller.name
        with self.lock:
            meta = self.meta.get(name, {})
            view = fleet_policy.VmView(name, settings, inputs, weight=meta.get("weight", 1),
                                       overhead_mib=meta.get("overhead", 0), fleet=self.members.get(name),
                                       hooks_tried=self._hooks_tried(name, inputs, settings),
                                       quiet_s=self._quiet_s(name, inputs.heap_used, time.monotonic()))
            self.views[name] = view
            views = [replace(v, request=request) if v.name == name else v for v in self.views.values()]
            views += [v for n, v in self.outside.items() if n not in self.views]
            decision = fleet_policy.decide(views, self.budget, sum(self.claims.values()))
            self.last = decision
            target = decision.get(name)
            if target.role == "release":
                self.hooks[name] = (time.monotonic(), target.floor_mib)
            givers = [t.name for t in decision.targets if t.decision is not None and t.name != name
                      and t.decision.balloon_target_mib < t.actual_mib and t.role != "idle"]
        for other in givers:
            self._wake(other)
        if decision.moves and any(fleet_policy.FREE not in (m.giver, m.taker) for m in decision.moves) \
                or decision.hooks_asked or decision.short_mib or decision.admit_short_mib:
            self._record(decision, name)
        extra = {"fleet": {"role": target.role, "floor_mib": target.floor_mib, "want_mib": target.want_mib,
                           "allot_mib": target.allot_mib, "weight": target.weight, "budget_mib": self.budget,
                           "moves": [m.__dict__ for m in target.moves], "summary": decision.summary}}
        return target.decision, extra

    def after_step(self, name: str) -> None:
        """A VM has stepped: wake those still waiting for memory it gave."""
        last = self.last
        if last is None:
            return
        for t in last.targets:
            if t.name != name and t.decision is not None and t.allot_mib > t.decision.balloon_target_mib:
                self._wake(t.name)

    def _wake(self, name: str) -> None:
        entry = self.controllers.get(name)
        if entry is not None:
            entry[0].wake.set()

    def _record(self, d: fleet_policy.FleetDecision, by: str) -> None:
        path = self.dir / "decisions.jsonl"
        record = {"time": round(time.time(), 3), "stepped": by, "budget_mib": d.budget_mib,
                  "allotted_mib": d.allotted_mib, "floors_mib": d.floors_mib, "short_mib": d.short_mib,
                  "waiting_mib": d.waiting_mib, "admit_short_mib": d.admit_short_mib,
                  "hooks_asked": list(d.hooks_asked), "summary": d.summary,
                  "moves": [m.__dict__ for m in d.moves],
                  "targets": {t.name: {"role": t.role, "actual_mib": t.actual_mib, "allot_mib": t.allot_mib,
                                       "floor_mib": t.floor_mib} for t in d.targets}}
        try:
            if path.exists() and path.stat().st_size > DECISIONS_MAX_BYTES:
                path.replace(path.with_suffix(".jsonl.1"))
            with open(path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError:
            pass

    # -- the main loop --
    def scan(self) -> None:
        fleets = fleet_states(self.root)
        host = read_host_memory()
        budget, source = budget_for(fleets, host["total"])
        members = {vm: f["name"] for f in fleets for vm in f.get("members", [])}
        claims = lease.read_claims(self.root)
        seen, outside = set(), {}
        for run in rundir.running():
            state = run.read_state()
            b = state.get("balloon") or {}
            if not b.get("brain"):
                memory = int(state.get("memory_mib") or 0)
                if memory and rundir.pid_alive(state.get("qemu_pid")):
                    outside[run.name] = fleet_policy.VmView(
                        run.name, policy.Settings(memory, memory), managed=False, overhead_mib=overhead_mib(state),
                        fleet=members.get(run.name))
                continue
            if not rundir.pid_alive(state.get("jvmkit_pid")):
                continue
            seen.add(run.name)
            with self.lock:
                self.meta[run.name] = {"weight": int(b.get("weight") or 1), "overhead": overhead_mib(state)}
            if run.name not in self.controllers:
                self._start(run, state)
        with self.lock:
            self.budget, self.budget_from, self.members, self.outside = budget, source, members, outside
            self.claims = {n: mib for n, mib in claims.items() if n not in seen}
            for name in [n for n in self.controllers if n not in seen]:
                controller, _thread = self.controllers.pop(name)
                controller.stop()
                self.views.pop(name, None)
                self.meta.pop(name, None)
                self.hooks.pop(name, None)
                self.heap_marks.pop(name, None)
            # a VM whose controller is not connected yet counts at its --min-memory
            for name, (controller, _thread) in self.controllers.items():
                if name not in self.views:
                    self.views[name] = fleet_policy.VmView(name, controller.settings, None,
                                                           weight=self.meta[name]["weight"],
                                                           overhead_mib=self.meta[name]["overhead"],
                                                           fleet=members.get(name))
        if self.controllers:
            self.empty_since = time.monotonic()

    def _start(self, run: rundir.RunDir, state: dict) -> None:
        b = state["balloon"]
        try:
            password = (run.path / JMX_SECRET).read_text().strip()
        except OSError:
            return  # written right after the state: next scan
        jmx = dict(state.get("jmx") or {}, password=password)
        settings = policy.Settings(memory_mib=int(b["ceiling_mib"]), min_memory_mib=int(b["floor_mib"]),
                                   deflate_on_oom=bool(b.get("deflate_on_oom", True)))
        qmp = Path(state.get("qmp") or run.qmp_socket)
        controller = Controller(run.name, run.path, qmp, jmx, settings,
                                float(b.get("interval") or 2.0), Path(b["log"]) if b.get("log") else None,
                                qemu_pid=state.get("qemu_pid"), exit_marker=b.get("exit_marker"),
                                decide=self.decide_for, may_inflate=self.healthy, after_step=self.after_step,
                                device=device_for(qmp, state))  # QMP, or libvirt for --engine libvirt
        thread = threading.Thread(target=controller.run, name=f"balloon-{run.name}", daemon=True)
        self.controllers[run.name] = (controller, thread)
        thread.start()

    def status(self) -> dict:
        with self.lock:
            d = self.last
            vms = {}
            for name, (controller, _t) in self.controllers.items():
                t = d.get(name) if d else None
                vms[name] = {"weight": self.meta.get(name, {}).get("weight", 1),
                             "overhead_mib": self.meta.get(name, {}).get("overhead"), "fleet": self.members.get(name),
                             "ceiling_mib": controller.settings.memory_mib,
                             "role": t.role if t else "waiting", "floor_mib": t.floor_mib if t else None,
                             "want_mib": t.want_mib if t else None, "allot_mib": t.allot_mib if t else None,
                             "target_mib": t.decision.balloon_target_mib if t and t.decision else None,
                             "actual_mib": t.actual_mib if t else None, "reason": t.reason if t else None}
            for name, v in self.outside.items():
                vms[name] = {"weight": v.weight, "overhead_mib": v.overhead_mib, "fleet": v.fleet,
                             "ceiling_mib": v.settings.memory_mib, "role": "fixed", "counted_mib": v.settings.memory_mib}
            counted = sum(v.overhead_mib for v in self.outside.values()) + sum(v.settings.memory_mib
                                                                               for v in self.outside.values())
            if d is not None:
                counted = d.fixed_mib + sum(t.counted_mib for t in d.targets if t.decision is not None)
            return {"pid": os.getpid(), "time": round(time.time(), 3), "budget_mib": self.budget,
                    "budget_from": self.budget_from, "counted_mib": counted,
                    "allotted_mib": d.allotted_mib if d else None, "floors_mib": d.floors_mib if d else None,
                    "short_mib": d.short_mib if d else 0, "summary": d.summary if d else "", "vms": vms,
                    "waiting": dict(self.claims), "releasable_mib": self._releasable_mib()}

    def _releasable_mib(self) -> int:
        """At most what the shrinker hooks of the reporting VMs could take off their floors: each
        one's live heap, down to its --min-memory (an upper bound: `jvmkit up` waits for room only
        when this covers what a VM lacks)."""
        total = 0
        for v in self.views.values():
            if v.inputs is None:
                continue
            floor = policy.squeeze_floor_mib(v.inputs, v.settings)
            least = min(v.settings.min_memory_mib, v.settings.memory_mib)
            total += max(0, min(v.inputs.heap_used // policy.MIB, floor - least))
        return total

    def tick(self) -> None:
        self.scan()
        self.ticked = time.monotonic()
        lease.write_json(self.dir / "heartbeat.json", {"pid": os.getpid(), "time": time.time(),
                                                       "lease_s": lease.LEASE_S})
        lease.write_json(self.dir / "status.json", self.status())

    def run(self) -> None:
        while time.monotonic() - self.empty_since < IDLE_EXIT_S:
            try:
                self.tick()
            except Exception as exc:  # keep deciding; the leases cover a brain that stops ticking
                print(f"jvmkit brain: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            time.sleep(TICK_S)
        for controller, _thread in list(self.controllers.values()):
            controller.stop()


def main() -> int:
    root = rundir.run_root()
    bdir = lease.brain_dir(root)
    fd = os.open(bdir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another brain has the host
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    print(f"jvmkit brain {os.getpid()}: deciding for the VMs under {root}", file=sys.stderr, flush=True)
    Brain(root).run()
    (bdir / "heartbeat.json").unlink(missing_ok=True)
    print(f"jvmkit brain {os.getpid()}: no balloon VM left; exiting", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # the JMX client's JVM (JPype) lives in this process: leave without waiting for it
