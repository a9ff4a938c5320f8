"""The bundle's compressed files: deterministic zstd streams and their manifest records.

A compressed file's record carries the digest and size of both forms: `run` checks the compressed
bytes it was given and unpacks the raw form into the boot cache once, keyed by the raw digest.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from jvmkit import fileio
from jvmkit.errors import UsageError
from jvmkit.packager.manifest import FileRecord

ZSTD_LEVEL = 10


@contextmanager
def compressed_writer(dest: Path) -> Iterator[fileio.HashingWriter]:
    """A sink whose bytes are written zstd-compressed to `dest`; it hashes and counts the raw
    bytes (`.hexdigest()`, `.size`) for the file's record."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    with open(dest, "wb") as out, compressor.stream_writer(out, closefd=False) as zout:
        sink = fileio.HashingWriter(zout)
        yield sink


def record(staging: Path, name: str, raw: fileio.HashingWriter, **extra) -> FileRecord:
    """The manifest record of `staging/name`, a zstd file whose raw form went through `raw`."""
    path = staging / name
    return FileRecord(path=name, sha256=fileio.sha256_file(path), size=path.stat().st_size, compression="zstd",
                      raw_sha256=raw.hexdigest(), raw_size=raw.size, **extra)


def compress_file(source: Path, staging: Path, name: str, **extra) -> FileRecord:
    """zstd-compress `source` to `staging/name` deterministically; returns its record."""
    with compressed_writer(staging / name) as sink, open(source, "rb") as src:
        _copy(src, sink)
    return record(staging, name, sink, **extra)


def _copy(src: BinaryIO, sink) -> None:
    while chunk := src.read(fileio.CHUNK):
        sink.write(chunk)


class CheckedReader:
    """A zstd file's raw bytes, read(): a damaged or hostile stream is one UsageError naming `what`
    (zstandard raises its own ZstdError mid-read, which reached users as a traceback)."""

    def __init__(self, src: BinaryIO, what: str):
        self._reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
        self.what = what

    def read(self, size: int = -1) -> bytes:
        try:
            return self._reader.read(size)
        except zstandard.ZstdError as exc:
            raise UsageError(f"{self.what} is not a valid zstd stream ({exc})",
                             hint="this image is damaged or hostile: pack it again") from None


def unpack_checked(src_path: Path, record: FileRecord, out: BinaryIO, what: str) -> None:
    """Write the raw form of the zstd file `src_path` to `out`, never more than the record's
    `raw_size`, and check it against the record's raw size and SHA-256: a bomb, a lying size or a
    changed byte is one UsageError naming `what` (the caller removes what it wrote)."""
    damaged = "this image is damaged or hostile; do not use it"
    digest, size = hashlib.sha256(), 0
    with open(src_path, "rb") as src:
        reader = CheckedReader(src, what)
        while chunk := reader.read(1 << 20):
            size += len(chunk)
            if size > record.raw_size:
                raise UsageError(f"{what} decompresses to more than the {record.raw_size} bytes its manifest says",
                                 hint=damaged)
            digest.update(chunk)
            out.write(chunk)
    if size != record.raw_size or digest.hexdigest() != record.raw_sha256:
        raise UsageError(f"{what} does not decompress to the {record.raw_size} bytes and SHA-256 its manifest says",
                         hint=damaged)
