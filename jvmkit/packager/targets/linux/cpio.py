"""A small, deterministic writer for the cpio "newc" format the Linux kernel unpacks as initramfs.

Entries are written in the order given (callers sort them); every header carries fixed inode
numbers, owner root:root, one link, and a fixed mtime, so the same entries always give the same
bytes. File contents are streamed from disk in chunks; device nodes (such as /dev/console) are
written straight into the archive, so building an initramfs needs no root.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

TRAILER = "TRAILER!!!"
_CHUNK = 1 << 20


class CpioWriter:
    def __init__(self, out: BinaryIO, mtime: int = 0):
        self.out = out
        self.mtime = mtime
        self.offset = 0
        self._ino = 0x10000

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)

    def _pad(self) -> None:
        if self.offset % 4:
            self._write(b"\0" * (4 - self.offset % 4))

    def _header(self, name: str, mode: int, size: int, rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        name_bytes = name.encode() + b"\0"
        self._ino += 1
        fields = (self._ino, mode, 0, 0, nlink, self.mtime, size, 0, 0, rdev[0], rdev[1], len(name_bytes), 0)
        self._write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self._write(name_bytes)
        self._pad()

    @staticmethod
    def _name(path: str) -> str:
        name = path.lstrip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad archive path {path!r}")
        return name

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._header(self._name(path), stat.S_IFDIR | mode, 0, nlink=2)

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._header(self._name(path), stat.S_IFREG | mode, len(data))
        self._write(data)
        self._pad()

    def add_file(self, path: str, source: Path, mode: int | None = None) -> None:
        """Stream a host file into the archive (mode from the source's exec bit unless given)."""
        st = source.stat()
        if mode is None:
            mode = 0o755 if st.st_mode & 0o111 else 0o644
        self._header(self._name(path), stat.S_IFREG | mode, st.st_size)
        with open(source, "rb") as handle:
            copied = 0
            while chunk := handle.read(_CHUNK):
                self._write(chunk)
                copied += len(chunk)
        if copied != st.st_size:
            raise OSError(f"{source} changed size while being archived")
        self._pad()

    def add_symlink(self, path: str, target: str) -> None:
        data = target.encode()
        self._header(self._name(path), stat.S_IFLNK | 0o777, len(data))
        self._write(data)
        self._pad()

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._header(self._name(path), stat.S_IFCHR | mode, 0, rdev=(major, minor))

    def add_tree(self, host_dir: Path, guest_prefix: str) -> None:
        """Add a host directory tree under `guest_prefix`, in sorted order, keeping symlinks."""
        guest_prefix = guest_prefix.rstrip("/")
        self.add_dir(guest_prefix)
        for entry in sorted(host_dir.iterdir(), key=lambda p: p.name.encode()):
            guest = f"{guest_prefix}/{entry.name}"
            if entry.is_symlink():
                self.add_symlink(guest, str(entry.readlink()))
            elif entry.is_dir():
                self.add_tree(entry, guest)
            elif entry.is_file():
                self.add_file(guest, entry)

    def close(self) -> None:
        self._ino = 0
        self._header(TRAILER, 0, 0, nlink=1)
        if self.offset % 512:
            self._write(b"\0" * (512 - self.offset % 512))
