"""The io_uring probe: give QEMU's block layer `aio=io_uring` only after QEMU opened a drive with it here.

An OSv guest reads its root filesystem from a virtio-blk disk, one 32 KiB segment at a time, each
a round trip through QEMU. With `aio=io_uring` instead of QEMU's thread pool that took ~0.05 s off
an OSv boot under TCG (OSv's own count of its disk time: 127 -> 71 ms for hello). QEMU may be built
without io_uring, and containers often forbid it (Docker's default seccomp profile does), so QEMU
is asked once: open a one-sector drive with `aio=io_uring` on `-machine none` and quit over QMP.
The verdict is cached per host kernel and QEMU version in `aio-probe.json`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from jvmkit import cache, fileio, proc
from jvmkit.errors import JvmkitError
from jvmkit.vm import qemu as qemu_argvs
from jvmkit.vm.qemu import QEMU, host_key

PROBE_TIMEOUT = 20.0
QMP_QUIT = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


probe_argv = qemu_argvs.aio_probe_argv


def interpret(returncode: int | None, stderr: str) -> tuple[bool, str]:
    """(usable, reason) from the probe QEMU's exit status and error output (pure)."""
    if returncode == 0:
        return True, "QEMU opened a drive with aio=io_uring"
    last = [line for line in stderr.splitlines() if line.strip()][-1:]
    detail = last[0].split(": ")[-1] if last else ("timed out" if returncode is None else f"exit {returncode}")
    return False, f"QEMU cannot use aio=io_uring here ({detail})"


def run_probe(qemu: str = QEMU) -> dict:
    with tempfile.TemporaryDirectory(prefix="jvmkit-iouring.") as tmp:
        image = Path(tmp) / "probe.img"
        image.write_bytes(bytes(512))
        try:
            done = proc.run(probe_argv(qemu, image), what="the io_uring probe's QEMU", input=QMP_QUIT,
                            timeout=PROBE_TIMEOUT, check=False, timeout_is_error=False)
            usable, reason = interpret(done.returncode, done.stderr or "")
        except JvmkitError as exc:
            usable, reason = False, exc.message
    return {"usable": usable, "reason": reason, "host": host_key(qemu)}


def _verdict_path() -> Path:
    return cache.cache_root() / "aio-probe.json"


def io_uring_verdict(qemu: str = QEMU) -> dict:
    """The cached verdict for this host kernel and QEMU, probing (once) when there is none."""
    try:
        verdict = json.loads(_verdict_path().read_text())
        if verdict.get("host") == host_key(qemu) and isinstance(verdict.get("usable"), bool):
            return verdict
    except (OSError, ValueError, AttributeError):
        pass
    verdict = run_probe(qemu)
    fileio.atomic_write_bytes(_verdict_path(), json.dumps(verdict, indent=2).encode())
    return verdict


def disk_aio(qemu: str = QEMU) -> str:
    """The `aio=` mode for a VM's root disk: io_uring when the probe allows, else QEMU's thread pool."""
    return "io_uring" if io_uring_verdict(qemu)["usable"] else "threads"
