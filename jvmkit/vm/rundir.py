"""Run directories: one per running VM, so later commands find it.

`<run root>/<name>/` (run root: `$XDG_RUNTIME_DIR/jvmkit`, else `<cache>/run`) holds `state.json`
(name, QEMU and jvmkit pids, image, ports, QMP socket, JMX port, QEMU's dynamic uid), the QMP
socket, the console log (capped: vm/consolelog.py), the per-run seed and, when jvmkit is root,
the empty directory QEMU chroots into (`root/`). The run root and every run directory are 0700,
the state and secrets 0600, and QEMU creates its socket with umask 077: another local user reads
no credentials, console or state of a VM and cannot connect to its QMP socket. `jvmkit ps`, `stop`
and `balloon` read them; entries whose processes are gone are removed on sight.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jvmkit import cache, fileio
from jvmkit.errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def run_root() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "jvmkit" if xdg and os.access(xdg, os.W_OK) else cache.cache_root() / "run"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = base.stat()
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(base, 0o700)  # made wider by an older jvmkit or a umask: state and sockets are inside
    return base


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunDir:
    name: str
    path: Path

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def qmp_socket(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    def secret_file(self, name: str) -> Path:
        return self.path / name

    def write_secret(self, name: str, data: bytes) -> Path:
        return fileio.write_private(self.path / name, data)

    def write_state(self, state: dict) -> None:
        fileio.atomic_write_bytes(self.state_file, json.dumps(state, indent=2, sort_keys=True).encode(), mode=0o600)

    def read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def remove(self) -> None:
        """Remove the directory. The balloon brain may write its status file here until it sees the
        VM gone (~0.5 s): a file it renames into place while rmtree runs leaves the directory
        behind (CI saw `cache-1/` holding only balloon.json after `jvmkit down`), so try again."""
        for attempt in range(6):
            shutil.rmtree(self.path, ignore_errors=True)
            if not self.path.exists():
                return
            time.sleep(0.25)


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"VM name {name!r} is not valid",
                         hint="use letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name


def create(base_name: str, explicit: bool) -> RunDir:
    """A new run directory; an explicit --name must not be in use, otherwise a suffix is added."""
    root = run_root()
    prune_stale()
    name = validate_name(base_name) if explicit else re.sub(r"[^A-Za-z0-9_.-]", "-", base_name)[:48] or "vm"
    if explicit:
        candidates = [name]
    else:
        candidates = [f"{name}-{secrets.token_hex(3)}" for _ in range(20)]
    for candidate in candidates:
        path = root / candidate
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return RunDir(candidate, path)
    raise UsageError(f"a VM named {name!r} is already running", hint="choose another --name or `jvmkit stop` it")


STATELESS_S = 300.0  # a run directory without a state.json this long (since its last change) is a leftover


def prune_stale(now: float | None = None) -> None:
    """Remove the run directories of VMs whose processes are gone, and leftovers without a state
    file (a VM writes one right after `create`), which would keep their name taken."""
    root = run_root()
    now = time.time() if now is None else now
    for entry in root.iterdir():
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        state = RunDir(entry.name, entry).read_state()
        if state and not pid_alive(state.get("jvmkit_pid")) and not pid_alive(state.get("qemu_pid")):
            shutil.rmtree(entry, ignore_errors=True)
        elif not state and not (entry / "state.json").exists():
            try:
                age = now - entry.stat().st_mtime
            except OSError:
                continue
            if age > STATELESS_S:
                shutil.rmtree(entry, ignore_errors=True)


def running() -> list[RunDir]:
    prune_stale()
    result = []
    for entry in sorted(run_root().iterdir()):
        run = RunDir(entry.name, entry)
        if entry.is_dir() and run.read_state().get("qemu_pid"):
            result.append(run)
    return result


def uids_in_use() -> set[int]:
    """The dynamic uids of the VMs running now (QEMU's and its passt's)."""
    taken = set()
    for run in running():
        uid = run.read_state().get("qemu_uid")
        if isinstance(uid, int):
            taken |= {uid, uid + 1}
    return taken


def find(name: str) -> RunDir:
    for run in running():
        if run.name == name:
            return run
    names = [r.name for r in running()]
    raise UsageError(f"no running VM named {name!r}",
                     hint=f"running: {', '.join(names)}" if names else "no VMs are running; see `jvmkit ps`")
