"""The balloon brain's lease, as each VM's `jvmkit run --balloon` process holds it.

One decision-maker per host (per run root, see jvmkit.vm.rundir): the brain (jvmkit.fleet.brain)
holds an exclusive lock on `<run root>/.brain/lock` and writes `<run root>/.brain/heartbeat.json`
every half second. Each `jvmkit run --balloon` process stays its VM's supervisor: it starts a brain
when none holds the lock, and while its VM runs a `LeaseWatch` thread checks once a second that
the brain is there (the lock is held) and alive (the heartbeat is younger than `LEASE_S`). If not,
the brain died or hangs: the watch deflates its own balloon to the ceiling over QMP at once (no
guest stays squeezed), says so on stderr and in --balloon-log, and starts a new brain after
`RESPAWN_S` if the lock is free. A hung brain keeps its lock, so no second brain starts; the VMs
stay deflated until it answers again.

The watch also prints the brain's decisions for this VM (`jvmkit-balloon: NAME: ...`), as the
per-VM controller used to.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

from jvmkit import proc, ui
from jvmkit.fileio import atomic_write_bytes
from jvmkit.vm import rundir

LEASE_S = 4.0        # a heartbeat older than this: the brain hangs (it writes one every 0.5 s)
RESPAWN_S = 10.0     # after losing the brain this long (and its lock is free), start a new one
WATCH_S = 1.0
BRAIN_DIR = ".brain"
FLEET_DIR = ".fleet"


def brain_dir(root: Path | None = None) -> Path:
    path = (root or rundir.run_root()) / BRAIN_DIR
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def fleet_dir(root: Path | None = None) -> Path:
    path = (root or rundir.run_root()) / FLEET_DIR
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def lock_held(root: Path | None = None) -> bool:
    """Some process (the brain) holds the brain lock."""
    try:
        fd = os.open(brain_dir(root) / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we got
    return False


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def heartbeat(root: Path | None = None) -> dict | None:
    return read_json(brain_dir(root) / "heartbeat.json")


def brain_alive(root: Path | None = None, lease_s: float = LEASE_S, now: float | None = None) -> tuple[bool, str]:
    """(alive, why not): the lock is held and the heartbeat is fresh."""
    if not lock_held(root):
        return False, "the balloon brain is gone (its lock is free)"
    beat = heartbeat(root)
    age = (now or time.time()) - float((beat or {}).get("time", 0))
    if age > lease_s:
        return False, f"the balloon brain does not answer (last heartbeat {age:.1f}s ago)"
    return True, ""


def start_brain(root: Path | None = None) -> int | None:
    """Start a brain unless one holds the lock; returns its pid (a brain that finds the lock
    taken exits at once, so racing starters are harmless)."""
    if lock_held(root):
        return None
    bdir = brain_dir(root)
    log = open(bdir / "brain.log", "ab")
    try:
        child = proc.start([sys.executable, "-m", "jvmkit.fleet.brain"], what="the balloon brain", stdout=log,
                           stderr=proc.STDOUT, start_new_session=True, cwd=os.getcwd())
    finally:
        log.close()
    return child.pid


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, sort_keys=True).encode())


# ---- claims: VMs waiting for admission ----------------------------------------------------------
# `jvmkit up` writes `.brain/claims/NAME.json` ({"mib": floor + overhead, "pid", "until"}) for a VM
# that does not fit yet; the brain counts the claims in its decisions (fleet_policy's waiting_mib),
# so the idle VMs' shrinker hooks make room. A claim whose writer died or whose time ran out counts
# no more and is removed by the next reader.

def claims_dir(root: Path | None = None) -> Path:
    path = brain_dir(root) / "claims"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_claim(name: str, mib: int, until: float, root: Path | None = None) -> None:
    write_json(claims_dir(root) / f"{name}.json", {"name": name, "mib": int(mib), "pid": os.getpid(),
                                                    "until": until})


def remove_claim(name: str, root: Path | None = None) -> None:
    (claims_dir(root) / f"{name}.json").unlink(missing_ok=True)


def read_claims(root: Path | None = None, now: float | None = None) -> dict[str, int]:
    """name -> MiB of the live claims (dead or expired ones are removed)."""
    now = time.time() if now is None else now
    result = {}
    for path in sorted(claims_dir(root).glob("*.json")):
        data = read_json(path)
        if not data or not rundir.pid_alive(data.get("pid")) or float(data.get("until") or 0) < now:
            path.unlink(missing_ok=True)
            continue
        result[str(data.get("name") or path.stem)] = max(0, int(data.get("mib") or 0))
    return result


class LeaseWatch:
    """The dead man's switch of one VM: deflate when the brain goes away (see the module)."""

    def __init__(self, name: str, run_dir: Path, qmp_socket: Path, memory_mib: int, log_path: Path | None,
                 root: Path | None = None, lease_s: float = LEASE_S, respawn_s: float = RESPAWN_S):
        self.name, self.run_dir, self.qmp_socket, self.memory_mib = name, run_dir, qmp_socket, memory_mib
        self.log_path, self.root, self.lease_s, self.respawn_s = log_path, root, lease_s, respawn_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"lease-{name}", daemon=True)
        self.lost_since: float | None = None
        self.last_spawn = 0.0
        self.printed = 0.0

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def log(self, event: str, **data) -> None:
        record = {"time": round(time.time(), 3), "vm": self.name, "event": event, **data}
        if self.log_path:
            try:
                with open(self.log_path, "a") as handle:
                    handle.write(json.dumps(record, sort_keys=True) + "\n")
            except OSError:
                pass

    def deflate(self) -> int | None:
        """Deflate the balloon to the ceiling if it holds anything; returns the size it had."""
        from jvmkit.balloon.host import device_for
        from jvmkit.vm.qmp import QmpError

        try:
            try:
                state = json.loads((self.run_dir / "state.json").read_text())
            except (OSError, ValueError):
                state = {}
            balloon = device_for(self.qmp_socket, state)  # QMP, or libvirt for --engine libvirt
            actual = balloon.read()["actual"] // 2**20
            if actual < self.memory_mib:
                balloon.set(self.memory_mib * 2**20)
                return actual
        except (QmpError, OSError, KeyError, TypeError):
            pass
        return None

    def check(self, now: float | None = None) -> None:
        """One look at the brain (the thread calls this every WATCH_S)."""
        now = now or time.time()
        alive, why = brain_alive(self.root, self.lease_s, now)
        if alive:
            if self.lost_since is not None:
                self.log("brain-back", reason="the balloon brain is back")
                self.lost_since = None
            return
        before = self.deflate()
        if self.lost_since is None:
            self.lost_since = now
            reason = f"{why}: balloon deflated to the ceiling ({self.memory_mib}M)"
            if before is not None:
                reason += f", it left the guest {before}M"
            self.log("brain-lost", action="grow", balloon_target_mib=self.memory_mib, reason=reason)
            ui.current().notice(f"jvmkit-balloon: {self.name}: {reason}")
        elif now - self.lost_since >= self.respawn_s and now - self.last_spawn >= self.respawn_s:
            self.last_spawn = now
            if start_brain(self.root):
                self.log("brain-start", reason="started a new balloon brain")

    def print_decisions(self) -> None:
        """The brain's latest non-hold decision for this VM, once, on stderr."""
        status = read_json(self.run_dir / "balloon.json") or {}
        last = status.get("last") or {}
        stamp = float(last.get("time", 0))
        if stamp <= self.printed:
            return
        self.printed = stamp
        if last.get("event") in ("decision", "lost-contact", "connected", "request") and last.get("action", "x") != "hold":
            ui.current().info(f"jvmkit-balloon: {self.name}: {last.get('reason', last.get('event'))}")

    def run(self) -> None:
        self.last_spawn = time.time()
        start_brain(self.root)
        grace_until = time.time() + self.respawn_s  # the brain we started needs a moment to take its lock
        while not self.stop.wait(WATCH_S):
            try:
                if time.time() >= grace_until or lock_held(self.root):
                    self.check()
                self.print_decisions()
            except Exception as exc:  # the watch must not die: it is the VM's safety
                ui.current().warn(f"jvmkit-balloon: {self.name}: lease watch: {type(exc).__name__}: {exc}")
