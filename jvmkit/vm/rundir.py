"""Run directories: one per running VM, so later commands find it.

`<run root>/<name>/` (run root: `$XDG_RUNTIME_DIR/jvmkit`, else `<cache>/run`) holds `state.json`
(name, QEMU and jvmkit pids, image, ports, QMP socket, JMX port), the QMP socket, the console log
and the per-run seed (mode 0600). `jvmkit ps`, `stop` and `balloon` read them; entries whose
processes are gone are removed on sight.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from jvmkit import cache
from jvmkit.errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def run_root() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "jvmkit" if xdg and os.access(xdg, os.W_OK) else cache.cache_root() / "run"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        path = self.path / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return path

    def write_state(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.state_file)

    def read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


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


def prune_stale() -> None:
    root = run_root()
    for entry in root.iterdir():
        if not entry.is_dir():
            continue
        state = RunDir(entry.name, entry).read_state()
        if state and not pid_alive(state.get("jvmkit_pid")) and not pid_alive(state.get("qemu_pid")):
            shutil.rmtree(entry, ignore_errors=True)


def running() -> list[RunDir]:
    prune_stale()
    result = []
    for entry in sorted(run_root().iterdir()):
        run = RunDir(entry.name, entry)
        if entry.is_dir() and run.read_state().get("qemu_pid"):
            result.append(run)
    return result


def find(name: str) -> RunDir:
    for run in running():
        if run.name == name:
            return run
    names = [r.name for r in running()]
    raise UsageError(f"no running VM named {name!r}",
                     hint=f"running: {', '.join(names)}" if names else "no VMs are running; see `jvmkit ps`")
