"""OSv disks and boot command lines: the MBR around a ROFS image, the classic single-file OSv disk,
the command line OSv parses, and qcow2 conversion.

Facts this module is written from (OSv's own tree):
- Partitions (fs/devfs/device.cc read_partition_table): OSv reads sector 0; only if bytes 510-511
  are 0x55 0xAA does it look at the four 16-byte entries from 0x1BE. An entry is used when its
  system id is non-zero and the 6-bit CHS start-sector field is non-zero; entry index i (0-based)
  becomes device `vblk0.i`. `--rootfs=rofs` mounts /dev/vblk0.1, so the ROFS goes in entry #2
  (offset 0x1CE). jvmkit writes type 0x83, LBA start/count and CHS as scripts/imgedit.py does, and
  starts the partition on a 2 MiB boundary, like OSv's scripts/build.
- Classic disk (Makefile loader.img, scripts/build, arch/x64/boot16.S): the boot sector (with the
  partition table and 0x55AA), the command line as a C string at byte 512 (the boot sector reads
  sectors 1-63 into memory and hands them to the kernel as its command line), the compressed
  loader (lzloader.elf) at sector 128 (byte 65536); the filesystem partition starts at the loader
  image's size rounded up to 2 MiB.
- Command line (core/commands.cc, loader.cc, include/osv/commands.hh): max_cmdline is 1024 bytes
  including the NUL. Leading tokens starting with '-' are loader options, split on space/tab/
  newline with '\\' escaping the next character (no quotes); `--env=K=V` does putenv("K=V").
  The rest is the app command: words separated by spaces, `;` `&` `!` end a command, a word is
  either "quoted" (escapes \\a \\b \\f \\n \\r \\t \\v \\\\ \\' \\") or unquoted (any characters but
  space ; & !, same escapes). Then in every word everything after the first `$` is replaced by
  that environment variable's value (no escape exists), so `build_cmdline` passes arguments that
  contain `$` through generated `--env=JVMKIT_ARGn=...` options.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping, Union

from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager.rofs import MAGIC, RofsBuilder, RofsImage, read_rofs, write_atomically

SECTOR = 512
PARTITION_ALIGN = 2 << 20
MBR_TABLE = 0x1BE
MBR_ENTRY = 16
MBR_SIGNATURE = b"\x55\xaa"
ROFS_PARTITION = 1  # 0-based entry index: entry #2 at 0x1CE, /dev/vblk0.1 in OSv
PARTITION_TYPE_LINUX = 0x83
CMDLINE_OFFSET = 512
CMDLINE_MAX = 1024  # OSv's max_cmdline, including the terminating NUL
CMDLINE_AREA_END = 64 * SECTOR  # the boot sector reads sectors 1..63 as the command line
LOADER_OFFSET = 128 * SECTOR
_CHUNK = 1 << 20

RofsSource = Union[RofsBuilder, str, os.PathLike, BinaryIO]


# -- MBR -------------------------------------------------------------------------------------


def _chs(lba: int) -> bytes:
    """The 3-byte CHS address of `lba` (255 heads, 63 sectors/track; clamped past cylinder 1023)."""
    cyl, rem = divmod(lba, 255 * 63)
    head, sec = divmod(rem, 63)
    sec += 1
    if cyl > 1023:
        cyl, head, sec = 1023, 254, 63
    return bytes((head, sec | ((cyl >> 8) & 0x3) << 6, cyl & 0xFF))


def mbr_entry(start_lba: int, sectors: int, system_id: int = PARTITION_TYPE_LINUX) -> bytes:
    """One 16-byte MBR partition entry (not bootable)."""
    if not (0 < start_lba < 1 << 32 and 0 < sectors < 1 << 32 and start_lba + sectors <= 1 << 32):
        raise JvmkitError(f"partition at sector {start_lba} with {sectors} sectors doesn't fit an MBR (2 TiB)")
    return (b"\0" + _chs(start_lba) + bytes((system_id,)) + _chs(start_lba + sectors - 1)
            + struct.pack("<II", start_lba, sectors))


def _write_partition_table(out: BinaryIO, start: int, size: int) -> None:
    """Put the ROFS partition in entry #2 of the MBR in `out` (entries 1, 3, 4 cleared)."""
    if start % SECTOR:
        raise JvmkitError(f"partition start {start} is not sector aligned")
    table = bytearray(4 * MBR_ENTRY)
    pos = ROFS_PARTITION * MBR_ENTRY
    table[pos:pos + MBR_ENTRY] = mbr_entry(start // SECTOR, -(-size // SECTOR))
    out.seek(MBR_TABLE)
    out.write(bytes(table) + MBR_SIGNATURE)


@dataclass(frozen=True)
class Partition:
    index: int  # 0-based entry index; OSv calls it vblk0.<index>
    system_id: int
    start_lba: int
    sectors: int

    @property
    def offset(self) -> int:
        return self.start_lba * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR

    @property
    def device(self) -> str:
        return f"vblk0.{self.index}"


def _read_head(disk: str | os.PathLike, n: int = SECTOR) -> bytes:
    try:
        with open(disk, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise JvmkitError(f"can't read disk image {os.fsdecode(disk)}: {exc.strerror}") from exc


def read_partitions(disk: str | os.PathLike) -> list[Partition]:
    """The partitions OSv would create devices for, read as fs/devfs/device.cc does."""
    mbr = _read_head(disk)
    if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE:
        return []
    out = []
    for index in range(4):
        e = mbr[MBR_TABLE + index * MBR_ENTRY:MBR_TABLE + (index + 1) * MBR_ENTRY]
        system_id = e[4]
        start_sector_field = e[2] & 0x3F
        if system_id == 0 or start_sector_field == 0:
            continue
        start, count = struct.unpack_from("<II", e, 8)
        out.append(Partition(index, system_id, start, count))
    return out


def rofs_partition(disk: str | os.PathLike) -> Partition:
    """The partition OSv mounts as root with --rootfs=rofs (vblk0.1), or a JvmkitError."""
    for part in read_partitions(disk):
        if part.index == ROFS_PARTITION:
            return part
    raise JvmkitError(f"{os.fsdecode(disk)} has no MBR partition entry #2 (OSv's /dev/vblk0.1); "
                      "OSv would fail with 'Could not mount rofs root filesystem'")


def read_disk_rofs(disk: str | os.PathLike) -> RofsImage:
    """Open the ROFS in a disk's partition #2, bounded to that partition (close it when done)."""
    part = rofs_partition(disk)
    return read_rofs(disk, offset=part.offset, limit=part.size)


# -- writing disks ---------------------------------------------------------------------------


def _copy_stream(src: BinaryIO, out: BinaryIO) -> int:
    n = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return n
        out.write(chunk)
        n += len(chunk)


def _copy_rofs_stream(src: BinaryIO, out: BinaryIO, name: str) -> int:
    first = src.read(_CHUNK)
    if len(first) < 8 or struct.unpack_from("<Q", first)[0] != MAGIC:
        raise JvmkitError(f"{name} is not a ROFS image (no ROFS magic at its start)")
    out.write(first)
    return len(first) + _copy_stream(src, out)


def _write_rofs(rofs: RofsSource, out: BinaryIO) -> int:
    if isinstance(rofs, RofsBuilder):
        return rofs.write(out)
    if isinstance(rofs, (str, bytes, os.PathLike)):
        try:
            with open(rofs, "rb") as src:
                return _copy_rofs_stream(src, out, os.fsdecode(rofs))
        except OSError as exc:
            raise JvmkitError(f"can't read ROFS image {os.fsdecode(rofs)}: {exc.strerror}") from exc
    return _copy_rofs_stream(rofs, out, "the ROFS stream")


def _pad_to(out: BinaryIO, pos: int, boundary: int) -> int:
    target = -(-pos // boundary) * boundary
    if target > pos:
        out.seek(target - 1)
        out.write(b"\0")
    out.seek(target)
    return target


@dataclass(frozen=True)
class DiskInfo:
    path: Path
    size: int  # bytes
    rofs_offset: int  # where the ROFS partition starts
    rofs_size: int  # its size in bytes (a whole number of sectors)


def _assemble(dest: Path, head_writer, rofs: RofsSource, cmdline: bytes | None) -> DiskInfo:
    info: dict = {}

    def build(out: BinaryIO) -> None:
        head_end = head_writer(out)
        start = _pad_to(out, head_end, PARTITION_ALIGN)
        size = _write_rofs(rofs, out)
        if size <= 0:
            raise JvmkitError("the ROFS image is empty")
        end = _pad_to(out, start + size, SECTOR)
        out.truncate(end)
        _write_partition_table(out, start, end - start)
        if cmdline is not None:
            _write_cmdline(out, cmdline)
        info.update(size=end, rofs_offset=start, rofs_size=end - start)

    write_atomically(dest, build)
    return DiskInfo(dest, info["size"], info["rofs_offset"], info["rofs_size"])


def write_rofs_disk(rofs: RofsSource, dest: str | os.PathLike) -> DiskInfo:
    """Write a data disk for a directly booted OSv kernel: an MBR whose entry #2 points at the
    ROFS image (a RofsBuilder, a ROFS image file, or a binary stream), which starts at 2 MiB."""

    def head(out: BinaryIO) -> int:
        out.write(b"\0" * SECTOR)  # MBR: table and signature are filled in at the end
        return SECTOR

    return _assemble(Path(dest), head, rofs, None)


def check_loader_image(loader: bytes) -> None:
    """Refuse anything that isn't OSv's loader.img (boot sector + lzloader ELF at sector 128)."""
    if loader[:4] == b"QFI\xfb":
        raise JvmkitError("the OSv loader image is a qcow2 disk, not a raw loader image",
                          hint="use the raw loader (osv-loader.qemu.x86_64 / build/last/loader.img)")
    if len(loader) < LOADER_OFFSET + 4 or loader[510:512] != MBR_SIGNATURE:
        raise JvmkitError("not an OSv loader image: no boot sector signature or too short",
                          hint="use osv-loader.qemu.x86_64 from an OSv release or build/last/loader.img")
    if loader[LOADER_OFFSET:LOADER_OFFSET + 4] != b"\x7fELF":
        raise JvmkitError("not an OSv loader image: no compressed loader (ELF) at sector 128",
                          hint="use osv-loader.qemu.x86_64 from an OSv release or build/last/loader.img")


def write_classic_disk(loader_image: str | os.PathLike, cmdline: str, rofs: RofsSource,
                       dest: str | os.PathLike) -> DiskInfo:
    """Write the classic single-file OSv disk: OSv's loader image (boot sector + compressed
    loader at sector 128), `cmdline` at byte 512, padding to the next 2 MiB boundary, then the
    ROFS in MBR partition entry #2."""
    raw_cmdline = _encode_cmdline(cmdline)
    loader_path = Path(loader_image)

    def head(out: BinaryIO) -> int:
        try:
            with open(loader_path, "rb") as src:
                first = src.read(LOADER_OFFSET + 4)
                check_loader_image(first)
                out.write(first)
                return len(first) + _copy_stream(src, out)
        except OSError as exc:
            raise JvmkitError(f"can't read the OSv loader image {loader_path}: {exc.strerror}") from exc

    return _assemble(Path(dest), head, rofs, raw_cmdline)


# -- the command line on disk ----------------------------------------------------------------


def _encode_cmdline(cmdline: str) -> bytes:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise UsageError("the OSv command line contains a NUL byte")
    if len(raw) + 1 > CMDLINE_MAX:
        raise UsageError(f"the OSv boot command line is {len(raw)} bytes; OSv accepts at most "
                         f"{CMDLINE_MAX - 1} (a {CMDLINE_MAX}-byte buffer with its NUL)",
                         hint="shorten JVM flags, program arguments, environment values or the class path")
    return raw


def _write_cmdline(out: BinaryIO, raw: bytes) -> None:
    out.seek(CMDLINE_OFFSET)
    out.write(raw.ljust(CMDLINE_MAX, b"\0"))


def set_cmdline(disk: str | os.PathLike, cmdline: str) -> None:
    """Replace the boot command line stored at byte 512 of a disk, in place (like OSv's
    `imgedit.py setargs`). Refuses disks without an MBR or with a partition in that area."""
    raw = _encode_cmdline(cmdline)
    mbr = _read_head(disk)
    if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE:
        raise JvmkitError(f"{os.fsdecode(disk)} has no MBR boot sector; it is not an OSv disk")
    for part in read_partitions(disk):
        if part.offset < CMDLINE_OFFSET + CMDLINE_MAX:
            raise JvmkitError(f"{os.fsdecode(disk)} has partition {part.device} at byte {part.offset}, "
                              "where the command line goes")
    with open(disk, "r+b") as out:
        _write_cmdline(out, raw)
        out.flush()
        os.fsync(out.fileno())


def read_cmdline(disk: str | os.PathLike) -> str | None:
    """The boot command line stored at byte 512 of a disk (up to the first NUL), or None when
    the disk has no command-line area (no MBR, or a partition starts there)."""
    head = _read_head(disk, CMDLINE_AREA_END)
    if len(head) < SECTOR or head[510:512] != MBR_SIGNATURE:
        return None
    if any(part.offset < CMDLINE_OFFSET + CMDLINE_MAX for part in read_partitions(disk)):
        return None
    return head[CMDLINE_OFFSET:].split(b"\0", 1)[0].decode(errors="replace")


# -- building and parsing command lines ------------------------------------------------------

_SAFE_WORD = re.compile(r"[A-Za-z0-9_./:=,+@%^~#*?\[\]{}()<>|-]+\Z")
_QUOTE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\a": "\\a", "\b": "\\b", "\f": "\\f",
                  "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
_OPTION_DELIMS = " \t\n"
ARG_ENV_PREFIX = "JVMKIT_ARG"


def quote_word(word: str) -> str:
    """One app-command word, written so OSv's command parser yields exactly `word` (before its
    `$` expansion, which build_cmdline routes around)."""
    if "\0" in word:
        raise UsageError(f"argument {word!r} contains a NUL byte, which OSv's command line can't carry")
    if _SAFE_WORD.match(word):
        return word
    return '"' + "".join(_QUOTE_ESCAPES.get(ch, ch) for ch in word) + '"'


def escape_option(option: str) -> str:
    """A loader option (e.g. --env=K=V), with the backslash escapes OSv's option splitter reads."""
    if "\0" in option:
        raise UsageError(f"boot option {option!r} contains a NUL byte")
    return "".join("\\" + ch if ch in _OPTION_DELIMS or ch == "\\" else ch for ch in option)


def build_cmdline(argv: list[str], env: Mapping[str, str] | None = None, *, rootfs: str | None = "rofs",
                  extra_opts: Iterable[str] = ()) -> str:
    """The OSv boot command line that runs `argv` with environment `env`:
    `--rootfs=rofs [extra opts] --env=K=V... argv...`. Refuses one longer than OSv's limit."""
    if not argv or not argv[0]:
        raise UsageError("the OSv command needs a program path")
    if argv[0].startswith("-"):
        raise UsageError(f"the OSv program path {argv[0]!r} starts with '-', which OSv reads as a boot option")
    env = dict(env or {})
    for key in env:
        if not key or "=" in key or "\0" in key:
            raise UsageError(f"environment variable name {key!r} is not usable (empty, or has '=' or NUL)")
    parts: list[tuple[str, str]] = []  # (rendered, description for the too-long message)
    if rootfs:
        parts.append((escape_option(f"--rootfs={rootfs}"), f"--rootfs={rootfs}"))
    for opt in extra_opts:
        if not opt.startswith("--"):
            raise UsageError(f"OSv boot option {opt!r} must start with '--'")
        parts.append((escape_option(opt), f"option {opt[:40]}"))
    for key, value in env.items():
        parts.append((escape_option(f"--env={key}={value}"), f"environment variable {key}"))
    words: list[tuple[str, str]] = []
    for i, arg in enumerate(argv):
        what = f"argument {i} ({arg[:40]}{'...' if len(arg) > 40 else ''})"
        if "$" in arg:
            # OSv replaces everything after the first '$' with an environment variable and has no
            # escape for it: pass the argument through a variable of its own.
            name = f"{ARG_ENV_PREFIX}{i}"
            if name in env:
                raise UsageError(f"environment variable {name} is reserved by jvmkit")
            parts.append((escape_option(f"--env={name}={arg}"), what))
            words.append(("$" + name, what))
        else:
            words.append((quote_word(arg), what))
    pieces = parts + words
    line = " ".join(rendered for rendered, _ in pieces)
    size = len(line.encode())
    if size + 1 > CMDLINE_MAX:
        longest = sorted(pieces, key=lambda p: -len(p[0].encode()))[:3]
        detail = ", ".join(f"{desc}: {len(r.encode())} bytes" for r, desc in longest)
        raise UsageError(
            f"the OSv boot command line would be {size} bytes; OSv accepts at most {CMDLINE_MAX - 1} "
            f"(max_cmdline {CMDLINE_MAX} with the NUL). Longest parts: {detail}",
            hint="shorten those: fewer or shorter JVM flags and arguments, shorter environment values, "
                 "or a shorter class path (fewer jars, shorter paths)")
    return line


@dataclass
class OsvCommandLine:
    options: list[str] = field(default_factory=list)  # loader options after unescaping
    env: dict[str, str] = field(default_factory=dict)  # from --env= options
    commands: list[list[str]] = field(default_factory=list)  # app commands after $-expansion
    ok: bool = True  # False where OSv would print "Failed to parse command line."


def _stresep(s: str, pos: int) -> tuple[str, int | None]:
    """OSv's stresep(&str, " \\t\\n", '\\\\'): one token from `pos`; returns (token, next pos or None)."""
    out = []
    while pos < len(s):
        ch = s[pos]
        pos += 1
        if ch == "\\" and pos < len(s):
            out.append(s[pos])
            pos += 1
            continue
        if ch in _OPTION_DELIMS:
            return "".join(out), pos
        out.append(ch)
    return "".join(out), None


_UNESC = {"\\a": "\a", "\\b": "\b", "\\f": "\f", "\\n": "\n", "\\r": "\r", "\\t": "\t", "\\v": "\v",
          "\\\\": "\\", "\\'": "'", '\\"': '"'}
_SPACE = " \t\n\v\f\r"


def _parse_app(line: str) -> tuple[list[list[str]], bool]:
    """OSv's boost::spirit command grammar (core/commands.cc parse_command_line_min)."""
    if all(ch in _SPACE + ";" for ch in line):
        return [], True
    commands: list[list[str]] = []
    pos, n = 0, len(line)

    def skip(p: int) -> int:
        while p < n and line[p] in _SPACE:
            p += 1
        return p

    def quoted(p: int) -> tuple[str, int] | None:
        if p >= n or line[p] != '"':
            return None
        p += 1
        out = []
        while p < n:
            if line[p:p + 2] in _UNESC:
                out.append(_UNESC[line[p:p + 2]])
                p += 2
            elif line[p] == '"':
                return "".join(out), p + 1
            else:
                out.append(line[p])
                p += 1
        return None

    def unquoted(p: int) -> tuple[str, int] | None:
        out = []
        while p < n:
            if line[p:p + 2] in _UNESC:
                out.append(_UNESC[line[p:p + 2]])
                p += 2
            elif line[p] in " ;&!":
                break
            else:
                out.append(line[p])
                p += 1
        return ("".join(out), p) if out else None

    while True:
        words: list[str] = []
        p = skip(pos)
        while True:
            got = quoted(p) or unquoted(p)
            if got is None:
                break
            words.append(got[0])
            p = skip(got[1])
        if not words:
            return commands, bool(commands) and skip(pos) >= n
        commands.append(words)
        if p >= n:
            return commands, True
        if line[p:p + 2] == "&!":
            pos = p + 2
        elif line[p] in ";&!":
            pos = p + 1
        else:
            return commands, False
        if skip(pos) >= n:
            return commands, True


def parse_cmdline(cmdline: str) -> OsvCommandLine:
    """What OSv makes of a boot command line: loader options (loader_parse_cmdline), the
    environment they set, and the app commands after OSv's `$VAR` expansion. For tests and
    `jvmkit inspect`."""
    result = OsvCommandLine()
    pos: int | None = 0
    app = ""
    while pos is not None:
        rest = cmdline[pos:]
        stripped = rest.lstrip(_OPTION_DELIMS)
        if not stripped.startswith("-"):
            app = rest
            break
        token, pos = _stresep(cmdline, pos)
        if token:
            result.options.append(token)
    for opt in result.options:
        if opt.startswith("--env=") and "=" in opt[6:]:
            key, value = opt[6:].split("=", 1)
            result.env[key] = value
        elif not opt.startswith("--"):
            result.ok = False  # OSv: "not an option"
    commands, ok = _parse_app(app)
    result.ok = result.ok and ok
    for words in commands:
        expanded = []
        for word in words:
            if "$" in word:
                head, key = word.split("$", 1)
                word = head + result.env.get(key, "")
            expanded.append(word)
        result.commands.append(expanded)
    return result


# -- qcow2 -----------------------------------------------------------------------------------


def convert_to_qcow2(raw_disk: str | os.PathLike, dest: str | os.PathLike, *, qemu_img: str | None = None) -> Path:
    """Convert a raw disk to qcow2 with `qemu-img convert` (temp file next to dest, then renamed)."""
    tool = qemu_img or shutil.which("qemu-img")
    if not tool:
        raise JvmkitError("qemu-img is not installed; it is needed to write qcow2 disks",
                          hint="install qemu-utils, or export with --format raw")
    dest_path = Path(dest)
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest_path.with_name(f".{dest_path.name}.{os.getpid()}.tmp")
    try:
        proc = subprocess.run([tool, "convert", "-q", "-f", "raw", "-O", "qcow2", os.fspath(raw_disk), os.fspath(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise JvmkitError(f"qemu-img convert failed for {os.fsdecode(raw_disk)}: {tail[0]}")
        os.replace(tmp, dest_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest_path
