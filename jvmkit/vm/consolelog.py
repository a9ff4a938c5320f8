"""The guest console, read through a pipe and kept on disk within a bound.

QEMU used to write the console to a file itself (`-chardev file`, or stdio's `logfile=`), so a
guest printing forever filled the host's disk. Now QEMU writes into a pipe and jvmkit reads it:
`BoundedLog` keeps at most `cap` bytes in `console.log` and the previous `cap` in `console.log.1`
(rotated when the current one is full), so a run holds at most 2 x cap of console on disk while
`written` counts everything the guest printed. The end of the console is what the runner reads
(the exit marker, a kernel panic, OSv's failures all come last), and that is what is kept.

A pipe also bounds the rate: when jvmkit does not read, QEMU's write blocks and the guest's serial
port stalls; nothing piles up anywhere.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable

CAP = 4 << 20          # bytes per file: the run's console log is at most twice this


class BoundedLog:
    """An append-only log of at most `cap` bytes per file, rotated once (thread-safe)."""

    def __init__(self, path: Path, cap: int = CAP):
        self.path, self.cap = Path(path), cap
        self.old = self.path.with_name(self.path.name + ".1")
        self.written = 0
        self._lock = threading.Lock()
        self._size = 0
        self._file = self._open()

    def _open(self) -> BinaryIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return os.fdopen(fd, "wb", buffering=0)

    def write(self, data: bytes) -> None:
        with self._lock:
            self.written += len(data)
            while data:
                room = self.cap - self._size
                if room <= 0:
                    self._file.close()
                    os.replace(self.path, self.old)
                    self._file, self._size = self._open(), 0
                    room = self.cap
                part, data = data[:room], data[room:]
                self._file.write(part)
                self._size += len(part)

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def data(self) -> bytes:
        """What is kept: the rotated file, then the current one."""
        out = b""
        for path in (self.old, self.path):
            try:
                out += path.read_bytes()
            except OSError:
                pass
        return out

    def text(self) -> str:
        return self.data().decode(errors="replace")

    def on_disk(self) -> int:
        return sum(p.stat().st_size for p in (self.old, self.path) if p.exists())


def pump(fd: int, log: BoundedLog, forward: Callable[[bytes], None] | None = None) -> None:
    """Read `fd` until EOF into `log` (and `forward` each chunk, e.g. to stderr or to the
    target's console pump); closes `fd`."""
    try:
        while chunk := os.read(fd, 65536):
            log.write(chunk)
            if forward is not None:
                try:
                    forward(chunk)
                except (OSError, ValueError):
                    forward = None
    except OSError:
        pass
    finally:
        os.close(fd)


def tee(fd: int, log: BoundedLog) -> tuple[int, threading.Thread]:
    """A pipe that carries what `fd` carries, logged on the way (the returned thread copies, until
    EOF): the target's own console pump reads the returned fd as it read QEMU's stdout before."""
    read_end, write_end = os.pipe()

    def forward(chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:  # blocks while the pump is behind: the guest waits, nothing piles up
            view = view[os.write(write_end, view):]

    def run() -> None:
        try:
            pump(fd, log, forward)
        finally:
            os.close(write_end)

    thread = threading.Thread(target=run, daemon=True, name="console-tee")
    thread.start()
    return read_end, thread
