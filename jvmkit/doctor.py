"""`jvmkit doctor`: what jvmkit needs, and what it found on this machine.

`report()` gathers facts (each check: name, ok, detail, and a fix when not ok); `render()` turns
them into lines for humans. `ok` is false only for what `pack` or `run` cannot do without.
"""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path

from jvmkit import __version__, cache
from jvmkit.vm import iouring, kvm
from jvmkit.errors import JvmkitError
from jvmkit.vm.qemu import QEMU, qemu_version
from jvmkit.units import human


def _check(name: str, ok: bool, detail: str, fix: str | None = None, required: bool = True) -> dict:
    return {"name": name, "ok": ok, "detail": detail, "fix": None if ok else fix, "required": required}


def kvm_fix(reason: str) -> str | None:
    """What the user can do about an unusable KVM, from the probe's reason (pure); None when there
    is nothing to suggest. (That runs fall back to TCG is said by the check's detail, not here.)"""
    lowered = reason.lower()
    if "permission" in lowered:
        return ("add yourself to the kvm group (sudo usermod -aG kvm $USER, then log in again), "
                "or make /dev/kvm readable and writable for you")
    if "does not exist" in lowered or "not available" in lowered:
        return ("load KVM: sudo modprobe kvm_intel (or kvm_amd), with VT-x/AMD-V enabled in the firmware; "
                "inside a VM, enable nested virtualisation on its host")
    if "/dev/kvm exists" in lowered or "test guest" in lowered:
        return ("this KVM cannot run ordinary guests (common in nested VMs): enable nested virtualisation "
                "where this machine runs (kvm_intel/kvm_amd nested=1 on its host), then `jvmkit doctor --probe-kvm`")
    return None


BACKEND_TEXT = {"slirp": "QEMU's user network behind jvmkit's host filter",
                "pasta": "QEMU's user network in a network namespace of its own, joined to the host by pasta",
                "passt": "passt with its gateway not mapped to the host"}


def network_check() -> dict:
    """Which backend `--network outbound` gets here, and what its guest can still reach of this host."""
    from jvmkit.vm import launch, network

    try:
        choice = launch.plan_network(network.Policy())
    except JvmkitError as exc:
        return _check("network", False, exc.message, exc.hint, required=False)
    text = f"outbound: {BACKEND_TEXT.get(choice.backend, choice.backend)}"
    if choice.exposure is None:
        return _check("network", True, f"{text}; the guest reaches nothing of this host", required=False)
    return _check("network", False, f"{text}; the guest can reach {choice.exposure}",
                  "make /dev/net/tun usable by this user (Debian's udev makes it 0666) and allow user namespaces, "
                  "or run as root, or use --network isolated", required=False)


def report(jdk_path: Path | None = None, probe_kvm: bool = False) -> dict:
    from jvmkit import jdk as jdks

    checks = [_check("jvmkit", True, f"{__version__} on Python {platform.python_version()} ({sys.executable})")]
    try:
        jdk = jdks.find_jdk(jdk_path)
        has_jmods = jdk.jmods is not None or jdk.linkable_runtime
        checks.append(_check("jdk", True, f"{jdk.version} at {jdk.home}"))
        fix = (f"apt-get install openjdk-{jdk.release}-jmods (Debian 13+; on Debian 12 they are in "
               f"openjdk-{jdk.release}-jdk-headless), or --jdk PATH to a JDK with jmods")
        checks.append(_check("jmods", has_jmods, (str(jdk.jmods) if jdk.jmods else "none, but this JDK's jlink links from its own image") if has_jmods else "missing (jlink cannot trim a runtime)", fix))
        for tool in ("jlink", "jdeps", "javac"):
            path = getattr(jdk, tool, None)
            present = bool(path) and Path(path).exists()
            checks.append(_check(tool, present, str(path) if present else "missing", "install a full JDK (not a JRE)"))
    except JvmkitError as exc:
        checks.append(_check("jdk", False, exc.message, exc.hint or "install a JDK with jmods or pass --jdk"))
    qv = qemu_version(QEMU)
    checks.append(_check("qemu", qv is not None, f"{QEMU} {qv} at {shutil.which(QEMU)}" if qv else f"{QEMU} not found",
                         "apt-get install -y qemu-system-x86 qemu-utils"))
    objcopy = shutil.which("objcopy")
    checks.append(_check("objcopy", objcopy is not None, objcopy or "not found (jlink --strip-debug runs it)",
                         "apt-get install -y binutils"))
    img = shutil.which("qemu-img")
    checks.append(_check("qemu-img", img is not None, img or "not found (needed only for `export --format qcow2`)",
                         "apt-get install -y qemu-utils", required=False))
    if qv is not None:
        verdict = kvm.kvm_verdict(QEMU, refresh=True) if probe_kvm else kvm.cached_verdict(QEMU)
        if verdict is None:
            checks.append(_check("kvm", True, "not probed yet (the first `jvmkit run` probes; or `doctor --probe-kvm`)",
                                 required=False))
        else:
            detail = ("usable: " if verdict.usable else "not usable, runs use TCG: ") + verdict.reason
            checks.append(_check("kvm", verdict.usable, detail, kvm_fix(verdict.reason), required=False))
        aio = iouring.io_uring_verdict(QEMU)  # one QEMU start on -machine none, then cached
        detail = aio["reason"] if aio["usable"] else f"{aio['reason']}; OSv root disks use QEMU's thread pool (a little slower)"
        checks.append(_check("io_uring", aio["usable"], detail, None, required=False))  # no fix to offer
    try:
        import jpype  # noqa: F401

        checks.append(_check("jpype", True, f"JPype {jpype.__version__} (for the balloon's JMX client)", required=False))
    except ImportError:
        checks.append(_check("jpype", False, "not importable", "pip install jpype1", required=False))
    checks.append(network_check())
    entries = cache.list_entries()
    by_kind: dict[str, int] = {}
    for e in entries:
        by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(by_kind.items())) or "empty"
    checks.append(_check("cache", True, f"{cache.cache_root()} ({summary}; {human(sum(e.size for e in entries))})"))
    try:
        from jvmkit.packager.kernels import store

        ks = store.list_kernels()
        detail = ", ".join(f"{k['target']} {k['version']}" for k in ks) or "none cached (pack pulls one on first use)"
        checks.append(_check("kernels", True, detail, required=False))
    except Exception as exc:  # a doctor never dies on a broken cache
        checks.append(_check("kernels", False, f"cannot list: {exc}", "jvmkit cache prune --all", required=False))
    ok = all(c["ok"] for c in checks if c["required"])
    return {"ok": ok, "checks": checks}


def render(data: dict) -> str:
    lines = []
    for c in data["checks"]:
        mark = "ok " if c["ok"] else ("-- " if not c["required"] else "!! ")
        lines.append(f"{mark} {c['name']:<9} {c['detail']}")
        if c["fix"]:
            lines.append(f"{'':13}fix: {c['fix']}")
    lines.append("jvmkit is ready" if data["ok"] else "jvmkit is not ready: fix the lines marked !!")
    return "\n".join(lines)
