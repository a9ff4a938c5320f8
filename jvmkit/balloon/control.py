"""`jvmkit balloon status|set`: talking to running VMs through their run directories.

A VM run with `--balloon` has a controller (jvmkit.balloon.host, run by the host's balloon brain,
jvmkit.fleet.brain) that writes its last decision to the run directory and takes `balloon set`
requests from there; the brain's view of the whole host (budget, each VM's target, floor and
weight) is `<run root>/.brain/status.json`, shown while the brain is alive. A VM started without it has no
guest agent to shrink its heap first, so `balloon set` refuses it in one line (a plain
virtio-balloon inflated under a JVM's committed heap takes nothing or starves the guest) and
`balloon status` says so instead of showing balloon numbers for it.
"""

from __future__ import annotations

import json
import time

from jvmkit.vm import rundir
from jvmkit.balloon import policy
from jvmkit.balloon import host
from jvmkit.balloon.host import REQUEST_FILE, RESULT_FILE, STATUS_FILE
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.vm.qmp import QmpError

NO_AGENT = "no balloon agent (started without --balloon)"


def has_agent(state: dict) -> bool:
    """The VM was started with --balloon (its JMX forward is in the state from the start; the
    controller's settings follow a moment later)."""
    return bool(state.get("balloon") or state.get("jmx"))


def status_row(name: str, state: dict, status: dict | None, guest_bytes: int | None,
               fleet: dict | None = None) -> dict:
    """One VM's `balloon status` row (pure): `guest_mib` is the guest memory the balloon leaves
    the guest, `balloon_mib` the balloon's size (what it holds back of --memory); from the
    brain's view of the host (`fleet`): its target, floor, weight, role and fleet."""
    memory = state.get("memory_mib")
    row: dict = {"name": name, "memory_mib": memory, "controlled": has_agent(state)}
    view = (fleet or {}).get("vms", {}).get(name) or {}
    row.update(fleet=view.get("fleet"), weight=view.get("weight", (state.get("balloon") or {}).get("weight")),
               target_mib=view.get("target_mib"), floor_mib=view.get("floor_mib"), role=view.get("role"))
    if not row["controlled"]:
        row.update(guest_mib=None, balloon_mib=None, note=NO_AGENT, last=None, set_ceiling_mib=None,
                   above_set_ceiling=False)
        return row
    guest = None if guest_bytes is None else guest_bytes // policy.MIB
    row.update(guest_mib=guest, balloon_mib=None if guest is None or memory is None else max(0, memory - guest))
    last = (status or {}).get("last")
    if not last:
        row.update(last=None, note="waiting for the guest agent", set_ceiling_mib=None, above_set_ceiling=False)
        return row
    numbers = last.get("numbers", {})
    ceiling = last.get("set_ceiling_mib", numbers.get("set_ceiling_mib"))
    target = (last.get("achieved") or {}).get("balloon_target_mib", last.get("balloon_target_mib"))
    above = bool(ceiling) and max(target or 0, guest or 0) > ceiling
    row.update(heap_used_mib=numbers.get("heap_used_mib"), heap_committed_mib=numbers.get("heap_committed_mib"),
               set_ceiling_mib=ceiling, above_set_ceiling=above,
               last=f"{last.get('action', last.get('event'))}: {last.get('reason', '')}", decision=last)
    if above:
        row["note"] = (f"above the {ceiling}M set by `balloon set`: the guest needs more, "
                       f"so it got memory back rather than starve")
    return row


def fleet_status() -> dict | None:
    """The brain's view of the host (budget, each VM's target and floor), if a brain is alive."""
    from jvmkit.fleet import lease

    alive, _why = lease.brain_alive()
    if not alive:
        return None
    return lease.read_json(lease.brain_dir() / "status.json")


def budget_line(fleet: dict | None) -> str | None:
    """The budget's use, one line (pure)."""
    if not fleet:
        return None
    line = (f"host budget {fleet['budget_mib']}M ({fleet.get('budget_from', '?')}): "
            f"{fleet.get('counted_mib', 0)}M in use now")
    if fleet.get("floors_mib") is not None:
        line += f", {fleet.get('allotted_mib')}M allotted, floors {fleet['floors_mib']}M"
    line += f" (QEMU overheads included); brain pid {fleet.get('pid')}"
    if fleet.get("short_mib"):
        line += f"; {fleet['short_mib']}M of growth short"
    waiting = fleet.get("waiting") or {}
    if waiting:
        line += "; waiting for admission: " + ", ".join(f"{n} ({mib}M)" for n, mib in sorted(waiting.items()))
    return line


def status_rows(name: str | None, fleet: dict | None = None) -> list[dict]:
    runs = [rundir.find(name)] if name else rundir.running()
    rows = []
    for run in runs:
        state = run.read_state()
        guest = status = None
        if has_agent(state):
            try:
                guest = host.device_for(run.qmp_socket, state).read()["actual"]
            except (QmpError, OSError, KeyError):
                guest = None
            try:
                status = json.loads((run.path / STATUS_FILE).read_text())
            except (OSError, ValueError):
                status = None
        rows.append(status_row(run.name, state, status, guest, fleet))
    return rows


def set_target(name: str, target_mib: int, timeout: float) -> dict:
    run = rundir.find(name)
    state = run.read_state()
    if not has_agent(state):
        raise UsageError(f"VM {name!r} has no balloon agent: it was started without --balloon",
                         hint="run it with `jvmkit run --balloon` to let `balloon set` shrink its heap")
    memory = int(state.get("memory_mib") or 0)
    if target_mib > memory:
        raise UsageError(f"SIZE {target_mib}M is above {name}'s memory ({memory}M)",
                         hint="a balloon can only give back memory the VM was started with")
    result_path = run.path / RESULT_FILE
    result_path.unlink(missing_ok=True)
    tmp = run.path / (REQUEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"target_mib": target_mib, "time": time.time()}))
    tmp.replace(run.path / REQUEST_FILE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(result_path.read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
    raise JvmkitError(f"the balloon of {name} did not answer within {timeout:g}s",
                      hint="is the guest agent up? see `jvmkit balloon status`")


def set_line(name: str, result: dict) -> str:
    """The human answer to `balloon set` (pure)."""
    line = f"{name}: guest memory target {result['target_mib']}M"
    if result.get("floor_limited"):
        line += f" (asked {result['requested_mib']}M; {result.get('why') or 'stopped at the floor'})"
    elif result["target_mib"] < result["requested_mib"]:
        line += f" (asked {result['requested_mib']}M; the guest needs no more)"
    return line
