"""`jvmkit balloon status|set`: talking to running VMs through their run directories.

A VM run with `--balloon` has a controller (jvmkit.balloon.host) that writes its last decision to
the run directory and takes `balloon set` requests from there. A VM without one is driven over
QMP directly, with the default floor.
"""

from __future__ import annotations

import json
import time

from jvmkit.vm import rundir
from jvmkit.balloon import policy
from jvmkit.balloon.host import REQUEST_FILE, RESULT_FILE, STATUS_FILE, QmpBalloon
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.vm.qmp import QmpError


def status_rows(name: str | None) -> list[dict]:
    runs = [rundir.find(name)] if name else rundir.running()
    rows = []
    for run in runs:
        state = run.read_state()
        row = {"name": run.name, "memory_mib": state.get("memory_mib"), "controlled": bool(state.get("balloon"))}
        try:
            row["guest_mib"] = QmpBalloon(run.qmp_socket).read()["actual"] // policy.MIB
        except (QmpError, OSError, KeyError):
            row["guest_mib"] = None
        try:
            status = json.loads((run.path / STATUS_FILE).read_text())
            last = status["last"]
            numbers = last.get("numbers", {})
            row.update(heap_used_mib=numbers.get("heap_used_mib"), heap_committed_mib=numbers.get("heap_committed_mib"),
                       last=f"{last.get('action', last.get('event'))}: {last.get('reason', '')}", decision=last)
        except (OSError, ValueError, KeyError):
            row["last"] = None
        rows.append(row)
    return rows


def set_target(name: str, target_mib: int, timeout: float) -> dict:
    run = rundir.find(name)
    state = run.read_state()
    memory = int(state.get("memory_mib") or 0)
    if target_mib > memory:
        raise UsageError(f"SIZE {target_mib}M is above {name}'s memory ({memory}M)",
                         hint="a balloon can only give back memory the VM was started with")
    if state.get("balloon"):
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
    floor = policy.default_floor_mib(memory)
    target = max(target_mib, floor)
    try:
        QmpBalloon(run.qmp_socket).set(target * policy.MIB)
    except (QmpError, OSError) as exc:
        raise JvmkitError(f"cannot reach QEMU of {name}: {exc}") from None
    return {"requested_mib": target_mib, "target_mib": target, "floor_limited": target > target_mib,
            "reason": f"no JVM balloon for {name}: plain virtio-balloon, floor {floor}M"}
