"""`jvmkit export IMAGE --format libvirt|kubevirt -o DIR`, for every target (Target.export hands
these formats here).

libvirt: DIR/domain.xml plus the boot files, unpacked from the bundle, at the absolute paths the XML
names; the consoles go to DIR/console.log (and DIR/app.log when the app has its own serial port).
The kernel command line is the one `jvmkit run` uses (the target's boot plan with no per-run
request); the domain has no guest agent seed, so an exported domain runs without the JVM-aware
agent unless `jvmkit run --engine libvirt` starts it.

kubevirt: see engines/kubevirt.py.

DIR is built next to its final place and renamed into it, so a failed export leaves nothing
half-written; an existing DIR is replaced only if it holds an earlier export.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from jvmkit import fileio, ui
from jvmkit.engines import libvirt_xml
from jvmkit.errors import UsageError
from jvmkit.packager import zstd
from jvmkit.packager.targets.base import BootRequest
from jvmkit.units import mib_text

MARKERS = ("domain.xml", "virtualmachine.yaml")   # what makes a directory an earlier export


def domain_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:60] or "jvmkit"


def raw_name(path: str) -> str:
    """The file name of a bundle file once unpacked: `vmlinux.zst` -> `vmlinux`."""
    name = Path(path).name
    return name[:-4] if name.endswith(".zst") else name


def unpack_file(image, role: str, dest: Path) -> Path:
    """The bundle's file `role`, uncompressed, at `dest` (atomically)."""
    record = image.manifest.files[role]
    with fileio.atomic_open(dest) as out:
        if record.compression == "zstd":
            zstd.unpack_checked(image.file(role), record, out, f"image {image.path}: its {role} ({record.path})")
        else:
            with open(image.file(role), "rb") as src:
                shutil.copyfileobj(src, out)
    return dest


def _no_secrets(name: str, data: bytes) -> Path:
    raise AssertionError(f"an export asked for a per-run secret ({name}); exports carry none")


def run_settings(image, target, *, memory_mib: int | None, cpus: int | None, publish: tuple[str, ...]):
    """(memory, cpus, forwards) for an export, checked the way `jvmkit run` checks them."""
    from jvmkit.vm import runner

    manifest = image.manifest
    memory = memory_mib or manifest.defaults.memory_mib
    cpus = cpus or manifest.defaults.cpus
    asked = f"--memory {mib_text(memory)}" if memory_mib else f"the image's default memory ({mib_text(memory)})"
    target.memory_floor(manifest.files).check(memory, asked, str(image.path), explicit=bool(memory_mib))
    if not 1 <= cpus <= 64:
        raise UsageError(f"--cpus {cpus} is out of range (1-64)")
    forwards = [runner.parse_publish(p) for p in publish]
    runner.check_publish(forwards)
    return memory, cpus, tuple(forwards)


def prepare_dest(dest: Path) -> Path:
    dest = Path(dest).absolute()
    if dest.exists():
        if not dest.is_dir():
            raise UsageError(f"-o {dest} exists and is not a directory", hint="give a directory to write the export to")
        if any(dest.iterdir()) and not any((dest / m).exists() for m in MARKERS):
            raise UsageError(f"-o {dest} is not empty and holds no earlier jvmkit export",
                             hint="give a new or empty directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def publish_dir(staging: Path, dest: Path) -> None:
    """Move the finished staging directory into place (replacing an earlier export)."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, old / "export")
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dest)


def export_libvirt(target, image, dest: Path, *, publish: tuple[str, ...] = (), memory_mib: int | None = None,
                   cpus: int | None = None, accel: str = "kvm", **_) -> Path:
    manifest = image.manifest
    memory, cpus, forwards = run_settings(image, target, memory_mib=memory_mib, cpus=cpus, publish=publish)
    if manifest.boot.machine not in libvirt_xml.ROOT_BUS:
        raise UsageError(f"image {image.path} asks for machine type {manifest.boot.machine!r}, which the libvirt "
                         f"export does not know (known: {', '.join(libvirt_xml.ROOT_BUS)})")
    dest = prepare_dest(dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial.", dir=dest.parent))
    try:
        final = {role: dest / raw_name(record.path) for role, record in manifest.files.items()}
        with ui.current().step("unpacking the boot files"):
            for role in sorted(final):
                unpack_file(image, role, staging / final[role].name)
        plan = target.boot_plan(manifest, final, BootRequest(), _no_secrets)
        spec = libvirt_xml.DomainSpec(
            name=domain_name(manifest.name), plan=plan, memory_mib=memory, cpus=cpus, accel=accel,
            console_log=dest / "console.log", app_log=dest / "app.log" if libvirt_xml.app_log_needed(plan) else None,
            ports=forwards, image=manifest.name, target=manifest.target)
        fileio.atomic_write_bytes(staging / "domain.xml", libvirt_xml.domain_xml(spec).encode())
        os.chmod(staging, 0o755)
        publish_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def export(target, image, fmt: str, dest: Path, **options) -> Path:
    if fmt == "libvirt":
        return export_libvirt(target, image, dest, **options)
    if fmt == "kubevirt":
        from jvmkit.engines import kubevirt

        return kubevirt.export_kubevirt(target, image, dest, **options)
    raise UsageError(f"--format {fmt!r} is not an engine format")
