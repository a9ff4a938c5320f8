"""OSv disks: the MBR around a ROFS image, the classic single-file OSv disk with its command line
at byte 512, and qcow2 conversion.

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
The command line itself is built in `cmdline.py`; `readers.py` reads all of this back as OSv does.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

from jvmkit import fileio, proc
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager.targets.osv.rofs import MAGIC, RofsBuilder, write_atomically
from jvmkit.packager.targets.osv.cmdline import CMDLINE_MAX

SECTOR = 512
PARTITION_ALIGN = 2 << 20
MBR_TABLE = 0x1BE
MBR_ENTRY = 16
MBR_SIGNATURE = b"\x55\xaa"
ROFS_PARTITION = 1  # 0-based entry index: entry #2 at 0x1CE, /dev/vblk0.1 in OSv
PARTITION_TYPE_LINUX = 0x83
CMDLINE_OFFSET = 512
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
    from jvmkit.packager.targets.osv.readers import _read_head, read_partitions

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


# -- qcow2 -----------------------------------------------------------------------------------


def convert_to_qcow2(raw_disk: str | os.PathLike, dest: str | os.PathLike, *, qemu_img: str | None = None) -> Path:
    """Convert a raw disk to qcow2 with `qemu-img convert` (temp file next to dest, then renamed)."""
    tool = qemu_img or shutil.which("qemu-img")
    if not tool:
        raise JvmkitError("qemu-img is not installed; it is needed to write qcow2 disks",
                          hint="install qemu-utils, or export with --format raw")
    with fileio.atomic_path(dest) as tmp:
        proc.run([tool, "convert", "-q", "-f", "raw", "-O", "qcow2", os.fspath(raw_disk), os.fspath(tmp)],
                 what=f"qemu-img convert of {os.fsdecode(raw_disk)}")
    return Path(dest)
