"""OSv's ROFS (read-only filesystem): a deterministic, streaming writer.

This module owns the on-disk format only (no MBR, no disks: see `disk.py`; the reader is in `readers.py`). The format, as
OSv's `fs/rofs/rofs_vfsops.cc` and `rofs_vnops.cc` read it, little-endian, 512-byte blocks
(OSv addresses ROFS blocks as `block << 9` whatever the super block says):

    block 0                super block: 8 x u64 = magic 0xDEADBEAD, version 1, block size 512,
                           structure-info first block, structure-info block count,
                           directory-entry count, symlink count, inode count (rest of block zero)
    blocks 1..             file data, each file starting on a block boundary, zero-padded
    structure info         (starts on a block boundary, zero-padded to whole blocks; OSv reads it
                           into memory at mount time and rejects a count of 0)
        directory entries  u64 inode number, u16 name length, name bytes (no NUL)
        symlink targets    u16 length, target bytes (no NUL)
        inodes             4 x u64: mode (mode_t in the low 32 bits), inode number,
                           data offset, file size / child count

Inode numbers are 1-based indexes into the inode table and inode 1 is the root directory. A
directory's children are `count` consecutive directory entries starting at index `data offset`;
a file's data starts at block `data offset`; a symlink's target is symlink table entry
`data offset` (count 1). OSv looks names up with strcmp in directory-entry order and keys its
file cache on the inode's own inode-number field, so that field must equal the table index + 1.
OSv reports every ROFS file as mode 0555 (the permission bits on disk are ignored; only the
S_IFDIR/S_IFREG/S_IFLNK type bits matter). jvmkit still stores the permission bits given, so
that `read_rofs` round-trips them.

The writer (`RofsBuilder`) collects entries (host files are only stat'ed), plans the layout up
front (breadth-first inode order, children sorted by name bytes, file data in inode order, no
timestamps), then streams everything in one sequential pass, copying file contents from disk in
chunks. Same entries, same bytes. The reader (`readers.read_rofs`) follows the format as OSv reads
it, not as the writer writes it, so tests catch writer mistakes.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

from jvmkit import fileio
from jvmkit.errors import JvmkitError

BLOCK_SIZE = 512
MAGIC = 0xDEADBEAD
VERSION = 1
NAME_MAX = 255  # OSv's struct dirent d_name is 256 bytes with the NUL
PATH_MAX = 4095  # OSv's VFS path buffers are PATH_MAX (4096) bytes with the NUL

_SUPER = struct.Struct("<8Q")
_INODE = struct.Struct("<4Q")
_DIRENT_HEAD = struct.Struct("<QH")
_U16 = struct.Struct("<H")
_CHUNK = 1 << 20

DIR, FILE, SYMLINK = "dir", "file", "symlink"
_TYPE_BITS = {DIR: stat.S_IFDIR, FILE: stat.S_IFREG, SYMLINK: stat.S_IFLNK}

Source = Union[bytes, str, os.PathLike]


def _blocks(size: int) -> int:
    return -(-size // BLOCK_SIZE)


def _display(path: bytes | str) -> str:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path if path.startswith("/") else "/" + path


def _split_guest_path(guest_path: str | bytes) -> list[bytes]:
    """Guest path -> name components (bytes), refusing what OSv can't store or look up."""
    raw = os.fsencode(guest_path)
    shown = _display(raw)
    if b"\0" in raw:
        raise JvmkitError(f"guest path {shown!r} contains a NUL byte, which OSv can't store")
    parts = [p for p in raw.split(b"/") if p]
    if len(b"/" + b"/".join(parts)) > PATH_MAX:
        raise JvmkitError(
            f"guest path {shown[:80]}... is {len(raw)} bytes; OSv paths are at most {PATH_MAX} bytes",
            hint="shorten the directory names")
    for part in parts:
        if part in (b".", b".."):
            raise JvmkitError(f"guest path {shown!r} contains {os.fsdecode(part)!r}; give a plain path")
        if len(part) > NAME_MAX:
            raise JvmkitError(
                f"name {os.fsdecode(part)[:40]}... in guest path {shown[:120]!r} is {len(part)} bytes; "
                f"OSv names are at most {NAME_MAX} bytes", hint="rename the file")
    return parts


@dataclass
class _Node:
    kind: str
    mode: int
    children: dict[bytes, "_Node"] = field(default_factory=dict)
    data: bytes | None = None  # file: inline content ...
    host: bytes | str | os.PathLike | None = None  # ... or a host path streamed at write time
    size: int = 0
    target: bytes = b""


class RofsBuilder:
    """Collects a guest tree and writes it as a ROFS image.

    Parent directories are created on demand (mode 0o755). Adding the same path twice is an
    error, except `add_dir` on an existing directory (which sets its mode).
    """

    def __init__(self) -> None:
        self._root = _Node(DIR, 0o755)
        self._layout: _Layout | None = None

    # -- collecting -------------------------------------------------------------------------

    def _parent(self, parts: list[bytes], shown: str) -> _Node:
        node = self._root
        walked: list[bytes] = []
        for part in parts:
            walked.append(part)
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node(DIR, 0o755)
            elif child.kind != DIR:
                raise JvmkitError(
                    f"can't add {shown!r}: {_display(b'/'.join(walked))!r} is already a {child.kind}")
            node = child
        return node

    def _add(self, guest_path: str | bytes, node: _Node) -> None:
        parts = _split_guest_path(guest_path)
        shown = _display(b"/".join(parts))
        if not parts:
            raise JvmkitError(f"can't add a {node.kind} at the root directory {shown!r}")
        parent = self._parent(parts[:-1], shown)
        if parts[-1] in parent.children:
            raise JvmkitError(f"guest path {shown!r} was added twice", hint="each path may appear once in the image")
        parent.children[parts[-1]] = node
        self._layout = None

    @staticmethod
    def _check_mode(mode: int, shown: str) -> int:
        if not 0 <= mode <= 0o7777:
            raise JvmkitError(f"mode {mode:#o} for {shown!r} is not a permission mode (0 to 0o7777)")
        return mode

    def add_dir(self, guest_path: str | bytes, mode: int = 0o755) -> None:
        """Add a directory (and its parents); an existing directory just gets `mode`."""
        parts = _split_guest_path(guest_path)
        shown = _display(b"/".join(parts))
        node = self._parent(parts, shown)
        node.mode = self._check_mode(mode, shown)
        self._layout = None

    def add_file(self, guest_path: str | bytes, source: Source, mode: int = 0o644) -> None:
        """Add a regular file: `source` is its content (bytes) or a host path (str/PathLike),
        stat'ed now and streamed at write time."""
        shown = _display(os.fsencode(guest_path))
        self._check_mode(mode, shown)
        if isinstance(source, (bytes, bytearray, memoryview)):
            node = _Node(FILE, mode, data=bytes(source), size=len(source))
        else:
            try:
                st = os.stat(source)
            except OSError as exc:
                raise JvmkitError(f"can't read {os.fsdecode(source)} for {shown}: {exc.strerror}") from exc
            if not stat.S_ISREG(st.st_mode):
                raise JvmkitError(f"{os.fsdecode(source)} (for {shown}) is not a regular file")
            node = _Node(FILE, mode, host=source, size=st.st_size)
        self._add(guest_path, node)

    def add_symlink(self, guest_path: str | bytes, target: str | bytes) -> None:
        """Add a symbolic link to `target` (stored as given, not resolved)."""
        raw = os.fsencode(target)
        shown = _display(os.fsencode(guest_path))
        if not raw or b"\0" in raw:
            raise JvmkitError(f"symlink {shown!r} has an empty target or one with a NUL byte")
        if len(raw) > PATH_MAX:
            raise JvmkitError(f"symlink {shown!r} has a {len(raw)}-byte target; OSv allows {PATH_MAX}")
        self._add(guest_path, _Node(SYMLINK, 0o777, target=raw))

    def add_tree(self, host_dir: str | os.PathLike, guest_prefix: str | bytes = "/") -> None:
        """Add everything under `host_dir` at `guest_prefix`.

        Modes are normalized for determinism: directories 0o755, files 0o755 if the host file has
        any execute bit else 0o644. Symlinks are stored as symlinks (never followed); device
        nodes, FIFOs and sockets are refused.
        """
        top = os.fsencode(host_dir)
        if not os.path.isdir(top):
            raise JvmkitError(f"{os.fsdecode(top)} is not a directory")
        prefix = b"/" + b"/".join(_split_guest_path(guest_prefix))
        self.add_dir(prefix)
        stack = [(top, prefix)]
        while stack:
            host, guest = stack.pop()
            try:
                entries = sorted(os.scandir(host), key=lambda e: e.name)
            except OSError as exc:
                raise JvmkitError(f"can't list {os.fsdecode(host)}: {exc.strerror}") from exc
            for entry in entries:
                gpath = guest.rstrip(b"/") + b"/" + entry.name
                if entry.is_symlink():
                    self.add_symlink(gpath, os.readlink(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    self.add_dir(gpath)
                    stack.append((entry.path, gpath))
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    mode = 0o755 if st.st_mode & 0o111 else 0o644
                    self._add(gpath, _Node(FILE, mode, host=entry.path, size=st.st_size))
                else:
                    raise JvmkitError(
                        f"{os.fsdecode(entry.path)} is not a file, directory or symlink; ROFS can't store it",
                        hint="remove it from the tree")

    # -- layout and writing -----------------------------------------------------------------

    def _plan(self) -> "_Layout":
        if self._layout is None:
            self._layout = _Layout(self._root)
        return self._layout

    def size(self) -> int:
        """The exact size in bytes of the image `write` produces."""
        return self._plan().image_size

    def counts(self) -> dict[str, int]:
        """Number of directories (root included), files and symlinks."""
        lay = self._plan()
        out = {DIR: 0, FILE: 0, SYMLINK: 0}
        for node in lay.order:
            out[node.kind] += 1
        return out

    def write(self, dest: str | os.PathLike | BinaryIO) -> int:
        """Write the image to `dest` (a path, written atomically, or a binary file object written
        sequentially from its current position). Returns the number of bytes written."""
        if isinstance(dest, (str, bytes, os.PathLike)):
            return write_atomically(Path(os.fsdecode(dest)), self._stream)
        return self._stream(dest)

    def _stream(self, out: BinaryIO) -> int:
        lay = self._plan()
        written = 0

        def emit(data: bytes) -> None:
            nonlocal written
            out.write(data)
            written += len(data)

        sb = _SUPER.pack(MAGIC, VERSION, BLOCK_SIZE, lay.struct_first_block, lay.struct_blocks,
                         len(lay.entries), len(lay.symlinks), len(lay.order))
        emit(sb.ljust(BLOCK_SIZE, b"\0"))
        for node in lay.files:
            _copy_content(node, emit)
            if node.size % BLOCK_SIZE:
                emit(b"\0" * (BLOCK_SIZE - node.size % BLOCK_SIZE))
        if written != lay.struct_first_block * BLOCK_SIZE:  # guards the layout arithmetic
            raise JvmkitError(f"internal error: ROFS file data ended at byte {written}, "
                              f"planned {lay.struct_first_block * BLOCK_SIZE}")
        table = lay.structure_info()
        emit(table)
        if len(table) % BLOCK_SIZE:
            emit(b"\0" * (BLOCK_SIZE - len(table) % BLOCK_SIZE))
        if written != lay.image_size:
            raise JvmkitError(f"internal error: ROFS image is {written} bytes, planned {lay.image_size}")
        return written


class _Layout:
    """Where everything goes: inode order (breadth first), directory entries, blocks."""

    def __init__(self, root: _Node):
        self.order: list[_Node] = [root]
        self.entries: list[tuple[int, bytes]] = []  # (inode number, name)
        self.symlinks: list[bytes] = []
        self.files: list[_Node] = []
        self.inode_fields: list[tuple[int, int, int, int]] = []
        # Children of the directory at inode i are appended to `order` in the same sequence as
        # their directory entries, so entry k always names inode k + 2.
        i = 0
        while i < len(self.order):
            node = self.order[i]
            if node.kind == DIR:
                for name in sorted(node.children):
                    self.order.append(node.children[name])
                    self.entries.append((len(self.order), name))
            i += 1
        block = 1
        entry_index = 0
        for number, node in enumerate(self.order, start=1):
            mode = _TYPE_BITS[node.kind] | node.mode
            if node.kind == DIR:
                fields = (mode, number, entry_index, len(node.children))
                entry_index += len(node.children)
            elif node.kind == FILE:
                fields = (mode, number, block, node.size)
                block += _blocks(node.size)
                self.files.append(node)
            else:
                fields = (mode, number, len(self.symlinks), 1)
                self.symlinks.append(node.target)
            self.inode_fields.append(fields)
        self.struct_first_block = block
        struct_size = (sum(_DIRENT_HEAD.size + len(name) for _, name in self.entries)
                       + sum(_U16.size + len(t) for t in self.symlinks)
                       + _INODE.size * len(self.order))
        self.struct_blocks = _blocks(struct_size)
        self.image_size = (self.struct_first_block + self.struct_blocks) * BLOCK_SIZE

    def structure_info(self) -> bytes:
        buf = io.BytesIO()
        for number, name in self.entries:
            buf.write(_DIRENT_HEAD.pack(number, len(name)))
            buf.write(name)
        for target in self.symlinks:
            buf.write(_U16.pack(len(target)))
            buf.write(target)
        for fields in self.inode_fields:
            buf.write(_INODE.pack(*fields))
        return buf.getvalue()


def _copy_content(node: _Node, emit) -> None:
    if node.data is not None:
        emit(node.data)
        return
    path = node.host
    copied = 0
    try:
        with open(path, "rb") as src:
            while True:
                chunk = src.read(min(_CHUNK, node.size - copied + 1))
                if not chunk:
                    break
                copied += len(chunk)
                if copied > node.size:
                    break
                emit(chunk)
    except OSError as exc:
        raise JvmkitError(f"can't read {os.fsdecode(path)}: {exc.strerror}") from exc
    if copied != node.size:
        raise JvmkitError(f"{os.fsdecode(path)} changed size while being packed "
                          f"(was {node.size} bytes)", hint="don't modify the input while jvmkit runs")


def write_atomically(dest: Path, writer):
    """Run `writer(fileobj)` on a temp file next to `dest` (opened w+b, seekable), then fsync and
    rename it into place (fileio.atomic_path); on any error nothing is left. Returns what `writer` returns."""
    with fileio.atomic_path(dest) as tmp:
        with open(tmp, "w+b") as out:
            result = writer(out)
            out.flush()
            os.fsync(out.fileno())
    return result
