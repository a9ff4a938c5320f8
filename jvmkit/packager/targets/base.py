"""The `Target` interface: everything that differs between guest kinds lives behind it.

A target (linux, osv) owns, at pack time, how its kernel is found and what its bundle holds; at run
time, the boot plan the runner executes (kernel, initrd or disks, append line, how the per-run
seed and app arguments reach the guest), how its console is split into the app's output and the
guest's own messages, how the app's exit status is read, the smallest guest it can boot, and its
`export` formats. `pack` and `vm.runner` hold no `if target == ...`: adding a third target is one
new module registered in `targets/__init__.py`.
"""

from __future__ import annotations

import os
import re
import select
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, ClassVar

from jvmkit.engines import EXPORT_FORMATS as ENGINE_FORMATS
from jvmkit.errors import UsageError
from jvmkit.units import mib_text
from jvmkit.packager.manifest import FileRecord, Manifest

# The smallest guest any jvmkit image gets: below this a JVM does not start in any target.
JVM_MIN_MEMORY_MIB = 64


@dataclass(frozen=True)
class PackInputs:
    """What `pack` hands a target's bundle writer."""

    kernel: Any                                  # the target's kernel object (resolve_kernel)
    java_argv: tuple[str, ...]                   # the guest java command line, without app arguments
    app_args: tuple[str, ...]                    # the image's default app arguments
    runtime: Path                                # the trimmed runtime on the host
    app_files: tuple[tuple[str, Path], ...]      # (guest path, host file): jars, archives
    agent_jar: Path
    mtime: int                                   # SOURCE_DATE_EPOCH for file times
    agent_flags: tuple[str, ...] = ()            # the guest agent's flags in java_argv (only for --balloon runs)


@dataclass(frozen=True)
class BundleFiles:
    """What a target's writer put into the staging directory: the manifest's `files` and `boot`."""

    files: dict[str, FileRecord]
    boot: Any


@dataclass(frozen=True)
class BootRequest:
    """What one run asks of the image (from `jvmkit run`'s options)."""

    args: tuple[str, ...] | None = None          # None: the image's default app arguments
    seed: bytes | None = None                    # the per-run seed (JMX credentials): starts the agent
    verbose: bool = False


@dataclass(frozen=True)
class BootPlan:
    """How to boot one image once: the runner turns it into a `VmConfig` and QEMU's argv."""

    kernel: Path
    append: str
    machine: str
    initrd: Path | None = None
    disk: Path | None = None                     # the read-only root disk
    data_disks: tuple[Path, ...] = ()            # more raw read-only disks (OSv's seed disk)
    fw_cfg: tuple[tuple[str, Path], ...] = ()    # (name, file): only the file's path reaches the argv
    app_serial: bool = True                      # the app's output on a second serial port (QEMU stdout)
    console_stdio: bool = False                  # one console for guest and app, on QEMU's stdout
    low_memory_mib: int = 1024                   # q35: guest RAM below 4 GiB
    acpi_shutdown: bool = False                  # the guest powers off on ACPI's power button


@dataclass(frozen=True)
class ClusterBoot:
    """How a cluster engine that takes no host files (KubeVirt) boots the image from a container
    image: `kernel` — the boot plan's kernel, initrd and command line (KubeVirt's kernelBoot);
    `disk` — a disk that boots by itself, written by the target's own `export_format`."""

    kind: str = "kernel"                         # "kernel" or "disk"
    export_format: str | None = None             # kind "disk": the target's export format for it
    cmdline: str | None = None                   # the command line for a cluster's network (None: the runner's)


@dataclass(frozen=True)
class RestoreTraits:
    """What differs between targets when a VM is saved and restored (jvmkit.vm.snapshot)."""

    vmgenid: bool = False           # give the VM QEMU's vmgenid device: a kernel with its driver reseeds on restore
    clock: str = "none"             # how the guest agent steps the wall clock after a restore: busybox-date, none
    settle_s: float = 0.0           # after the trim, how long the guest takes to hand its free pages to the host
    note: str = ""                  # what a restore cannot renew in this guest (README, inspect)


@dataclass(frozen=True)
class MemoryFloor:
    """The smallest guest an image can boot, and why (one rule, stated the same by pack and run)."""

    mib: int
    reason: str

    def check(self, memory_mib: int, asked: str, image: str, *, explicit: bool = True) -> None:
        if memory_mib < self.mib:
            what = asked if explicit else f"the image's default memory ({mib_text(memory_mib)})"
            raise UsageError(f"{what} is too small for image {image}: it needs at least {mib_text(self.mib)} "
                             f"({self.reason})", hint=f"use --memory {mib_text(self.mib)} or more")


def parse_marker(console_text: str, marker: str) -> int | None:
    """The app's exit status from the last `MARKER<N>` on the guest console (pure), or None."""
    found = re.findall(re.escape(marker) + r"(\d+)", console_text)
    return int(found[-1]) % 256 if found else None


def pump_plain(src: BinaryIO, dst: BinaryIO) -> None:
    """Copy a pipe to `dst` as it comes (the app's own serial port)."""
    try:
        while chunk := os.read(src.fileno(), 65536):
            dst.write(chunk)
            dst.flush()
    except (OSError, ValueError):
        pass


def pump_filtered(src: BinaryIO, filt) -> None:
    """Feed a pipe into a console filter (`feed`, `flush_partial`, `close`); an unfinished app line
    is passed on when the console has been idle for 0.2 s."""
    fd = src.fileno()
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                filt.flush_partial()
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            filt.feed(chunk)
    except (OSError, ValueError):
        pass
    finally:
        filt.close()


class Target(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    boot_type: ClassVar[type]                    # the manifest's `boot` dataclass
    machines: ClassVar[tuple[str, ...]]          # QEMU machine types its images may ask for
    file_roles: ClassVar[tuple[str, ...]] = ()   # the bundle files its boot plan reads (a manifest must list them)
    uses_launcher: ClassVar[bool] = False        # main runs through jvmkit's Launcher
    export_formats: ClassVar[tuple[str, ...]] = ENGINE_FORMATS   # libvirt, kubevirt: every target
    # The guest's balloon driver gives pages back itself when the guest runs out (policy.Settings.deflate_on_oom)
    balloon_deflates_on_oom: ClassVar[bool] = True

    # ---- pack time ----
    @abstractmethod
    def resolve_kernel(self, path: Path | None, *, suite: str | None = None, mirror: str | None = None) -> Any:
        """The kernel to pack with: `path` if given, else the cached one (fetching it if the target can)."""

    def guest_mtime(self, mtime: int) -> int:
        """The file time the guest will see for the image's files (AppCDS checks it)."""
        return mtime

    def agent_seed_path(self) -> str | None:
        """Where the guest reads the per-run seed, when not the default `guest.GUEST_SEED`."""
        return None

    @abstractmethod
    def write_bundle(self, staging: Path, inputs: PackInputs) -> BundleFiles:
        """Write the target's files into `staging`."""

    def kernel_info(self, kernel: Any) -> dict:
        """The manifest's `kernel` section: the kernel's description without host paths or times."""
        return portable(kernel.describe())

    # ---- pack and run ----
    def memory_floor(self, files: dict[str, FileRecord]) -> MemoryFloor:
        return MemoryFloor(JVM_MIN_MEMORY_MIB, "the smallest guest a JVM starts in")

    # ---- run time ----
    @abstractmethod
    def boot_plan(self, manifest: Manifest, files: dict[str, Path], request: BootRequest,
                  write_secret: Callable[[str, bytes], Path]) -> BootPlan:
        """The boot of `manifest`'s image from its unpacked `files`; per-run secrets are written
        with `write_secret(name, data)` (0600, in the run directory)."""

    def console_pump(self, stdout: BinaryIO, stderr: BinaryIO | None) -> Callable[[BinaryIO], None]:
        """A function that reads QEMU's stdout pipe and writes the app's output to `stdout` (and,
        with --verbose, the guest's own messages to `stderr`)."""
        return lambda pipe: pump_plain(pipe, stdout)

    def parse_exit(self, manifest: Manifest, console_text: str) -> int | None:
        return parse_marker(console_text, manifest.boot.exit_marker)

    def diagnose(self, console_text: str) -> str | None:
        """Why a guest of this target ended without an app status, from its console (or None)."""
        return None

    def describe(self, manifest: Manifest) -> list[str]:
        """Target-specific lines for `jvmkit inspect`."""
        return []

    def balloon_warning(self, manifest: Manifest) -> str | None:
        """Why the host cannot take memory back from this image's guest (no balloon driver), or None."""
        return None

    # ---- snapshots ----
    def restore_traits(self, manifest: Manifest) -> RestoreTraits:
        """How this target's guest is saved and restored (devices, clock, free-page settling)."""
        return RestoreTraits()

    def resumed_console_pump(self, stdout: BinaryIO, stderr: BinaryIO | None) -> Callable[[BinaryIO], None]:
        """`console_pump` for a VM restored from a snapshot: its console starts in the app's output."""
        return self.console_pump(stdout, stderr)

    # ---- kernels and export (the CLI) ----
    @abstractmethod
    def pull_kernel(self, **options) -> Any:
        """`jvmkit kernel pull TARGET`."""

    @abstractmethod
    def import_kernel(self, path: Path) -> Any:
        """`jvmkit kernel import TARGET PATH`."""

    def cluster_boot(self, manifest: Manifest) -> ClusterBoot:
        """How KubeVirt boots this image (`jvmkit export --format kubevirt`): by default the kernel
        and initrd of the boot plan, directly."""
        return ClusterBoot("kernel")

    def export(self, image, fmt: str, dest: Path, **options) -> Path:
        """`jvmkit export`: the engine formats (libvirt, kubevirt) for every target; a target adds
        its own formats by overriding this and passing the engine formats on."""
        if fmt in ENGINE_FORMATS:
            from jvmkit.engines import export as engine_export

            return engine_export.export(self, image, fmt, dest, **options)
        raise UsageError(f"image {image.path} is a {self.name} image; `jvmkit export` has no format for it",
                         hint=f"export formats by target: {exports_by_target()}")


HOST_SPECIFIC = frozenset({"path", "url", "last_used", "created"})


def portable(info):
    """Drop host-specific fields (cache paths, download URLs, times) so manifests are reproducible."""
    if isinstance(info, dict):
        return {k: portable(v) for k, v in info.items() if k not in HOST_SPECIFIC}
    if isinstance(info, list):
        return [portable(v) for v in info]
    return info


def exports_by_target() -> str:
    from jvmkit.packager import targets

    return "; ".join(f"{t.name}: {', '.join(t.export_formats) or 'none'}" for t in targets.all_targets())
