"""The `osv` target: the ROFS root disk, the OSv boot command line, the bundle, the console filter the
runner needs, and `jvmkit export` (the classic single-file OSv disk).

The root filesystem (ROFS, see `rofs.py`) sits in MBR partition entry #2 of a data disk
(`osv_disk.write_rofs_disk`), which OSv mounts as /dev/vblk0.1 with `--rootfs=rofs`:
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

The command line (`osv_disk.build_cmdline`): `--rootfs=rofs --power-off-on-abort --cwd=/ --verbose
--env=JAVA_HOME=/jvm java_argv app_args`, without the guest agent's flags. OSv has no fw_cfg reader,
so `jvmkit run IMAGE -- ARGS` (or `--balloon`, which starts the agent) rebuilds it with
`runtime_cmdline(boot, args, agent)` from what the manifest keeps (`boot["cmdline"]`).
java_argv gets UTF-8 output flags after the java path (`encoding_flags`: OSv's libc reports the
codeset as ASCII whatever LANG says) and its `-Djvmkit.seed=` pointed at the seed disk.

Exit status: OSv's exit() discards the status and powers off, but with `--verbose` it first logs
`program exited with status N` (runtime.cc), for every way a JVM ends (System.exit, the launcher's
exit); an int status is printed with %ld, so -1 shows as 4294967295 (mod 256 = 255, as on Linux).
`boot["exit_marker"]` is that prefix, so the runner's `parse_exit` reads it unchanged. OSv has one
console (ttyS0) for its messages and the app's output; `ConsoleFilter` splits them: everything up to
OSv's `Cmdline: ...` line is boot noise, then app output minus OSv's own lines, nothing after the
exit line. `--power-off-on-abort` makes a crashed guest power off instead of halting forever.

The per-run seed (JMX credentials) can't use fw_cfg here either: `write_seed_disk` writes it as a raw
4 KiB disk the runner attaches as a second virtio-blk device, which the guest reads at /dev/vblk1
(the JVM's `-Djvmkit.seed` points there; nothing secret is on the QEMU command line).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

import zstandard

from jvmkit import ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import bundle as bundles
from jvmkit.packager import native_libs, osv_disk
from jvmkit.packager.linux_image import compress_file
from jvmkit.packager.kernels.osv import resolve_osv_kernel  # noqa: F401  (pack.py calls it from here)
from jvmkit.packager.rofs import RofsBuilder

GUEST_RUNTIME = "/jvm"
GUEST_APP = "/app"
GUEST_AGENT = "/jvmkit/agent.jar"
GUEST_LIB = "/usr/lib"
ROOTFS = "rofs"
SEED_DEVICE = "/dev/vblk1"
LINUX_SEED = "/run/jvmkit/seed"  # what pack passes today; the osv image points the JVM at SEED_DEVICE
SEED_PROPERTY = "-Djvmkit.seed="
SEED_DISK_SIZE = 4096
# --cwd=/ as on linux (AppCDS's relative class path). The fixed addresses of QEMU's user network
# (the ones the linux guest's init sets too) replace OSv's DHCP exchange, which delays main.
BOOT_OPTIONS = ("--power-off-on-abort", "--cwd=/", "--verbose", "--ip=eth0,10.0.2.15,255.255.255.0",
                "--defaultgw=10.0.2.2", "--nameserver=10.0.2.3")
# pack's AGENT_FLAGS: the guest agent is started only for runs that ask for it (`run --balloon`)
AGENT_FLAGS = (SEED_PROPERTY + LINUX_SEED, f"-javaagent:{GUEST_AGENT}")
GUEST_ENV = {"JAVA_HOME": GUEST_RUNTIME}
EXIT_LINE = "program exited with status "
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


def _seed_on_osv(arg: str) -> str:
    return SEED_PROPERTY + SEED_DEVICE if arg == SEED_PROPERTY + LINUX_SEED else arg


def guest_argv(java_argv: list[str], release: int | None = None) -> list[str]:
    """java_argv for OSv (pure): the seed property pointed at the seed disk (OSv has no fw_cfg), and
    the UTF-8 flags of `encoding_flags` right after the java path, unless the argv sets them."""
    argv = [_seed_on_osv(arg) for arg in java_argv]
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
    return osv_disk.build_cmdline(list(argv) + list(args), dict(GUEST_ENV if env is None else env),
                                  rootfs=ROOTFS, extra_opts=list(options))


def runtime_cmdline(boot: Mapping, args: list[str] | None = None, agent: bool = False) -> str:
    """The command line `jvmkit run` passes with -append (pure): the image's own, or rebuilt with
    `args` (from `jvmkit run IMAGE -- ARGS`) in place of the image's default app arguments, and with
    the guest agent's flags when `agent` (a run with a seed disk: `--balloon`)."""
    if args is None and not agent:
        return boot["kernel_cmdline"]
    c = boot["cmdline"]
    flags = c.get("agent_flags", [])
    argv = c["argv"] if agent else [a for a in c["argv"] if a not in flags]
    return boot_cmdline(argv, c["args"] if args is None else list(args), c["env"], c["options"])


def write_bundle(staging: Path, *, kernel, java_argv: list[str], app_args: list[str], runtime: Path,
                 app_files: list[tuple[str, Path]], agent_jar: Path, mtime: int,
                 agent_flags: list[str] | None = None, lib_dirs: list[str] | None = None) -> dict:
    """Fill `staging` with the osv bundle's files; returns the manifest's `files` and `boot`.

    `kernel` is a `kernels.osv.OsvKernel` (anything with `.elf`). `agent_flags` (default: pack's
    AGENT_FLAGS) are left out of the image's own command line; `runtime_cmdline(boot, agent=True)`
    puts them back for runs with a seed. `mtime` is unused: ROFS stores no timestamps (OSv reports
    mtime 0 for every ROFS file), so the same inputs give the same bytes anyway."""
    console = ui.current()
    del mtime
    if getattr(kernel, "elf", None) is None:
        raise JvmkitError("the OSv kernel has no loader ELF to boot", hint="import OSv's build/last/loader-stripped.elf")
    argv = guest_argv(java_argv, runtime_release(runtime))
    agent = [flag for flag in map(_seed_on_osv, AGENT_FLAGS if agent_flags is None else agent_flags) if flag in argv]
    options = list(BOOT_OPTIONS)
    env = dict(GUEST_ENV)
    boot_cmdline(argv, list(app_args), env, options)  # with the agent: refuses a too-long line before any work
    cmdline = boot_cmdline([a for a in argv if a not in agent], list(app_args), env, options)
    libraries = support_libraries(runtime, lib_dirs)
    rofs = build_rofs(runtime=runtime, app_files=app_files, agent_jar=agent_jar, libraries=libraries)
    with console.step("ROFS disk: runtime, app, agent, libraries (zstd)"):
        fd, tmp_name = tempfile.mkstemp(prefix=".disk.", suffix=".img", dir=staging)
        os.close(fd)
        raw = Path(tmp_name)
        try:
            info = osv_disk.write_rofs_disk(rofs, raw)
            disk = compress_file(raw, staging / "disk.img.zst")
        finally:
            raw.unlink(missing_ok=True)
    with console.step(f"kernel: OSv {getattr(kernel, 'version', '?')} (zstd)"):
        kern = compress_file(Path(kernel.elf), staging / "kernel.zst")
    files = {
        "kernel": {"path": "kernel.zst", "compression": "zstd", **kern,
                   **bundles.file_record(staging / "kernel.zst")},
        "disk": {"path": "disk.img.zst", "compression": "zstd", **disk, "rofs_offset": info.rofs_offset,
                 "rofs_size": info.rofs_size, **bundles.file_record(staging / "disk.img.zst")},
    }
    boot = {
        "kernel_cmdline": cmdline,
        "cmdline": {"argv": argv, "agent_flags": agent, "args": list(app_args), "env": env, "options": options,
                    "rootfs": ROOTFS},
        "exit_marker": EXIT_LINE,
        "app_console": "ttyS0",
        "console_filter": "osv",
        "quiet_append": "",
        "verbose_append": "",
        "seed_device": SEED_DEVICE,
        "acpi_shutdown": True,
        "machine": "pc",
        "libraries": [soname for soname, _ in libraries],
    }
    return {"files": files, "boot": boot}


def seed_disk_image(seed: bytes) -> bytes:
    """The per-run seed as a raw 4 KiB disk image (pure): padded with newlines, which the agent's
    key=value reader skips. Attached as the second virtio-blk device it is /dev/vblk1 in the guest,
    read with one 4 KiB read (OSv fails reads past a block device's end with EIO, so a reader must
    not read on to EOF: InputStream.readNBytes(4096), not Files.readAllLines)."""
    if len(seed) > SEED_DISK_SIZE:
        raise JvmkitError(f"the seed is {len(seed)} bytes; the seed disk holds {SEED_DISK_SIZE}")
    return seed + b"\n" * (SEED_DISK_SIZE - len(seed))


def write_seed_disk(seed: bytes, dest: Path) -> Path:
    """`seed_disk_image(seed)` written to `dest` with mode 0600."""
    data = seed_disk_image(seed)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return dest


# ---- the console ---------------------------------------------------------------------------------------

_EXIT_RE = re.compile(rb"^(?P<pre>.*?)" + re.escape(EXIT_LINE.encode()) + rb"(?P<status>\d+)\s*$")
_OSV_LINES = [re.compile(p) for p in (
    rb"^/\S+: ignoring missing symbol \S+\s*$",        # --verbose: ELF loader
    rb"^\[[DIWE]/\d+ [^\]]*\]: ",                     # --verbose: tagged kernel log (dhcp, ...)
    rb"^program \S+ returned -?\d+\s*$",               # --verbose: main returned non-zero
    rb"^(Aborted|Halting\.|\[backtrace\])\s*$",        # abort()
    rb"^0x[0-9a-f]{16} <.*>\s*$",                      # backtrace frames
    rb"^page fault outside application",
    rb"^(random|VFS|ROFS): ",                          # --verbose: entropy, unmounts, cache stats
    rb"^Powering off\.\s*$",                           # osv::shutdown (e.g. the ACPI power button)
    rb"^\w+\(\) stubbed\s*$",                         # WARN_STUBBED
    rb"^syscall\(\): unimplemented system call \d+\s*$",
)]


class ConsoleFilter:
    """Splits OSv's one console into the app's output and OSv's own messages.

    Feed it the bytes of ttyS0 as they come; app lines go to `app_out`, OSv's to `osv_out` (or
    nowhere). Until OSv's `Cmdline: ...` line everything is OSv's; then lines are the app's unless
    they are OSv's (ELF loader warnings, tagged logs, crash reports); from `program exited with
    status N` on (N in `.status`) everything is OSv's shutdown. Carriage returns before a newline
    are dropped. `flush_partial()` passes on an unfinished app line (call it when the console is idle)."""

    def __init__(self, app_out: BinaryIO, osv_out: BinaryIO | None = None):
        self.app_out = app_out
        self.osv_out = osv_out
        self.state = "boot"
        self.status: int | None = None
        self._buf = b""
        self._midline = False  # part of the current app line was already passed on

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            self._line(line[:-1] if line.endswith(b"\r") else line, ended=True)
        self._flush_outputs()

    def flush_partial(self) -> None:
        if self._buf and self.state == "app":
            self._write(self.app_out, self._buf)
            self._buf = b""
            self._midline = True
            self._flush_outputs()

    def close(self) -> None:
        if self._buf:
            self._line(self._buf, ended=False)
            self._buf = b""
        self._flush_outputs()

    def _write(self, out: BinaryIO | None, data: bytes) -> None:
        if out is not None and data:
            out.write(data)

    def _flush_outputs(self) -> None:
        for out in (self.app_out, self.osv_out):
            if out is not None and hasattr(out, "flush"):
                out.flush()

    def _line(self, line: bytes, ended: bool) -> None:
        nl = b"\n" if ended else b""
        midline, self._midline = self._midline, False
        if self.state == "boot":
            self._write(self.osv_out, line + nl)
            if line.startswith(b"Cmdline: "):
                self.state = "app"
            return
        if self.state == "done":
            self._write(self.osv_out, line + nl)
            return
        found = _EXIT_RE.match(line)
        if found:
            self.status = int(found.group("status")) % 256
            self.state = "done"
            pre = found.group("pre")
            if pre or midline:
                self._write(self.app_out, pre + b"\n")
            self._write(self.osv_out, line[len(pre):] + nl)
            return
        if not midline and any(p.match(line) for p in _OSV_LINES):
            self._write(self.osv_out, line + nl)
            return
        self._write(self.app_out, line + nl)


# ---- export: the classic single-file OSv disk ------------------------------------------------------------

class _Window:
    """A read-only stream of the next `size` bytes of `inner` (after skipping `skip`)."""

    def __init__(self, inner: BinaryIO, skip: int, size: int):
        self.inner = inner
        while skip:
            chunk = inner.read(min(skip, 1 << 20))
            if not chunk:
                raise JvmkitError("the image's disk is shorter than its manifest says", hint="pack it again")
            skip -= len(chunk)
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.inner.read(n)
        self.left -= len(data)
        return data


def _find_loader_image(kernel_info: Mapping) -> Path | None:
    from jvmkit.packager.kernels import osv

    wanted = kernel_info.get("loader_image_sha256")
    for row in osv.list_osv_kernels():
        if not row.get("loader_image"):
            continue
        kernel = osv.load_osv_kernel(Path(row["path"]))
        if kernel.loader_image is None:
            continue
        if (wanted and kernel.loader_image_sha256 == wanted) or (not wanted and kernel.sha256 == kernel_info.get("sha256")):
            return kernel.loader_image
    return None


def export_classic(image, loader_image: str | os.PathLike | None, dest: str | os.PathLike,
                   fmt: str = "raw") -> Path:
    """Write the classic single-file OSv disk of an osv image (`jvmkit export IMAGE --format raw|qcow2`):
    OSv's loader image (boot sector + compressed loader), the image's command line at byte 512, and
    its ROFS in MBR partition #2. The loader image is `loader_image`, else the one cached with the
    image's kernel."""
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"--format {fmt!r} is not raw or qcow2")
    image = image if isinstance(image, bundles.Bundle) else bundles.load(Path(image))
    if image.target != "osv":
        raise UsageError(f"{image.path} is a {image.target} image; export writes OSv disks",
                         hint="pack it with --target osv")
    kernel_info = image.manifest.get("kernel", {})
    if loader_image is None:
        loader = _find_loader_image(kernel_info)
        if loader is None:
            raise JvmkitError(
                f"no OSv loader image for this image's kernel ({kernel_info.get('version', '?')}) is in the cache; "
                "a classic disk boots through OSv's loader image, not the loader ELF",
                hint="import it with `jvmkit kernel import osv PATH/TO/osv/build/last/loader.img` (next to the "
                     "loader-stripped.elf you packed with), or pass the loader image explicitly")
    else:
        loader = Path(loader_image)
        expected = kernel_info.get("loader_image_sha256")
        if expected and bundles.sha256_file(loader) != expected:
            ui.current().warn(f"{loader} is not the loader image recorded with this image's kernel; "
                              "the disk boots the kernel inside it")
    record = image.manifest["files"]["disk"]
    dest = Path(dest)
    cmdline = image.manifest["boot"]["kernel_cmdline"]
    with open(image.file("disk"), "rb") as compressed:
        reader = zstandard.ZstdDecompressor().stream_reader(compressed)
        rofs = _Window(reader, int(record["rofs_offset"]), int(record["rofs_size"]))
        if fmt == "raw":
            osv_disk.write_classic_disk(loader, cmdline, rofs, dest)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".raw", dir=dest.parent)
        os.close(fd)
        try:
            osv_disk.write_classic_disk(loader, cmdline, rofs, tmp_name)
            osv_disk.convert_to_qcow2(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    return dest
