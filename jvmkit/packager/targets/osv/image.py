"""What an osv image holds: the ROFS root disk's layout, the OSv boot command line, and the seed disk.

The root filesystem (ROFS, see `rofs.py`) sits in MBR partition entry #2 of a data disk
(`disk.write_rofs_disk`), which OSv mounts as /dev/vblk0.1 with `--rootfs=rofs`:
    /jvm/...              the trimmed runtime, as jlink wrote it
    /app/...              the app's jars (guest paths given by pack)
    /jvmkit/agent.jar     the guest agent and launcher
    /usr/lib/<soname>     host libraries the runtime needs that OSv doesn't supply itself
                          (the DT_NEEDED closure from `native_libs`: with Debian's JDK that is
                          libz.so.1, libstdc++.so.6 and libgcc_s.so.1; OSv's ELF loader searches
                          only / and /usr/lib)
    /usr/lib/libzip.so -> /jvm/lib/libzip.so
                          the runtime's jimage reader dlopen()s "libzip.so" by bare name to inflate a
                          compressed lib/modules (jlink --compress); OSv's dlopen searches only / and
                          /usr/lib (no caller RUNPATH), and without the link the JVM jumps to a null
                          ZIP_InflateFully ("trying to execute null pointer")
    /etc/fstab            rofs root + devfs /dev, procfs /proc, sysfs /sys, ramfs /tmp (OSv mounts
                          these after pivoting to the root; /tmp is the JVM's writable place)
    /etc/hosts, /etc/mnttab -> /proc/mounts, and the mount points /dev /proc /sys /tmp
The bundle stores the disk (`disk.img.zst`) and the loader ELF (`kernel.zst`) zstd-compressed;
`jvmkit run` unpacks them once into the boot cache by raw digest, like the linux target.

The command line (`cmdline.build_cmdline`): `--rootfs=rofs --power-off-on-abort --cwd=/ --verbose
--env=JAVA_HOME=/jvm java_argv app_args`, without the guest agent's flags. OSv has no fw_cfg reader,
so `jvmkit run IMAGE -- ARGS` (or `--balloon`, which starts the agent) rebuilds it with
`runtime_cmdline(boot, args, agent)` from what the manifest keeps (`boot.cmdline`).
java_argv gets UTF-8 output flags after the java path (`encoding_flags`: OSv's libc reports the
codeset as ASCII whatever LANG says) and its `-Djvmkit.seed=` pointed at the seed disk.

Exit status: OSv's exit() discards the status and powers off, but with `--verbose` it first logs
`program exited with status N` (runtime.cc), for every way a JVM ends (System.exit, the launcher's
exit); an int status is printed with %ld, so -1 shows as 4294967295 (mod 256 = 255, as on Linux).
`boot.exit_marker` is that prefix. OSv has one console (ttyS0) for its messages and the app's
output; `console.ConsoleFilter` splits them. `--power-off-on-abort` makes a crashed guest power off
instead of halting forever.

The per-run seed (JMX credentials) can't use fw_cfg here either: `seed_disk_image` makes it a raw
4 KiB disk the runner attaches as a second virtio-blk device, which the guest reads at /dev/vblk1
(the JVM's `-Djvmkit.seed` points there; nothing secret is on the QEMU command line).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from jvmkit.errors import JvmkitError, UsageError
from jvmkit.guest import GUEST_AGENT, GUEST_APP, GUEST_RUNTIME
from jvmkit.packager import native_libs
from jvmkit.packager.targets.osv.cmdline import build_cmdline
from jvmkit.packager.targets.osv.rofs import RofsBuilder

GUEST_LIB = "/usr/lib"
ROOTFS = "rofs"
SEED_DEVICE = "/dev/vblk1"       # OSv has no fw_cfg reader: the seed is a second virtio-blk disk
SEED_DISK_SIZE = 4096
# --cwd=/ as on linux (AppCDS's relative class path). The fixed addresses of QEMU's user network
# (the ones the linux guest's init sets too) replace OSv's DHCP exchange, which delays main.
BOOT_OPTIONS = ("--power-off-on-abort", "--cwd=/", "--verbose", "--ip=eth0,10.0.2.15,255.255.255.0",
                "--defaultgw=10.0.2.2", "--nameserver=10.0.2.3")
GUEST_ENV = {"JAVA_HOME": GUEST_RUNTIME}
FSTAB = ("/dev/vblk0.1 /     rofs   defaults 0 0\n"
         "none         /dev  devfs  defaults 0 0\n"
         "none         /proc procfs defaults 0 0\n"
         "none         /sys  sysfs  defaults 0 0\n"
         "none         /tmp  ramfs  defaults 0 0\n")
HOSTS = "127.0.0.1 localhost osv.local\n::1 localhost\n"
MOUNT_POINTS = ("/dev", "/proc", "/sys", "/tmp")
# Sonames the OSv kernel answers itself (core/elf.cc, program::program: supplied_modules).
# libstdc++.so.6 is only supplied by kernels built with conf_hide_symbols=0, so it is shipped anyway
# (a supplied soname wins, so the file is then unused).
OSV_SUPPLIED = frozenset({
    "ld-linux-x86-64.so.2", "libresolv.so.2", "libc.so.6", "libm.so.6", "libc.musl-x86_64.so.1",
    "ld-musl-x86_64.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libaio.so.1",
    "libxenstore.so.3.0", "libcrypt.so.1", "libutil.so", "libutil.so.1",
})
# libraries the JDK dlopen()s by bare name, linked into /usr/lib where OSv's dlopen looks
DLOPEN_BY_NAME = ("libzip.so",)


# ---- host libraries ------------------------------------------------------------------------------------

def support_libraries(runtime: Path, search: list[str] | None = None) -> list[tuple[str, Path]]:
    """[(soname, host file)] the runtime needs in the guest's /usr/lib: the DT_NEEDED closure of its
    ELF files (`native_libs`) minus what OSv supplies itself. OSv's ELF loader looks in / and /usr/lib
    only, so they all go to /usr/lib whatever their host directory."""
    deps = native_libs.runtime_native_deps(runtime, exclude=OSV_SUPPLIED, search=search)
    return sorted({os.path.basename(guest): host for guest, host in deps}.items())


# ---- the root filesystem and the disk ----------------------------------------------------------------

def build_rofs(*, runtime: Path, app_files: list[tuple[str, Path]], agent_jar: Path,
               libraries: list[tuple[str, Path]]) -> RofsBuilder:
    """The guest's root filesystem (see the module docstring for the layout)."""
    rofs = RofsBuilder()
    for mount_point in MOUNT_POINTS:
        rofs.add_dir(mount_point)
    rofs.add_file("/etc/fstab", FSTAB.encode())
    rofs.add_file("/etc/hosts", HOSTS.encode())
    rofs.add_symlink("/etc/mnttab", "/proc/mounts")
    rofs.add_tree(runtime, GUEST_RUNTIME)
    rofs.add_dir(GUEST_APP)
    for guest, host in app_files:
        rofs.add_file(guest, host, mode=0o644)
    rofs.add_file(GUEST_AGENT, agent_jar, mode=0o644)
    for soname, host in libraries:
        rofs.add_file(f"{GUEST_LIB}/{soname}", host, mode=0o755)
    for name in DLOPEN_BY_NAME:
        if (runtime / "lib" / name).is_file() and name not in dict(libraries):
            rofs.add_symlink(f"{GUEST_LIB}/{name}", f"{GUEST_RUNTIME}/lib/{name}")
    return rofs


def runtime_release(runtime: Path) -> int | None:
    """The Java feature release of a runtime, from its `release` file (JAVA_VERSION="17.0.15")."""
    try:
        text = (runtime / "release").read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r'^JAVA_VERSION="?(?:1\.)?(\d+)', text, re.M)
    return int(found.group(1)) if found else None


def encoding_flags(release: int | None) -> list[str]:
    """JVM flags that make the JVM print UTF-8 on OSv (pure). OSv's nl_langinfo(CODESET) is always
    "ASCII" (libc/locale/langinfo.c), whatever LANG says, and the console is a tty, so the JVM sets
    the stdout/stderr encodings to ASCII and non-ASCII output becomes '?'. (sun.jnu.encoding, used for
    file names, can't be overridden: it stays ASCII.)"""
    if release is None or release <= 17:
        return ["-Dfile.encoding=UTF-8", "-Dsun.stdout.encoding=UTF-8", "-Dsun.stderr.encoding=UTF-8"]
    if release == 18:
        return ["-Dsun.stdout.encoding=UTF-8", "-Dsun.stderr.encoding=UTF-8"]
    return ["-Dstdout.encoding=UTF-8", "-Dstderr.encoding=UTF-8"]


def guest_argv(java_argv: list[str], release: int | None = None) -> list[str]:
    """java_argv for OSv (pure): the UTF-8 flags of `encoding_flags` right after the java path,
    unless the argv sets them."""
    argv = list(java_argv)
    if not argv:
        return argv
    extra = [flag for flag in encoding_flags(release)
             if not any(arg.startswith(flag.split("=", 1)[0] + "=") for arg in argv)]
    return argv[:1] + extra + argv[1:]


def boot_cmdline(argv: list[str], args: list[str], env: Mapping[str, str] | None = None,
                 options: Iterable[str] = BOOT_OPTIONS) -> str:
    """The OSv boot command line running `argv + args` (pure; UsageError past OSv's 1023 bytes, or
    for a non-ASCII word: OSv's command grammar is boost::spirit ascii::char_ (core/commands.cc), so
    OSv would stop with "Failed to parse command line.", and the JVM there decodes arguments as
    ASCII anyway)."""
    for i, word in enumerate([*argv, *args]):
        if not word.isascii():
            shown = word if len(word) <= 40 else word[:40] + "..."
            what = f"app argument {i - len(argv) + 1}" if i >= len(argv) else "java command-line word"
            raise UsageError(f"{what} {shown!r} is not ASCII; OSv's boot command line takes only ASCII",
                             hint="pass such text in a file or through the app's own configuration, or use --target linux")
    return build_cmdline(list(argv) + list(args), dict(GUEST_ENV if env is None else env),
                                  rootfs=ROOTFS, extra_opts=list(options))


def runtime_cmdline(boot, args: list[str] | None = None, agent: bool = False) -> str:
    """The command line `jvmkit run` passes with -append (pure): the image's own, or rebuilt with
    `args` (from `jvmkit run IMAGE -- ARGS`) in place of the image's default app arguments, and with
    the guest agent's flags when `agent` (a run with a seed disk: `--balloon`)."""
    if args is None and not agent:
        return boot.kernel_cmdline
    c = boot.cmdline
    argv = list(c.argv) if agent else [a for a in c.argv if a not in c.agent_flags]
    return boot_cmdline(argv, list(c.args) if args is None else list(args), c.env, c.options)


def seed_disk_image(seed: bytes) -> bytes:
    """The per-run seed as a raw 4 KiB disk image (pure): padded with newlines, which the agent's
    key=value reader skips. Attached as the second virtio-blk device it is /dev/vblk1 in the guest,
    read with one 4 KiB read (OSv fails reads past a block device's end with EIO, so a reader must
    not read on to EOF: InputStream.readNBytes(4096), not Files.readAllLines)."""
    if len(seed) > SEED_DISK_SIZE:
        raise JvmkitError(f"the seed is {len(seed)} bytes; the seed disk holds {SEED_DISK_SIZE}")
    return seed + b"\n" * (SEED_DISK_SIZE - len(seed))


