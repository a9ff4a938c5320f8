"""The KVM probe: use KVM only after a real guest has run on it.

`/dev/kvm` existing proves nothing (some sandboxes expose a KVM that cannot run ordinary guests).
The probe boots a 512-byte boot sector under `-accel kvm` that writes a value to QEMU's
isa-debug-exit port; only when QEMU exits with the matching status is KVM usable. The verdict is
cached per host kernel, QEMU version and /dev/kvm identity in the cache's `kvm-probe.json`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from jvmkit import cache
from jvmkit.qemu import QEMU, qemu_version

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

    def to_dict(self) -> dict:
        return asdict(self)


def host_identity(qemu: str = QEMU) -> str:
    try:
        st = os.stat("/dev/kvm")
        dev = f"kvm:{st.st_rdev}"
    except OSError:
        dev = "kvm:none"
    return f"{platform.release()}|qemu:{qemu_version(qemu)}|{dev}"


def probe_argv(qemu: str, image: Path) -> list[str]:
    return [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "pc", "-accel", "kvm", "-m", "16M",
            "-drive", f"file={image},format=raw,if=ide",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]


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


def run_probe(qemu: str = QEMU) -> KvmVerdict:
    host = host_identity(qemu)
    if not os.path.exists("/dev/kvm"):
        return KvmVerdict(False, "/dev/kvm does not exist", host, time.time())
    with tempfile.TemporaryDirectory(prefix="jvmkit-kvm-probe.") as tmp:
        image = Path(tmp) / "probe.img"
        image.write_bytes(BOOT_SECTOR)
        try:
            proc = subprocess.run(probe_argv(qemu, image), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=PROBE_TIMEOUT)
            usable, reason = interpret(proc.returncode, proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired:
            usable, reason = interpret(None, "")
        except OSError as exc:
            usable, reason = False, f"could not start {qemu}: {exc.strerror}"
    return KvmVerdict(usable, reason, host, time.time())


def _verdict_path() -> Path:
    return cache.cache_root() / "kvm-probe.json"


def cached_verdict(qemu: str = QEMU) -> KvmVerdict | None:
    try:
        data = json.loads(_verdict_path().read_text())
        verdict = KvmVerdict(**data)
    except (OSError, ValueError, TypeError):
        return None
    return verdict if verdict.host == host_identity(qemu) else None


def kvm_verdict(qemu: str = QEMU, refresh: bool = False) -> KvmVerdict:
    """The cached verdict for this host, probing (once) when there is none."""
    if not refresh:
        verdict = cached_verdict(qemu)
        if verdict is not None:
            return verdict
    verdict = run_probe(qemu)
    cache.atomic_write_bytes(_verdict_path(), json.dumps(verdict.to_dict(), indent=2).encode())
    return verdict
