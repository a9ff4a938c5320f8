"""x86 bzImage files: the boot protocol header, where the compressed kernel sits, and getting the
uncompressed ELF (`vmlinux`) out of it, as the kernel's scripts/extract-vmlinux does (pure).

The payload may be zstd, xz, lzma, gzip, bzip2 or LZ4 in the "legacy" frame format the kernel's
build uses (`lz4 -l`: a magic number, then size-prefixed blocks of at most 8 MiB that are each
compressed on their own). LZ4 is decoded by the `lz4` package (`lz4.block`; the `fast` extra)
when it is installed, otherwise by the pure-Python decoder here (measured on this 2-core machine, a
30 MiB legacy frame of high-compression blocks: 2.7 s pure, 0.06 s with lz4.block). The two are
checked against each other by tests/test_kernels_linux.py.
"""

from __future__ import annotations

import bz2
import lzma
import re
import struct
import zlib

import zstandard

try:  # optional: jvmkit[fast]
    import lz4.block as lz4_block
except ImportError:  # pragma: no cover - depends on the environment
    lz4_block = None

PAYLOAD_MAGICS = (
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b\x08"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
)
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # the most a legacy block decompresses to
MAX_SCAN_HITS = 32  # per magic, when scanning a blob without a usable header


def bzimage_header(data: bytes) -> dict | None:
    """The x86 boot protocol header of a bzImage ("HdrS" at 0x202), or None if it isn't one."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    protocol = struct.unpack_from("<H", data, 0x206)[0]
    setup_sects = data[0x1F1] or 4
    header = {"protocol": protocol, "setup_size": (setup_sects + 1) * 512, "kernel_version": None,
              "payload_offset": None, "payload_length": None}
    version_ptr = struct.unpack_from("<H", data, 0x20E)[0]
    if version_ptr and version_ptr + 0x200 < len(data):
        start = version_ptr + 0x200
        end = data.find(b"\0", start, start + 256)
        if end > start:
            header["kernel_version"] = data[start:end].decode("ascii", "replace")
    if protocol >= 0x208:
        offset, length = struct.unpack_from("<II", data, 0x248)
        if length:
            header["payload_offset"] = header["setup_size"] + offset
            header["payload_length"] = length
    return header


def kernel_release(data: bytes) -> str | None:
    """The kernel release (`uname -r`) of a bzImage (boot header) or vmlinux (linux_banner)."""
    header = bzimage_header(data)
    if header and header["kernel_version"]:
        return header["kernel_version"].split()[0]
    m = re.search(rb"Linux version (\S+) \(", data)
    return m.group(1).decode("ascii", "replace") if m else None


def detect_format(data: bytes, offset: int = 0) -> str | None:
    for fmt, magic in PAYLOAD_MAGICS:
        if data.startswith(magic, offset):
            return fmt
    return None


def payload_candidates(data: bytes) -> list[tuple[int, str, int | None]]:
    """Where a compressed kernel may start: (offset, format, length or None), best guess first.

    The boot header's payload_offset comes first; then every place one of the compressors' magic
    numbers occurs (as the kernel's extract-vmlinux script does)."""
    result: list[tuple[int, str, int | None]] = []
    header = bzimage_header(data)
    if header and header["payload_offset"] is not None:
        fmt = detect_format(data, header["payload_offset"])
        if fmt:
            result.append((header["payload_offset"], fmt, header["payload_length"]))
    hits = []
    for fmt, magic in PAYLOAD_MAGICS:
        start, count = 0, 0
        while count < MAX_SCAN_HITS:
            at = data.find(magic, start)
            if at < 0:
                break
            hits.append((at, fmt, None))
            start, count = at + 1, count + 1
    result += sorted(h for h in hits if h[:2] not in {r[:2] for r in result})
    return result


# ---- LZ4 -----------------------------------------------------------------------------------------

def _length(src: bytes | memoryview, pos: int, value: int) -> tuple[int, int]:
    """An LZ4 length whose 4-bit field was 15: add the extension bytes (255 means more follow)."""
    while True:
        b = src[pos]
        pos += 1
        value += b
        if b != 255:
            return value, pos


def lz4_block_decompress(src: bytes | memoryview, out: bytearray, pos: int, end: int) -> None:
    """Decompress one LZ4 block src[pos:end], appending to `out` (which also serves as the window)."""
    while pos < end:
        token = src[pos]
        pos += 1
        literals = token >> 4
        if literals == 15:
            literals, pos = _length(src, pos, literals)
        if literals:
            out += src[pos:pos + literals]
            pos += literals
        if pos >= end:
            break
        offset = src[pos] | (src[pos + 1] << 8)
        pos += 2
        length = token & 15
        if length == 15:
            length, pos = _length(src, pos, length)
        length += 4
        start = len(out) - offset
        if offset == 0 or start < 0:
            raise ValueError("corrupt LZ4 block (bad match offset)")
        if offset >= length:
            out += out[start:start + length]
        else:  # overlapping copy: a repeated pattern
            pattern = bytes(out[start:])
            q, r = divmod(length, offset)
            out += pattern * q + pattern[:r]


def lz4_legacy_blocks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each compressed block of an LZ4 legacy frame.

    Stops at the end of the data or at a size field that can't be a block (the kernel appends the
    uncompressed size after the last block); a repeated magic number (concatenated frames) is skipped."""
    if len(data) < 4 or struct.unpack_from("<I", data, 0)[0] != LZ4_LEGACY_MAGIC:
        raise ValueError("not an LZ4 legacy frame")
    blocks = []
    pos = 4
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        if size == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(data):
            break
        blocks.append((pos + 4, pos + 4 + size))
        pos += 4 + size
    return blocks


def lz4_legacy_decompress(data: bytes, *, fast: bool = True) -> bytes:
    """Decompress the LZ4 legacy frame format the kernel uses.

    With `fast` and the `lz4` package installed each block goes through `lz4.block` (C); a block it
    refuses is decoded here, which raises ValueError if it is really corrupt."""
    view = memoryview(data)
    out = bytearray()
    for start, end in lz4_legacy_blocks(data):
        if fast and lz4_block is not None:
            try:
                out += lz4_block.decompress(view[start:end], uncompressed_size=LZ4_LEGACY_BLOCK)
                continue
            except lz4_block.LZ4BlockError:
                pass
        try:
            lz4_block_decompress(view, out, start, end)
        except IndexError:
            raise ValueError("corrupt LZ4 block (truncated)") from None
    return bytes(out)


# ---- the payload ---------------------------------------------------------------------------------

def decompress_payload(data: bytes, fmt: str) -> bytes:
    """Decompress one compressed stream at the start of `data` (trailing bytes are ignored)."""
    if fmt == "zstd":
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj().decompress(data)
    if fmt == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if fmt == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if fmt == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if fmt == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if fmt == "lz4":
        return lz4_legacy_decompress(data)
    raise ValueError(f"unknown compression {fmt}")


def extract_vmlinux(image: bytes) -> tuple[bytes, str]:
    """The uncompressed ELF kernel inside a bzImage, and the compression it used.

    Tries the boot header's payload first, then every compressor magic found in the image; the first
    candidate that decompresses to an ELF file wins. Raises ValueError when none does."""
    errors = []
    for offset, fmt, length in payload_candidates(image):
        chunk = image[offset:offset + length] if length else image[offset:]
        try:
            result = decompress_payload(chunk, fmt)
        except (ValueError, lzma.LZMAError, zlib.error, zstandard.ZstdError, OSError, EOFError) as exc:
            errors.append(f"{fmt}@{offset}: {exc}")
            continue
        if result[:4] == b"\x7fELF":
            return result, fmt
        errors.append(f"{fmt}@{offset}: not an ELF file")
    raise ValueError("no compressed ELF kernel found in the image" + (f" ({errors[0]})" if errors else ""))
