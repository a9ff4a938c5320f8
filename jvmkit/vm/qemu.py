"""The QEMU command line, built in one place: VMs from a frozen `VmConfig`, and the probes.

Nothing else in jvmkit assembles QEMU arguments. `qemu_argv(config)` and the probe argv builders
are pure functions, so the exact command line for every combination of target, accelerator and
options is unit-tested.
"""

from __future__ import annotations

import functools
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from jvmkit.errors import JvmkitError

QEMU = "qemu-system-x86_64"
# Machine types an image may ask for: `pc` (i440FX; OSv images) and `q35` (linux images: its PCI
# interrupt links are cheap to set up, where i440FX's LNKx links cost ~0.15 s per virtio device
# under TCG). On q35 only `low_memory_mib` of guest RAM sits below 4 GiB (see `q35_low_memory_mib`).
MACHINES = ("pc", "q35")


def q35_low_memory_mib(initrd_bytes: int, bounce_buffer: bool = False) -> int:
    """How much guest RAM a q35 linux guest gets below 4 GiB (`max-ram-below-4g`), the rest above.

    Linux initialises the struct pages of the zones below 4 GiB early and one by one, and those of
    the zone above 4 GiB later, in bulk (deferred struct page init), several times faster per page.
    The low part must still hold the kernel and the initramfs, which QEMU loads just below its top:
    160 MiB over the initramfs, in steps of 256 MiB, at least 256 MiB and at most the 2 GiB q35
    puts there anyway for large guests. A kernel that keeps its 64 MiB DMA bounce buffer (images
    whose command line lacks `swiotlb=noforce`) gets the 1 GiB it was measured with: that buffer
    made a small low part slower (under TCG, /init at 8G: 2.5 s with 256M low, 2.1 s with 1G; and
    1.9 s with 256M low and no buffer, against 1.7 s for a 256M guest).
    """
    if bounce_buffer:
        return 1024
    need = -(-initrd_bytes // (1 << 20)) + 160
    return min(2048, max(256, -(-need // 256) * 256))


@dataclass(frozen=True)
class PortForward:
    host_addr: str
    host_port: int
    guest_port: int

    def spec(self) -> str:
        return f"{self.host_addr}:{self.host_port}:{self.guest_port}"

    def hostfwd(self) -> str:
        return f"hostfwd=tcp:{self.host_addr}:{self.host_port}-:{self.guest_port}"


# TCG's translation cache. When it fills, QEMU throws away every translated block and translates the
# hot code (the interpreter, libjvm, the kernel) again. At 64 MiB that happened once in the middle of
# a JVM's start (linux hello, OSv and linux multijar) and cost OSv's multijar ~0.3 s of 2.1 s; at
# 128 MiB none of those boots fills it. The buffer is host memory touched only as code is translated,
# so a TCG guest holds at most this much host RSS for it (QEMU's own default is 1 GiB).
TCG_TB_MIB = 128


@dataclass(frozen=True)
class VmConfig:
    name: str
    kernel: Path
    append: str
    memory_mib: int
    cpus: int
    accel: str                                   # "kvm" or "tcg"
    qmp_socket: Path
    console_log: Path                            # ttyS0: kernel and init messages
    initrd: Path | None = None                   # linux target
    disk: Path | None = None                     # osv target: ROFS disk on virtio-blk
    disk_aio: str = "threads"                    # the root disk's QEMU aio= mode (iouring.disk_aio)
    app_serial: bool = True                      # ttyS1 → QEMU's stdout (the app's output)
    console_stdio: bool = False                  # osv: ttyS0 → QEMU's stdout, logged to console_log too
    data_disks: tuple[Path, ...] = ()            # osv: more raw virtio-blk disks (vblk1...), read-only
    ports: tuple[PortForward, ...] = ()
    network: bool = True
    balloon: bool = True
    free_page_reporting: bool = True
    rng: bool = True
    fw_cfg: tuple[tuple[str, Path], ...] = ()    # (name, file): the file's path, never its content, is on the argv
    machine: str = "pc"                          # one of MACHINES, from the image's manifest
    low_memory_mib: int = 1024                   # q35: guest RAM below 4 GiB (q35_low_memory_mib)
    qemu: str = QEMU
    tcg_tb_mib: int = TCG_TB_MIB
    extra: tuple[str, ...] = field(default=())
    # Snapshots (jvmkit.vm.snapshot): a VM that is saved and the VMs restored from it get the same
    # devices in the same order; a restored one also gets `-incoming URI` (jvmkit uses `fd:N`).
    vmgenid: bool = False                        # -device vmgenid,guid=auto: a new generation ID per QEMU
    incoming: str | None = None


# Under TCG a virtio-blk kick handled in the vCPU thread (no ioeventfd) skips a wake-up of QEMU's
# main loop per request; with aio=io_uring it halved OSv's own count of its disk time (127 -> 71 ms
# for hello). Under KVM the ioeventfd keeps the kick in the kernel, so it stays on there.
ROOT_DISK_TCG = ",ioeventfd=off"


def machine_option(c: VmConfig) -> str:
    """The -machine argument: the machine type, and on q35 the split of RAM around 4 GiB."""
    if c.machine == "q35":
        return f"q35,max-ram-below-4g={c.low_memory_mib}M"
    return c.machine


def qemu_argv(c: VmConfig) -> list[str]:
    """The full QEMU argv for a VM (pure)."""
    if c.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    elif c.accel == "tcg":
        thread = "multi" if c.cpus > 1 else "single"
        accel = ["-accel", f"tcg,thread={thread},tb-size={c.tcg_tb_mib}", "-cpu", "max"]
    else:
        raise ValueError(f"unknown accelerator {c.accel!r}")
    if c.machine not in MACHINES:
        raise ValueError(f"unknown machine type {c.machine!r}")
    argv = [
        c.qemu, "-name", c.name,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", machine_option(c), *accel,
        "-smp", str(c.cpus), "-m", f"{c.memory_mib}M",
        "-kernel", str(c.kernel), "-append", c.append,
    ]
    if c.initrd is not None:
        argv += ["-initrd", str(c.initrd)]
    if c.disk is not None:
        argv += ["-drive", f"file={c.disk},if=none,id=rootfs,format=raw,readonly=on,cache=unsafe,aio={c.disk_aio}",
                 "-device", f"virtio-blk-pci,drive=rootfs{ROOT_DISK_TCG if c.accel == 'tcg' else ''}"]
    for i, path in enumerate(c.data_disks):
        argv += ["-drive", f"file={path},if=none,id=data{i},format=raw,readonly=on",
                 "-device", f"virtio-blk-pci,drive=data{i}"]
    if c.console_stdio:
        argv += ["-chardev", f"stdio,id=console,signal=off,logfile={c.console_log}", "-serial", "chardev:console"]
    else:
        argv += ["-chardev", f"file,id=console,path={c.console_log}", "-serial", "chardev:console"]
    if c.app_serial and not c.console_stdio:
        argv += ["-chardev", "stdio,id=app,signal=off", "-serial", "chardev:app"]
    argv += ["-qmp", f"unix:{c.qmp_socket},server=on,wait=off"]
    if c.network:
        netdev = ",".join(["user", "id=net0", *(p.hostfwd() for p in c.ports)])
        argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,romfile="]
    if c.balloon:
        fpr = "on" if c.free_page_reporting else "off"
        argv += ["-device", f"virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting={fpr}"]
    if c.rng:
        argv += ["-device", "virtio-rng-pci"]
    for name, path in c.fw_cfg:
        argv += ["-fw_cfg", f"name={name},file={path}"]
    if c.vmgenid:
        argv += ["-device", "vmgenid,id=vmgenid0,guid=auto"]
    argv += list(c.extra)
    if c.incoming is not None:
        argv += ["-incoming", c.incoming]
    return argv


# ---- snapshots: what a restore must match, and what it changes while the VM runs ----------------

# Options that name host files or host-side behaviour: they may differ between the QEMU that saved
# a VM and the one that restores it (the guest never sees them), so they are no part of its signature.
_BACKEND_OPTIONS = ("file", "path", "aio", "logfile", "cache")


def device_signature(c: VmConfig) -> tuple[str, ...]:
    """What QEMU must give the guest identically for a saved VM to be restored (pure): machine,
    accelerator and CPU model, vCPUs, memory, and every device and drive in argv order, without host
    paths and backend options (file names, aio, log files) and without the per-run network forwards."""
    argv = qemu_argv(c)
    keep = {"-machine", "-accel", "-cpu", "-smp", "-m", "-device", "-drive"}
    out = []
    for flag, value in zip(argv, argv[1:]):
        if flag not in keep:
            continue
        if flag == "-drive":
            value = ",".join(part for part in value.split(",") if part.split("=", 1)[0] not in _BACKEND_OPTIONS)
        out.append(f"{flag} {value}")
    return tuple(out)


def hostfwd_add_command(fwd: PortForward, netdev: str = "net0") -> str:
    """The monitor command that adds a port forward to a running VM's user network (pure), sent
    through QMP's human-monitor-command; QEMU answers "" when it worked, else the reason."""
    return f"hostfwd_add {netdev} tcp:{fwd.host_addr}:{fwd.host_port}-:{fwd.guest_port}"


# ---- the probes' guests (kvm.py, iouring.py) ----------------------------------------------------

def kvm_boot_sector_argv(qemu: str, image: Path) -> list[str]:
    """A 512-byte boot sector under KVM that reports through isa-debug-exit (kvm.BOOT_SECTOR)."""
    return [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "pc", "-accel", "kvm", "-m", "16M",
            "-drive", f"file={image},format=raw,if=ide",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]


def kvm_kernel_argv(qemu: str, kernel: Path, console_log: Path) -> list[str]:
    """The guest kernel jvmkit is about to run, booted under KVM with no root filesystem."""
    return [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "128M",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 loglevel=4",
            "-serial", f"file:{console_log}"]


def aio_probe_argv(qemu: str, image: Path) -> list[str]:
    """QEMU opening a one-sector drive with aio=io_uring on no machine, driven over QMP on stdio."""
    return [qemu, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
            "-drive", f"file={image},if=none,id=probe,format=raw,readonly=on,aio=io_uring", "-qmp", "stdio"]


def find_qemu(binary: str = QEMU) -> str:
    path = shutil.which(binary)
    if not path:
        raise JvmkitError(f"{binary} not found on PATH",
                          hint="install QEMU: apt-get install -y qemu-system-x86 qemu-utils")
    return path


@functools.lru_cache(maxsize=8)  # one `qemu --version` per process (the KVM and io_uring verdicts both ask)
def qemu_version(binary: str = QEMU) -> str | None:
    path = shutil.which(binary)
    if not path:
        return None
    from jvmkit import proc
    from jvmkit.errors import JvmkitError

    try:
        out = proc.run([path, "--version"], what="qemu --version", timeout=10, check=False).stdout
    except JvmkitError:
        return None
    first = out.splitlines()[0] if out else ""
    return first.split("version", 1)[1].strip().split()[0] if "version" in first else first or None


def host_key(binary: str = QEMU) -> str:
    """What a probe's cached verdict holds for: the host kernel and the QEMU version."""
    return f"{platform.release()}|qemu:{qemu_version(binary)}"
