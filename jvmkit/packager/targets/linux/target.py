"""The `linux` target: a Debian cloud kernel plus an initramfs that runs the app as the only program.

The bundle stores the kernel (uncompressed vmlinux with a PVH note, so QEMU boots it directly) and
the initramfs (initramfs.py), both zstd-compressed; `jvmkit run` unpacks them once into the cache,
keyed by digest. The app's output comes on the second serial port (ttyS1, QEMU's stdout), the
kernel's and /init's on the first (the console log). App arguments given to `run` and the per-run
seed reach /init through fw_cfg, so nothing of them is on QEMU's command line.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jvmkit import ui
from jvmkit.packager import native_libs
from jvmkit.packager.manifest import FileRecord, Manifest
from jvmkit.packager.targets.base import (JVM_MIN_MEMORY_MIB, BootPlan, BootRequest, BundleFiles, ClusterBoot,
                                          MemoryFloor, PackInputs, RestoreTraits, Target)
from jvmkit.packager.targets.linux import initramfs
from jvmkit.packager.zstd import compress_file
from jvmkit.vm.qemu import q35_low_memory_mib


@dataclass(frozen=True)
class LinuxBoot:
    kernel_cmdline: str
    exit_marker: str = initramfs.EXIT_MARKER     # /init's last console line: MARKER<status>
    seed_fw_cfg: str = initramfs.SEED_FW_CFG     # fw_cfg names /init reads the seed and app arguments from
    args_fw_cfg: str = initramfs.ARGS_FW_CFG
    machine: str = "pc"                          # images before q35 named no machine: they booted on pc


def kernel_cmdline(base: str, verbose: bool) -> str:
    return base + (" loglevel=7" if verbose else " quiet loglevel=1")


class LinuxTarget(Target):
    name = "linux"
    description = "a Linux micro-VM: a Debian cloud kernel + an initramfs with busybox, the runtime and the app"
    boot_type = LinuxBoot
    machines = ("pc", "q35")
    file_roles = ("kernel", "initramfs")

    # ---- pack ----
    def resolve_kernel(self, path, *, suite=None, mirror=None):
        from jvmkit.packager.kernels import linux as kernels

        return kernels.resolve_linux_kernel(path, suite=suite, mirror=mirror)

    def write_bundle(self, staging: Path, inputs: PackInputs) -> BundleFiles:
        console = ui.current()
        kernel = inputs.kernel
        modules = list(kernel.modules)
        libs = native_libs.runtime_native_deps(inputs.runtime)
        init = initramfs.init_script(list(inputs.java_argv), list(inputs.app_args), [m.name for m in modules],
                                     native_libs.library_dirs(libs), list(inputs.agent_flags))
        with console.step("initramfs: busybox, modules, runtime, app (cpio + zstd)"):
            initrd = initramfs.write_initramfs(staging, "initramfs.cpio.zst", init=init, busybox=kernel.busybox,
                                               modules=modules, runtime=inputs.runtime,
                                               app_files=list(inputs.app_files), agent_jar=inputs.agent_jar,
                                               mtime=inputs.mtime, libs=libs)
        with console.step(f"kernel: Linux {kernel.version} (zstd)"):
            kern = compress_file(kernel.vmlinux, staging, "vmlinux.zst")
        boot = LinuxBoot(kernel_cmdline=initramfs.KERNEL_CMDLINE, machine=initramfs.MACHINE)
        return BundleFiles(files={"kernel": kern, "initramfs": initrd}, boot=boot)

    def memory_floor(self, files: dict[str, FileRecord]) -> MemoryFloor:
        record = files.get("initramfs")
        if record is None or not record.raw_size:
            return super().memory_floor(files)
        need = max(JVM_MIN_MEMORY_MIB, initramfs.min_memory_mib(record.raw_size))
        return MemoryFloor(need, f"its initramfs unpacks to {record.raw_size / (1 << 20):.0f} MiB in guest memory")

    # ---- run ----
    def boot_plan(self, manifest: Manifest, files: dict[str, Path], request: BootRequest,
                  write_secret: Callable[[str, bytes], Path]) -> BootPlan:
        boot: LinuxBoot = manifest.boot
        fw_cfg = []
        if request.seed is not None:
            fw_cfg.append((boot.seed_fw_cfg, write_secret("seed", request.seed)))
        if request.args is not None:
            fw_cfg.append((boot.args_fw_cfg, write_secret("args", shlex.join(request.args).encode())))
        append = kernel_cmdline(boot.kernel_cmdline, request.verbose)
        initrd = manifest.files["initramfs"]
        low = q35_low_memory_mib(initrd.raw_size or 0, bounce_buffer=initramfs.NO_BOUNCE_BUFFER not in append.split())
        return BootPlan(kernel=files["kernel"], initrd=files["initramfs"], append=append, machine=boot.machine,
                        fw_cfg=tuple(fw_cfg), app_serial=True, console_stdio=False, low_memory_mib=low)

    def restore_traits(self, manifest: Manifest) -> RestoreTraits:
        # vmgenid: a kernel with CONFIG_VMGENID reseeds its RNG when the generation ID changes, which
        # QEMU's `guid=auto` does for every restoring QEMU. Debian's cloud kernel is built without
        # it (CONFIG_VIRT_DRIVERS is not set), so there the guest agent's fresh entropy is what
        # changes: mixed into /dev/urandom (counted by the kernel at its next reseed, <= 60 s)
        # and into the JVM's SecureRandom state at once. The device costs nothing at boot.
        # busybox-date: /init runs java as root, so the agent can step the clock with busybox date.
        # settle_s: the kernel reports free 2 MiB blocks to the balloon 2 s after they were freed
        # (page_reporting_delay), and QEMU drops them: measured with samples/warmstart, waiting
        # 2.5 s after the trim made the migration stream 186.5 -> 172.6 MiB and the state file
        # 58.8 -> 51.9 MiB (httpd, whose heap is small: 148.7 -> 146.8 MiB; 8 s gave no more).
        return RestoreTraits(vmgenid=True, clock="busybox-date", settle_s=2.5,
                             note="the kernel's own RNG takes the fresh entropy at its next reseed (<= 60 s) "
                                  "unless the kernel has a vmgenid driver (Debian's cloud kernel has none)")

    def diagnose(self, console_text: str) -> str | None:
        for line in console_text.splitlines():
            if "Kernel panic" in line:
                return "the guest kernel panicked: " + line.split("Kernel panic - ", 1)[-1].strip()
        return None

    def cluster_boot(self, manifest: Manifest) -> ClusterBoot:
        """KubeVirt boots the kernel and initrd directly (kernelBoot) with the runner's command line
        plus `jvmkit.net=dhcp`: its pod network (masquerade: the guest is 10.0.2.2 via 10.0.2.1)
        hands the address out by DHCP, not QEMU's user network's fixed 10.0.2.15 that /init sets
        by default. (An image packed before /init read the flag ignores it: fixed addresses.)"""
        boot: LinuxBoot = manifest.boot
        return ClusterBoot("kernel", cmdline=f"{kernel_cmdline(boot.kernel_cmdline, False)} {initramfs.NET_DHCP}")

    # ---- kernels ----
    def pull_kernel(self, *, suite=None, mirror=None, refresh=False, **_):
        from jvmkit.packager.kernels import linux as kernels

        return kernels.pull_linux(suite=suite, mirror=mirror, refresh=refresh)

    def import_kernel(self, path: Path):
        from jvmkit.packager.kernels import linux as kernels

        return kernels.import_linux(path)
