"""Helpers the VM tests share: an OSv kernel to boot, a balloon log to read, a bounded wait, the
phases sample's wake-up."""

from __future__ import annotations

import json
import os
import socket
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
