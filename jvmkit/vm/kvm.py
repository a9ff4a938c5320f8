"""The KVM probe: use KVM only after a real guest has run on it.

`/dev/kvm` existing proves nothing (some sandboxes expose a KVM that cannot run ordinary guests).
Two depths of probe:
- kernel: boots the guest kernel jvmkit is about to run (no root filesystem) under `-accel kvm`; KVM
  is usable when the kernel gets to the end of its boot (a Linux "Kernel panic ... VFS" for lack of
  a root, or OSv's banner) and QEMU ends by itself. A KVM that cannot run ordinary guests hangs or
  reports "emulation failure" here, even when a boot sector runs.
- boot sector: with no kernel at hand (`jvmkit doctor --probe-kvm`), a 512-byte boot sector that
  writes to QEMU's isa-debug-exit port. It proves less, so its verdict is marked as such and a
  kernel probe replaces it at the next `jvmkit run`.
Verdicts are cached per host kernel, QEMU version and /dev/kvm identity in `kvm-probe.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from jvmkit import cache, fileio, proc
from jvmkit.errors import JvmkitError
from jvmkit.vm import qemu, rundir, sandbox
from jvmkit.vm.qemu import QEMU, host_key

PROBE_VALUE = 0x31
# mov al, 0x31 ; out 0xf4, al ; hlt ; jmp $-1   (then the 0x55AA boot signature)
BOOT_SECTOR = bytes([0xB0, PROBE_VALUE, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD]).ljust(510, b"\0") + b"\x55\xaa"
EXPECTED_STATUS = (PROBE_VALUE << 1) | 1
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class KvmVerdict:
    usable: bool
    reason: str
    host: str            # what the verdict is keyed by
    probed_at: float
    depth: str = "kernel"  # "kernel" or "boot-sector"

    def to_dict(self) -> dict:
        return asdict(self)


def host_identity(qemu: str = QEMU) -> str:
    try:
        st = os.stat("/dev/kvm")
        dev = f"kvm:{st.st_rdev}"
    except OSError:
        dev = "kvm:none"
    return f"{host_key(qemu)}|{dev}"


probe_argv = qemu.kvm_boot_sector_argv


def interpret(returncode: int | None, output: str) -> tuple[bool, str]:
    """Judge a probe run (pure)."""
    if returncode == EXPECTED_STATUS:
        return True, "a test guest ran under KVM"
    text = " ".join(output.split())
    if returncode is None:
        return False, "the KVM test guest did not finish in time"
    if "emulation failure" in text or "internal error" in text.lower():
        return False, "/dev/kvm exists but cannot run guests (KVM internal error: emulation failure)"
    if "Permission denied" in text:
        return False, "no permission to open /dev/kvm (add yourself to the kvm group)"
    if "No such file" in text or "Could not access KVM" in text:
        return False, "/dev/kvm is not available"
    return False, f"the KVM test guest failed (QEMU exit {returncode}: {text[:160] or 'no message'})"


KERNEL_OK = ("Kernel panic", "VFS: Unable to mount root", "OSv v")
KERNEL_PROBE_TIMEOUT = 20.0
KERNEL_SILENCE_LIMIT = 6.0


def interpret_kernel(console: str, qemu_output: str, ended: bool) -> tuple[bool, str]:
    """Judge a kernel probe (pure): the kernel must reach the end of its boot under KVM."""
    text = " ".join(qemu_output.split())
    if "emulation failure" in text or "internal error" in text.lower():
        return False, "/dev/kvm exists but cannot run guests (KVM internal error: emulation failure)"
    if any(mark in console for mark in KERNEL_OK):
        return True, "a test boot of the guest kernel ran under KVM"
    errors = [l.split(": ", 1)[-1] for l in qemu_output.splitlines() if l.strip() and "warning" not in l]
    if ended and errors:
        return False, f"/dev/kvm exists but a test guest failed under KVM (QEMU: {errors[0][:160]})"
    if not console.strip():
        return False, "/dev/kvm exists but a test guest kernel printed nothing under KVM (it cannot run guests)"
    if not ended:
        return False, "a test guest kernel started under KVM but did not finish booting in time"
    return False, f"a test guest kernel failed under KVM: {text[:160] or 'no message'}"


def run_kernel_probe(qemu_bin: str, kernel: Path) -> KvmVerdict:
    host = host_identity(qemu_bin)
    with tempfile.TemporaryDirectory(prefix="jvmkit-kvm-probe.") as tmp:
        log = Path(tmp) / "console.log"
        try:
            confinement = sandbox.probe_confinement(qemu_bin, rundir.uids_in_use())
            probe = proc.start(qemu.kvm_kernel_argv(qemu_bin, kernel, log, confinement), what="the KVM probe's QEMU",
                               stdout=proc.PIPE, stderr=proc.STDOUT, text=True)
        except JvmkitError as exc:
            return KvmVerdict(False, exc.message, host, time.time())
        start = time.monotonic()
        ended = False
        while True:
            if probe.poll() is not None:
                ended = True
                break
            elapsed = time.monotonic() - start
            console = log.read_text(errors="replace") if log.exists() else ""
            if elapsed > KERNEL_PROBE_TIMEOUT or (elapsed > KERNEL_SILENCE_LIMIT and not console.strip()):
                break
            if any(mark in console for mark in KERNEL_OK):
                break
            time.sleep(0.1)
        if probe.poll() is None:
            probe.kill()
        output = probe.communicate()[0] or ""
        console = log.read_text(errors="replace") if log.exists() else ""
    usable, reason = interpret_kernel(console, output, ended)
    return KvmVerdict(usable, reason, host, time.time(), depth="kernel")


def run_probe(qemu: str = QEMU, kernel: Path | None = None) -> KvmVerdict:
    host = host_identity(qemu)
    if not os.path.exists("/dev/kvm"):
        return KvmVerdict(False, "/dev/kvm does not exist", host, time.time())
    if kernel is not None:
        return run_kernel_probe(qemu, kernel)
    with tempfile.TemporaryDirectory(prefix="jvmkit-kvm-probe.") as tmp:
        image = Path(tmp) / "probe.img"
        image.write_bytes(BOOT_SECTOR)
        try:
            done = proc.run(probe_argv(qemu, image), what="the KVM probe's QEMU", timeout=PROBE_TIMEOUT,
                            check=False, timeout_is_error=False)
            usable, reason = interpret(done.returncode, (done.stdout or "") + (done.stderr or ""))
        except JvmkitError as exc:
            usable, reason = False, exc.message
    if usable:
        reason += " (a boot-sector test only; the first `jvmkit run` tests a real kernel)"
    return KvmVerdict(usable, reason, host, time.time(), depth="boot-sector")


def _verdict_path() -> Path:
    return cache.cache_root() / "kvm-probe.json"


def cached_verdict(qemu: str = QEMU) -> KvmVerdict | None:
    try:
        data = json.loads(_verdict_path().read_text())
        verdict = KvmVerdict(**data)
    except (OSError, ValueError, TypeError):
        return None
    return verdict if verdict.host == host_identity(qemu) else None


def kvm_verdict(qemu: str = QEMU, refresh: bool = False, kernel: Path | None = None) -> KvmVerdict:
    """The cached verdict for this host, probing (once) when there is none.

    A boot-sector verdict that said "usable" is probed again with a kernel once one is given."""
    if not refresh:
        verdict = cached_verdict(qemu)
        if verdict is not None and (verdict.depth == "kernel" or kernel is None or not verdict.usable):
            return verdict
    verdict = run_probe(qemu, kernel)
    fileio.atomic_write_bytes(_verdict_path(), json.dumps(verdict.to_dict(), indent=2).encode())
    return verdict
