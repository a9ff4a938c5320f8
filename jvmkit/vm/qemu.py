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
# Every device model a jvmkit VM may get (`qemu_argv` refuses any other): the disks, the network,
# the balloon and the RNG, all virtio-pci. Serial ports come with the machine (`-serial`).
DEVICES = ("virtio-blk-pci", "virtio-net-pci", "virtio-balloon-pci", "virtio-rng-pci", "vmgenid")


def opt(value: object) -> str:
    """A value inside a QEMU option list (`-drive file=...,...`, `-chardev ...,path=...`), escaped
    (pure): QEMU splits option lists on commas and reads a doubled comma as one, so a comma in a
    path (a cache under `/tmp/a,b`) or a name must be doubled or it would start an option of its
    own (`file=x,format=qcow2,backing=...`). Control characters (a newline ends QMP and monitor
    commands) are refused: no jvmkit path or name needs one."""
    text = str(value)
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise ValueError(f"{text!r} holds a control character; it cannot be a QEMU option value")
    return text.replace(",", ",,")


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
        return f"hostfwd=tcp:{opt(self.host_addr)}:{self.host_port}-:{self.guest_port}"


@dataclass(frozen=True)
class NetDev:
    """The guest's network backend (vm/network.py chooses it): QEMU's user network (`user`:
    slirp in QEMU, host forwards on its command line; `restrict`: no guest-initiated traffic
    leaves), or a connected stream socket on file descriptor `fd` to a backend process (`stream`:
    passt, which does the host forwards itself)."""

    kind: str = "user"
    restrict: bool = False
    fd: int | None = None


@dataclass(frozen=True)
class Confinement:
    """How QEMU is confined (vm/sandbox.py decides): its seccomp filter (`seccomp`: QEMU has
    `-sandbox`; `deny_elevate`: with `elevateprivileges=deny`, which QEMU 7.2 cannot combine with
    `-runas`: it kills itself at its own setgid), and when jvmkit is root, the unprivileged
    uid:gid it drops to and the empty directory it chroots into once its files are open."""

    seccomp: bool = False
    deny_elevate: bool = True
    runas: tuple[int, int] | None = None
    chroot: Path | None = None


def sandbox_options(c: Confinement, *, spawn: bool = False) -> list[str]:
    """QEMU's confinement options (pure). `spawn=True` is for a VM that must start programs
    (an `exec:` migration); every other VM gets `spawn=deny` (no fork, no exec: a QEMU taken over
    by its guest cannot start a shell)."""
    argv = []
    if c.seccomp:
        parts = ["on", "obsolete=deny"]
        if c.deny_elevate:
            parts.append("elevateprivileges=deny")
        parts += [f"spawn={'allow' if spawn else 'deny'}", "resourcecontrol=deny"]
        argv += ["-sandbox", ",".join(parts)]
    if c.runas is not None:
        argv += ["-runas", f"{c.runas[0]}:{c.runas[1]}"]
    if c.chroot is not None:
        argv += ["-chroot", str(c.chroot)]
    return argv


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
    console_log: Path                            # ttyS0: kernel and init messages (when no console_fd)
    initrd: Path | None = None                   # linux target
    disk: Path | None = None                     # osv target: ROFS disk on virtio-blk
    disk_aio: str = "threads"                    # the root disk's QEMU aio= mode (iouring.disk_aio)
    app_serial: bool = True                      # ttyS1 → QEMU's stdout (the app's output)
    console_stdio: bool = False                  # osv: ttyS0 → QEMU's stdout, logged to console_log too
    data_disks: tuple[Path, ...] = ()            # osv: more raw virtio-blk disks (vblk1...), read-only
    console_fd: int | None = None                # ttyS0 into this inherited pipe (jvmkit caps the log)
    qemu_console_log: bool = True                # QEMU writes console_log itself, uncapped (False: jvmkit
                                                 # reads the console through a pipe: consolelog.py)
    ports: tuple[PortForward, ...] = ()
    network: bool = True
    netdev: NetDev = NetDev()
    confinement: Confinement = Confinement()
    spawn: bool = False                          # the VM may start programs (sandbox_options)
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


# Built-in devices no jvmkit guest uses, switched off: each is emulation code a hostile guest could
# reach. vmport is VMware's backdoor I/O port (and its vmmouse), smbus an SMBus with 8 EEPROMs,
# i8042 the PS/2 keyboard controller (the linux kernel line has i8042.noaux/nomux/nopnp; with the
# controller gone its probe ends at once), q35's sata the ICH9 AHCI controller (linux images have
# no disk). Both targets booted hello unchanged without them (under TCG: linux 3.6-4.4 s with,
# 3.7-4.2 s without; OSv within its noise). Left on: the timers and interrupt controllers the
# kernels use, fw_cfg, ACPI, and on `pc` the floppy controller, which QEMU 7.2 offers no switch for.
# A second -machine option: QEMU merges its keys into the first.
MACHINE_OFF = "vmport=off,smbus=off,i8042=off"


def machine_devices_off(machine: str) -> list[str]:
    return ["-machine", MACHINE_OFF + (",sata=off" if machine == "q35" else "")]


def qemu_argv(c: VmConfig) -> list[str]:
    """The full QEMU argv for a VM (pure). Every path and name inside an option list goes through
    `opt()`; `-append` and `-kernel`/`-initrd` are plain values QEMU does not split."""
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
        c.qemu, "-name", opt(c.name),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", machine_option(c), *machine_devices_off(c.machine), *accel,
        "-smp", str(c.cpus), "-m", f"{c.memory_mib}M",
        "-kernel", str(c.kernel), "-append", c.append,
    ]
    if c.initrd is not None:
        argv += ["-initrd", str(c.initrd)]
    if c.disk is not None:
        argv += ["-drive", f"file={opt(c.disk)},if=none,id=rootfs,format=raw,readonly=on,cache=unsafe,aio={c.disk_aio}",
                 "-device", f"virtio-blk-pci,drive=rootfs{ROOT_DISK_TCG if c.accel == 'tcg' else ''}"]
    for i, path in enumerate(c.data_disks):
        argv += ["-drive", f"file={opt(path)},if=none,id=data{i},format=raw,readonly=on",
                 "-device", f"virtio-blk-pci,drive=data{i}"]
    if c.console_stdio:
        log = f",logfile={opt(c.console_log)}" if c.qemu_console_log else ""
        argv += ["-chardev", f"stdio,id=console,signal=off{log}", "-serial", "chardev:console"]
    else:
        path = opt(c.console_log) if c.console_fd is None else f"/proc/self/fd/{c.console_fd}"
        argv += ["-chardev", f"file,id=console,path={path}", "-serial", "chardev:console"]
    if c.app_serial and not c.console_stdio:
        argv += ["-chardev", "stdio,id=app,signal=off", "-serial", "chardev:app"]
    argv += ["-qmp", f"unix:{opt(c.qmp_socket)},server=on,wait=off"]
    if c.network:
        argv += netdev_option(c.netdev, c.ports) + ["-device", "virtio-net-pci,netdev=net0,romfile="]
    if c.balloon:
        fpr = "on" if c.free_page_reporting else "off"
        argv += ["-device", f"virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting={fpr}"]
    if c.rng:
        argv += ["-device", "virtio-rng-pci"]
    for name, path in c.fw_cfg:
        argv += ["-fw_cfg", f"name={opt(name)},file={opt(path)}"]
    if c.vmgenid:
        argv += ["-device", "vmgenid,id=vmgenid0,guid=auto"]
    argv += sandbox_options(c.confinement, spawn=c.spawn)
    argv += list(c.extra)
    if c.incoming is not None:
        argv += ["-incoming", c.incoming]
    check_devices(argv)
    return argv


def netdev_option(n: NetDev, ports: tuple[PortForward, ...]) -> list[str]:
    """The `-netdev` of a VM (pure). IPv6 is off: the images configure only IPv4, and the host
    filter (vm/hostfilter.py) covers IPv4."""
    if n.kind == "user":
        parts = ["user", "id=net0", "ipv6=off"]
        if n.restrict:
            parts.append("restrict=on")
        parts += [p.hostfwd() for p in ports]
        return ["-netdev", ",".join(parts)]
    if n.kind == "stream":
        if n.fd is None:
            raise ValueError("a stream netdev needs a file descriptor")
        return ["-netdev", f"stream,id=net0,server=off,addr.type=fd,addr.str={n.fd}"]
    raise ValueError(f"unknown netdev kind {n.kind!r}")


def check_devices(argv: list[str]) -> None:
    """Refuse an argv with a device model outside DEVICES (pure: a bug, never the user's input)."""
    for i, word in enumerate(argv[:-1]):
        if word == "-device" and argv[i + 1].split(",", 1)[0] not in DEVICES:
            raise ValueError(f"device {argv[i + 1].split(',', 1)[0]!r} is not one jvmkit gives a VM")


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
        if flag == "-accel":  # tcg or kvm; thread= and tb-size= tune the host side only
            value = value.split(",", 1)[0]
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


def kvm_kernel_argv(qemu: str, kernel: Path, console_log: Path,
                    confinement: Confinement = Confinement()) -> list[str]:
    """The guest kernel jvmkit is about to run (the image's own, so confined like a VM: seccomp,
    and as root an unprivileged user), booted under KVM with no root filesystem and no devices
    but its serial console."""
    return [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "128M",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 loglevel=4",
            "-serial", f"file:{console_log}", *sandbox_options(confinement)]


def sandbox_probe_argv(qemu: str, confinement: Confinement) -> list[str]:
    """QEMU on no machine with the confinement a VM would get, driven over QMP on stdio: it
    quits cleanly only if it accepts all of it and survives dropping to the user (sandbox.py)."""
    return [qemu, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
            *sandbox_options(confinement), "-qmp", "stdio"]


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
