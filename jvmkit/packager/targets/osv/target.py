"""The `osv` target: an OSv unikernel (the loader ELF, booted directly through its PVH note) and a
raw disk whose MBR partition #2 holds a ROFS written by jvmkit (see image.py for the layout).

The app runs through jvmkit's Launcher (a returning `main` would otherwise never power OSv off).
OSv has no fw_cfg reader, so the app arguments of `jvmkit run IMAGE -- ARGS` and the guest agent's
flags reach the guest on a rebuilt boot command line, and the per-run seed on a small raw disk.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from jvmkit import ui
from jvmkit.errors import JvmkitError
from jvmkit.packager.manifest import FileRecord, Manifest
from jvmkit.packager.targets.base import (ENGINE_FORMATS, BootPlan, BootRequest, BundleFiles, ClusterBoot, MemoryFloor,
                                          PackInputs, RestoreTraits, Target, pump_filtered)
from jvmkit.packager.targets.osv import disk as osv_disk
from jvmkit.packager.targets.osv import image
from jvmkit.packager.targets.osv.console import EXIT_LINE, ConsoleFilter
from jvmkit.packager.zstd import compress_file

# What OSv prints when it cannot start the app (the runner's diagnosis when no status came).
FAILURES = ("Could not mount rofs root filesystem", "Failed to parse command line", "Failed to load object")
# OSv's memory::oom(): it halts (QEMU exits 0) after this line and a backtrace, with no `Aborted`.
OUT_OF_MEMORY = "Out of memory: could not reclaim any further"
OSV_BASE_MIB = 72  # see OsvTarget.memory_floor
# The boot options that pin QEMU's user network addresses (image.BOOT_OPTIONS); without them OSv asks DHCP.
FIXED_NETWORK = ("--ip=", "--defaultgw=", "--nameserver=")


@dataclass(frozen=True)
class OsvCmdline:
    """What the boot command line is made of, so `run` can rebuild it with other app arguments
    or with the guest agent's flags."""

    argv: tuple[str, ...]
    agent_flags: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    rootfs: str = image.ROOTFS


@dataclass(frozen=True)
class OsvBoot:
    kernel_cmdline: str                          # the image's own line: default args, no agent
    cmdline: OsvCmdline
    exit_marker: str = EXIT_LINE
    acpi_shutdown: bool = True                   # OSv powers off on ACPI's power button
    machine: str = "pc"
    libraries: tuple[str, ...] = ()              # host libraries put into /usr/lib (shown by inspect)


class OsvTarget(Target):
    name = "osv"
    description = "an OSv unikernel: OSv kernel + a ROFS disk written by jvmkit"
    boot_type = OsvBoot
    machines = ("pc",)
    file_roles = ("kernel", "disk")
    uses_launcher = True
    export_formats = ("raw", "qcow2", *ENGINE_FORMATS)
    # OSv's virtio-balloon driver accepts DEFLATE_ON_OOM but does not act on it, and its allocator
    # waits for memory (or aborts: "Out of memory: could not reclaim any further") when none is free.
    # Measured with v0.57.0-398-g0e34e4dc: samples/phases regrowing 200 MiB in a 1G guest ballooned
    # to 256M stalled 18 s until the host deflated, and in another run never came back (JMX silent,
    # the host's deflate not taken: the driver's deflate itself allocates).
    balloon_deflates_on_oom = False

    # ---- pack ----
    def resolve_kernel(self, path, *, suite=None, mirror=None):
        from jvmkit.packager.kernels import osv as osv_kernels

        return osv_kernels.resolve_osv_kernel(path)

    def guest_mtime(self, mtime: int) -> int:
        return 0  # OSv's ROFS reports mtime 0 for every file

    def agent_seed_path(self) -> str:
        return image.SEED_DEVICE

    def write_bundle(self, staging: Path, inputs: PackInputs) -> BundleFiles:
        """The disk and the kernel, zstd-compressed. ROFS stores no timestamps, so `mtime` is
        not needed for the same inputs to give the same bytes."""
        console = ui.current()
        kernel = inputs.kernel
        if getattr(kernel, "elf", None) is None:
            raise JvmkitError("the OSv kernel has no loader ELF to boot", hint="import OSv's build/last/loader-stripped.elf")
        argv = image.guest_argv(list(inputs.java_argv), image.runtime_release(inputs.runtime))
        agent = tuple(flag for flag in inputs.agent_flags if flag in argv)
        options, env = list(image.BOOT_OPTIONS), dict(image.GUEST_ENV)
        image.boot_cmdline(argv, list(inputs.app_args), env, options)  # with the agent: refuses a too-long line early
        cmdline = image.boot_cmdline([a for a in argv if a not in agent], list(inputs.app_args), env, options)
        libraries = image.support_libraries(inputs.runtime)
        rofs = image.build_rofs(runtime=inputs.runtime, app_files=list(inputs.app_files), agent_jar=inputs.agent_jar,
                                libraries=libraries)
        with console.step("ROFS disk: runtime, app, agent, libraries (zstd)"):
            fd, tmp_name = tempfile.mkstemp(prefix=".disk.", suffix=".img", dir=staging)
            os.close(fd)
            raw = Path(tmp_name)
            try:
                info = osv_disk.write_rofs_disk(rofs, raw)
                disk = compress_file(raw, staging, "disk.img.zst", rofs_offset=info.rofs_offset,
                                     rofs_size=info.rofs_size)
            finally:
                raw.unlink(missing_ok=True)
        with console.step(f"kernel: OSv {getattr(kernel, 'version', '?')} (zstd)"):
            kern = compress_file(Path(kernel.elf), staging, "kernel.zst")
        boot = OsvBoot(kernel_cmdline=cmdline,
                       cmdline=OsvCmdline(argv=tuple(argv), agent_flags=agent, args=tuple(inputs.app_args), env=env,
                                          options=tuple(options)),
                       libraries=tuple(soname for soname, _ in libraries))
        return BundleFiles(files={"kernel": kern, "disk": disk}, boot=boot)

    def memory_floor(self, files: dict[str, FileRecord]) -> MemoryFloor:
        """OSv's kernel, its ROFS cache and the JVM's own start, measured here (OSv v0.57.0-398,
        hello, -XX:InitialHeapSize=16m): a 51 MiB runtime disk ran out of memory at 72M and
        started at 76M, a 272 MiB one (profile jdk, 70 modules) at 76M and 84M: 72M + 1M per
        24 MiB of disk, rounded up to 4M. An app with more threads needs more (the httpd sample:
        88M); what it lacks then is OSv's own `Out of memory` line, which `run` names."""
        record = files.get("disk")
        raw_mib = (record.raw_size or 0) / (1 << 20) if record is not None else 0
        need = int(-(-(OSV_BASE_MIB + raw_mib / 24) // 4) * 4)
        return MemoryFloor(need, "the smallest OSv guest a JVM starts in, with its runtime disk")

    # ---- run ----
    def boot_plan(self, manifest: Manifest, files: dict[str, Path], request: BootRequest,
                  write_secret: Callable[[str, bytes], Path]) -> BootPlan:
        boot: OsvBoot = manifest.boot
        data_disks = ()
        if request.seed is not None:
            data_disks = (write_secret("seed.img", image.seed_disk_image(request.seed)),)
        args = list(request.args) if request.args is not None else None
        return BootPlan(kernel=files["kernel"], disk=files["disk"], data_disks=data_disks,
                        append=image.runtime_cmdline(boot, args, agent=request.seed is not None),
                        machine=boot.machine, app_serial=False, console_stdio=True,
                        acpi_shutdown=boot.acpi_shutdown)

    def console_pump(self, stdout: BinaryIO, stderr: BinaryIO | None):
        filt = ConsoleFilter(stdout, stderr)
        return lambda pipe: pump_filtered(pipe, filt)

    def resumed_console_pump(self, stdout: BinaryIO, stderr: BinaryIO | None):
        filt = ConsoleFilter(stdout, stderr)
        filt.state = "app"  # OSv's `Cmdline:` line was printed before the snapshot
        return lambda pipe: pump_filtered(pipe, filt)

    def restore_traits(self, manifest: Manifest) -> RestoreTraits:
        # OSv has no vmgenid driver and ignores writes to /dev/random: its Yarrow pool reseeds from
        # RDRAND and virtio-rng within moments of the restore on its own, and the guest agent
        # reseeds the JVM's SecureRandom state at once. OSv has no settimeofday: under KVM its
        # kvmclock re-reads the host's wall clock every second; under TCG (HPET, wall time read
        # from the RTC once at boot) the clock stays behind by the time the snapshot was kept.
        # No free page reporting in OSv's balloon driver: nothing to wait for after the trim.
        return RestoreTraits(vmgenid=False, clock="none", settle_s=0.0,
                             note="OSv cannot set its wall clock: under TCG it stays behind by the snapshot's age "
                                  "(io.jvmkit.Ready.clockLagMillis() says by how much); under KVM it follows the "
                                  "host within a second")

    def diagnose(self, console_text: str) -> str | None:
        if OUT_OF_MEMORY in console_text:
            return "OSv ran out of memory (it could not reclaim any further): give the VM more --memory"
        for failure in FAILURES:
            if failure in console_text:
                line = next(l for l in console_text.splitlines() if failure in l)
                return "OSv failed: " + line.strip()
        return None

    def balloon_warning(self, manifest: Manifest) -> str | None:
        if manifest.kernel.has_balloon:
            return None
        return ("this image's OSv kernel has no virtio-balloon driver: the guest heap will shrink, but the host "
                "cannot take the memory back (use an OSv kernel built since 2026-07)")

    def describe(self, manifest: Manifest) -> list[str]:
        return [f"libraries  {', '.join(manifest.boot.libraries) or '(none)'}"]

    # ---- kernels, export ----
    def pull_kernel(self, *, version=None, url=None, sha256=None, **_):
        from jvmkit.packager.kernels import osv as osv_kernels

        return osv_kernels.pull_osv(version=version, base_url=url, sha256=sha256)

    def import_kernel(self, path: Path):
        from jvmkit.packager.kernels import osv as osv_kernels

        return osv_kernels.import_osv(path)

    def cluster_boot(self, manifest: Manifest) -> ClusterBoot:
        """The classic disk (OSv's loader image + a command line + the ROFS) boots from its own boot
        sector (on pc and, tried by hand, on q35), so KubeVirt needs only a containerDisk. Its line
        leaves out the QEMU user network's fixed addresses: KubeVirt's pod network (masquerade:
        the guest is 10.0.2.2 via 10.0.2.1) hands them out by DHCP, which OSv asks for without --ip."""
        boot: OsvBoot = manifest.boot
        line = boot.cmdline
        options = [o for o in line.options if not o.startswith(FIXED_NETWORK)]
        argv = [a for a in line.argv if a not in line.agent_flags]
        return ClusterBoot("disk", export_format="raw",
                           cmdline=image.boot_cmdline(argv, list(line.args), line.env, options))

    def export(self, image_bundle, fmt: str, dest: Path, *, loader: Path | None = None, cmdline: str | None = None,
               **options) -> Path:
        """raw/qcow2: the classic disk, with the image's command line or `cmdline`; the engine
        formats (libvirt, kubevirt) through Target.export."""
        import dataclasses

        from jvmkit.packager.targets.osv.export import export_classic

        if fmt in ENGINE_FORMATS:
            return super().export(image_bundle, fmt, dest, loader=loader, **options)
        if cmdline is not None:
            m = image_bundle.manifest
            image_bundle = dataclasses.replace(image_bundle, manifest=dataclasses.replace(
                m, boot=dataclasses.replace(m.boot, kernel_cmdline=cmdline)))
        return export_classic(image_bundle, loader, dest, fmt)
