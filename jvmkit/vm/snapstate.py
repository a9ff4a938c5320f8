"""A snapshot's state file: QEMU's migration stream through a pipe, compressed by jvmkit itself.

Saving: QEMU gets the write end of a pipe over QMP (`getfd`, SCM_RIGHTS) and `migrate fd:NAME`
writes the paused VM into it; a thread here compresses what comes out (zstandard, the Python
binding jvmkit already uses for images) into the state file and hashes it on the way. Restoring:
the restoring QEMU inherits the read end of a pipe (`-incoming fd:N`) and a thread here reads the
state file, hashes it and decompresses it into the pipe, so the digest check costs no time of its
own: a file that does not match its digest, or does not decompress, never reaches `cont`.

Why a pipe and not QEMU's `exec:` URI (QEMU 7.2 has no `file:`): measured here under TCG with the
httpd sample at 512M, the same stream, three restores each: `-incoming "exec:zstd -dc FILE"` gave
the first HTTP answer after 0.43-0.46 s (linux; OSv 0.30-0.36 s), the pipe fed from Python
0.32-0.33 s (one of three 0.61 s on the busy machine; OSv 0.22-0.37 s): no /bin/sh and zstd
process per restore. Saving took the same 1.0 s (linux) either way. It also needs no `zstd`
binary, puts no path through a shell (`exec:` runs `/bin/sh -c`), and works where QEMU cannot see
the bundle's files (a chroot).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import zstandard

from jvmkit.errors import JvmkitError
from jvmkit.fileio import HashingWriter

CHUNK = 1 << 20
# zstd level 1: the migration stream is page-sized records of guest memory; level 3 took longer
# to save and to restore for a few percent less (benchmarks/snapshot.py prints the sizes).
LEVEL = 1


class StateError(JvmkitError):
    """A state file that cannot be read, decompressed or does not match its digest."""


@dataclass(frozen=True)
class Saved:
    sha256: str
    size: int
    raw_size: int


class Saver(threading.Thread):
    """Compress what arrives on `read_fd` into `dest` until EOF (QEMU closes its end when the
    migration ends); `result` then holds the digest and sizes, or `error` what went wrong."""

    def __init__(self, read_fd: int, dest: Path):
        super().__init__(name="jvmkit-snapshot-save", daemon=True)
        self.read_fd, self.dest = read_fd, dest
        self.result: Saved | None = None
        self.error: str | None = None

    def run(self) -> None:
        raw = 0
        try:
            fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(self.read_fd, "rb", buffering=0) as src, os.fdopen(fd, "wb") as out:
                hashing = HashingWriter(out)
                with zstandard.ZstdCompressor(level=LEVEL).stream_writer(hashing, closefd=False) as z:
                    while chunk := src.read(CHUNK):
                        raw += len(chunk)
                        z.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            self.result = Saved(hashing.hexdigest(), hashing.size, raw)
        except (OSError, zstandard.ZstdError) as exc:
            self.error = f"writing the state file {self.dest}: {exc}"


class Feeder(threading.Thread):
    """Read `src`, check it against `sha256` and decompress it into `write_fd` (the restoring
    QEMU's `-incoming fd:`). `ok` is True once all of it went through and matched; on any failure
    the pipe is closed early, so QEMU's load fails and it exits."""

    def __init__(self, src: Path, write_fd: int, sha256: str):
        super().__init__(name="jvmkit-snapshot-feed", daemon=True)
        self.src, self.write_fd, self.sha256 = src, write_fd, sha256
        self.ok = False
        self.error: str | None = None

    def run(self) -> None:
        digest = hashlib.sha256()
        try:
            with open(self.src, "rb") as src, os.fdopen(self.write_fd, "wb", buffering=0) as pipe:
                with zstandard.ZstdDecompressor().stream_writer(pipe, closefd=False) as z:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        z.write(chunk)
            if digest.hexdigest() != self.sha256:
                self.error = "the state file does not match its SHA-256 (damaged?)"
            else:
                self.ok = True
        except zstandard.ZstdError as exc:
            self.error = f"the state file does not decompress ({exc})"
        except BrokenPipeError:
            self.error = "QEMU stopped reading the state"
        except OSError as exc:
            self.error = f"reading the state file: {exc.strerror or exc}"


def send_fd(qmp_socket: socket.socket, name: str, fd: int) -> None:
    """QMP `getfd NAME` with `fd` attached (SCM_RIGHTS): QEMU keeps a copy under that name."""
    message = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode() + b"\n"
    socket.send_fds(qmp_socket, [message], [fd])
