"""Helpers the VM tests share: an OSv kernel to boot, a balloon log to read, a bounded wait, the
phases sample's wake-up."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def osv_kernel_path() -> str | None:
    """A real OSv kernel: $JVMKIT_OSV_KERNEL, else the bootable one most recently used in the cache
    (call it at import, before the fixtures switch to an empty cache)."""
    from jvmkit.packager.kernels import osv

    if os.environ.get(osv.KERNEL_ENV):
        return os.environ[osv.KERNEL_ENV]
    try:
        cached = osv.cached_osv_kernel()
    except Exception:  # noqa: BLE001 - an unreadable cache just means no kernel
        return None
    return str(cached.path) if cached is not None else None


def require_osv_kernel(what: str) -> str:
    """osv_kernel_path(), or skip the calling test module (at import) with the reason and the fix."""
    kernel = osv_kernel_path()
    if kernel is None:
        pytest.skip("no OSv kernel: set JVMKIT_OSV_KERNEL=/path/to/loader-stripped.elf or run "
                    f"`jvmkit kernel import osv PATH` ({what} skipped)", allow_module_level=True)
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip(f"qemu-system-x86_64 is not installed ({what} skipped)", allow_module_level=True)
    return kernel


def read_log(path: Path) -> list[dict]:
    """The JSON lines of a --balloon-log so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str):
    """The first truthy value of `predicate()`, polled every 0.5 s; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def wake_app(port: int) -> None:
    """End the idle phase of samples/phases (the first connection to its PORT does), through a
    host port forwarded to it."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.recv(1)  # the app closes it: the connection reached the guest
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class PhasesRun:
    """samples/phases (grow GROW_MB, hold 3 s, drop, idle up to IDLE_S or until a connection to
    GUEST_PORT, grow again) under `jvmkit run --balloon`, its log at LOG and GUEST_PORT published
    on WAKE_PORT; `wait_phase(name)` reads its output up to that phase."""

    def __init__(self, image: Path, log: Path, name: str, wake_port: int, grow_mb: int, idle_s: int,
                 guest_port: int = 9099):
        self.out_lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jvmkit", "run", "--balloon", "--balloon-log", str(log), "--balloon-interval",
             "1.5", "--name", name, "-p", f"{wake_port}:{guest_port}", str(image), "--", str(grow_mb), "3",
             str(idle_s), str(guest_port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def wait_phase(self, name: str, timeout: float) -> None:
        def reached():
            line = self.proc.stdout.readline()
            self.out_lines.append(line)
            return line.startswith(f"phase {name}")

        wait_for(reached, timeout, f"the app's phase {name!r}")

    def finish(self, timeout: float) -> tuple[str, str]:
        """The rest of the run: (all its output, its stderr)."""
        rest, err = self.proc.communicate(timeout=timeout)
        return "".join(self.out_lines) + rest, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
