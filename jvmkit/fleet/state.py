"""Fleets that are up, as `jvmkit up`, `down`, `ps` and the brain see them; admission to the budget.

A fleet that is up has `<run root>/.fleet/NAME.json`, written by its supervisor (the `jvmkit up`
process, or the one `up -d` left running): the file it came from, the supervisor's pid, its
`host_memory`, its members and how each is doing. Its VMs are ordinary `jvmkit run` VMs (run
directories named as in the file), so `ps`, `stop` and `balloon` see them as any other.

Admission (`admit`): a VM is started only if its floor — its --min-memory with the balloon, all
of its --memory without — plus what QEMU costs besides the guest fits in what is left of the
budget once every VM on the host has its floor: a balloon VM its current floor as the brain
sees it (live heap + headroom + guest non-heap + reserve) or --min-memory, whichever is higher;
a VM without the balloon its --memory.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from jvmkit.balloon import policy
from jvmkit.errors import UsageError
from jvmkit.fleet import lease
from jvmkit.fleet.brain import budget_for, fleet_states, overhead_mib
from jvmkit.units import mib_text
from jvmkit.vm import rundir


def state_path(name: str, root: Path | None = None) -> Path:
    return lease.fleet_dir(root) / f"{name}.json"


def read(name: str, root: Path | None = None) -> dict | None:
    return lease.read_json(state_path(name, root))


def write(data: dict, root: Path | None = None) -> None:
    lease.write_json(state_path(data["name"], root), data)


def remove(name: str, root: Path | None = None) -> None:
    state_path(name, root).unlink(missing_ok=True)


def memberships(root: Path | None = None) -> dict[str, str]:
    """VM name -> the fleet it belongs to, for the fleets that are up."""
    return {vm: f["name"] for f in fleet_states(root or rundir.run_root()) for vm in f.get("members", [])}


# ---- admission --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Admission:
    name: str
    floor_mib: int
    overhead_mib: int
    budget_mib: int
    budget_from: str
    reserved_mib: int          # what the VMs already on the host hold at least

    @property
    def left_mib(self) -> int:
        return self.budget_mib - self.reserved_mib

    @property
    def missing_mib(self) -> int:
        return max(0, self.floor_mib + self.overhead_mib - self.left_mib)

    @property
    def admitted(self) -> bool:
        return self.missing_mib == 0

    def refusal(self) -> str:
        """One line: why the VM is not started and how much is missing (pure)."""
        return (f"{self.name} not started: its floor {self.floor_mib}M + {self.overhead_mib}M for QEMU does not fit "
                f"in what is left of the host budget ({max(0, self.left_mib)}M of {mib_text(self.budget_mib)}, "
                f"{self.budget_from}): {self.missing_mib}M missing")


def vm_floor_mib(balloon: bool, memory_mib: int, min_memory_mib: int | None, heap_room_mib: int | None = None) -> int:
    """What a VM reserves when it starts (pure): its --min-memory (or the default share) with the
    balloon, all of --memory without; and never less than `heap_room_mib` (`start_floor_mib`)."""
    if not balloon:
        return memory_mib
    return min(memory_mib, max(min_memory_mib or policy.default_floor_mib(memory_mib), heap_room_mib or 0))


_JVM_SIZE = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def heap_max_mib(java_argv: list[str] | tuple[str, ...], memory_mib: int) -> int:
    """The heap's max of a JVM started with `java_argv` in a guest of `memory_mib` (pure): the last
    -Xmx or -XX:MaxHeapSize (a plain number is bytes, as the JVM reads it), else the last
    -XX:MaxRAMPercentage of the memory (HotSpot's default: 25)."""
    size, percent = None, 25.0
    for arg in java_argv:
        for prefix in ("-Xmx", "-XX:MaxHeapSize="):
            if arg.startswith(prefix):
                value = arg[len(prefix):].strip().lower()
                number, unit = value.rstrip("kmgt"), value[len(value.rstrip("kmgt")):]
                if number.isdigit() and len(unit) <= 1:
                    size = int(number) * _JVM_SIZE[unit] // 2**20
        if arg.startswith("-XX:MaxRAMPercentage="):
            try:
                percent, size = float(arg.split("=", 1)[1]), None
            except ValueError:
                pass
    return size if size is not None else int(memory_mib * percent / 100)


def start_floor_mib(manifest, memory_mib: int) -> int | None:
    """The floor a balloon VM of `manifest` holds before its JVM reports (pure): None where the
    guest deflates on OOM (--min-memory then); else policy.unmeasured_floor_mib for the heap's max
    its java command gives (measured on OSv: the brain's floor for cache-service at 1G was 1009M,
    for phases with -Xmx600m 841M)."""
    from jvmkit.packager import targets

    if targets.get(manifest.target, "image target").balloon_deflates_on_oom:
        return None
    return policy.unmeasured_floor_mib(heap_max_mib(manifest.command.java, memory_mib),
                                       policy.Settings(memory_mib, memory_mib, deflate_on_oom=False))


def reserved_now(root: Path, brain_status: dict | None, pending: dict[str, int]) -> int:
    """What the VMs on the host hold at least (MiB, QEMU overheads included): running VMs from
    their run directories and the brain's floors, plus `pending` (name -> floor + overhead) for
    VMs being started that have no run directory yet."""
    vms = (brain_status or {}).get("vms", {})
    total, seen = 0, set()
    for run in rundir.running():
        state = run.read_state()
        seen.add(run.name)
        b = state.get("balloon") or {}
        memory = int(state.get("memory_mib") or 0)
        if b.get("brain"):
            # the brain's floor once it has one; before, what the VM was started with
            known = int(vms.get(run.name, {}).get("floor_mib") or 0) or int(b.get("start_floor_mib") or 0)
            floor = max(int(b.get("floor_mib") or 0), known)
            total += min(memory, floor) if memory else floor
        else:
            total += memory
        total += overhead_mib(state)
    return total + sum(v for n, v in pending.items() if n not in seen)


def admit(name: str, floor_mib: int, accel: str, own_budget_mib: int | None, fleet_name: str,
          pending: dict[str, int], root: Path | None = None, tcg_tb_mib: int | None = None) -> Admission:
    root = root or rundir.run_root()
    from jvmkit.balloon.host import read_host_memory

    fleets = [f for f in fleet_states(root) if f.get("name") != fleet_name]
    fleets.append({"name": fleet_name, "host_memory_mib": own_budget_mib})
    budget, source = budget_for(fleets, read_host_memory()["total"])
    alive, _why = lease.brain_alive(root)
    status = lease.read_json(lease.brain_dir(root) / "status.json") if alive else None
    return Admission(name, floor_mib, overhead_mib({"accel": accel, "tcg_tb_mib": tcg_tb_mib}), budget, source,
                     reserved_now(root, status, pending))


# ---- down -------------------------------------------------------------------------------------

def resolve(target: str) -> str:
    """The fleet name for `down FILE|NAME`."""
    path = Path(target)
    if target.endswith(".toml") or path.is_file():
        from jvmkit.fleet.file import load

        return load(path, check_images=False).name
    return target


def down(target: str, timeout: float = 60.0) -> tuple[str, list[str]]:
    """Stop a fleet: its supervisor first (it stops its VMs), then any member still running.
    Returns (fleet name, the VMs that were stopped)."""
    name = resolve(target)
    data = read(name)
    if data is None:
        up = [f["name"] for f in fleet_states(rundir.run_root())]
        raise UsageError(f"no fleet named {name!r} is up",
                         hint=f"up: {', '.join(up)}" if up else "no fleet is up; see `jvmkit ps`")
    members = list(data.get("members", []))
    running_before = {r.name for r in rundir.running()}
    pid = data.get("pid")
    deadline = time.monotonic() + timeout
    if rundir.pid_alive(pid) and pid != os.getpid():
        os.kill(pid, signal.SIGTERM)
        while rundir.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    for run in rundir.running():  # members the supervisor did not stop (it was killed, or hung)
        if run.name in members:
            _stop_vm(run, max(5.0, deadline - time.monotonic()))
    if rundir.pid_alive(pid) and pid != os.getpid():
        os.kill(pid, signal.SIGKILL)
    remove(name)
    return name, [m for m in members if m in running_before]


def _stop_vm(run: rundir.RunDir, timeout: float) -> None:
    state = run.read_state()
    if rundir.pid_alive(state.get("jvmkit_pid")):
        os.kill(state["jvmkit_pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while rundir.pid_alive(state.get("qemu_pid")) and time.monotonic() < deadline:
        time.sleep(0.2)
    if rundir.pid_alive(state.get("qemu_pid")):
        os.kill(state["qemu_pid"], signal.SIGKILL)
