"""Digests and atomic writes: the one SHA-256 helper and the one temp-file-then-rename writer.

Every file jvmkit publishes (cache entries' files, downloads, disks, stamps, state files) is
written to a temporary sibling and renamed into place, so a reader never sees half of it and a
failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from jvmkit.errors import JvmkitError

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashingWriter:
    """A file-like sink that hashes (SHA-256) and counts what passes through it to `inner`."""

    def __init__(self, inner: BinaryIO | None = None):
        self.inner = inner
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        if self.inner is not None:
            self.inner.write(data)
        return len(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it gets `mode` and replaces `path`,
    on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """An open binary file that becomes `path` when the with-block ends without an exception."""
    with atomic_path(path, mode) as tmp:
        with open(tmp, "wb") as handle:
            yield handle


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write a whole file via a temporary sibling and rename."""
    with atomic_open(path, mode) as handle:
        handle.write(data)


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """A secret's file (seed, credentials): created 0600 from the start, never wider."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)
    return path


class Window(io.RawIOBase):
    """A read-only stream of the `size` bytes of `inner` that start at byte `offset`.

    A seekable `inner` (an open file: an ar member of a .deb) is read positionally, seeking before
    every read, so the handle may be shared. An unseekable one (a decompressor's stream) is
    advanced once by reading and dropping `offset` bytes; if it ends before that, JvmkitError
    names `what` (with `hint`). Reads past the window's end return b"". Closing the window leaves
    `inner` open. Wrap it in `io.BufferedReader` for many small reads."""

    def __init__(self, inner: BinaryIO, offset: int, size: int, *, what: str = "the stream",
                 hint: str | None = None):
        super().__init__()
        self._inner, self._start, self._size, self._pos = inner, offset, max(0, size), 0
        self._positional = bool(getattr(inner, "seekable", lambda: False)())
        skip = 0 if self._positional else offset
        while skip:
            chunk = inner.read(min(skip, CHUNK))
            if not chunk:
                raise JvmkitError(f"{what} is shorter than expected: it ends before byte {offset}", hint=hint)
            skip -= len(chunk)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        if self._positional:
            self._inner.seek(self._start + self._pos)
        data = self._inner.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)
