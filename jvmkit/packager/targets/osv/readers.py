"""Readers of OSv's formats, the way OSv itself reads them: MBR partitions, the classic disk's
command line, the boot command line grammar, and ROFS. The writers (disk.py, cmdline.py, rofs.py)
never use them; tests check the writers against them, and `inspect` can use them. Written from
OSv's own tree (fs/devfs/device.cc, core/commands.cc, fs/rofs/rofs_vfsops.cc, rofs_vnops.cc).

The input may be hostile (an image someone else built): a malformed MBR or ROFS is a `UsageError`
(bad input, exit status 2) naming what is wrong; nothing is read past the end of the source (a
length field of 2^64 never becomes an allocation), and every loop is bounded by the data.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager.targets.osv.cmdline import _OPTION_DELIMS
from jvmkit.packager.targets.osv.disk import (CMDLINE_AREA_END, CMDLINE_MAX, CMDLINE_OFFSET, MBR_ENTRY,
                                              MBR_SIGNATURE, MBR_TABLE, ROFS_PARTITION, SECTOR)
from jvmkit.packager.targets.osv.rofs import (_CHUNK, _DIRENT_HEAD, _INODE, _SUPER, _U16, BLOCK_SIZE, DIR, FILE,
                                              MAGIC, SYMLINK, VERSION)


# -- partitions ------------------------------------------------------------------------------

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
    raise UsageError(f"{os.fsdecode(disk)} has no MBR partition entry #2 (OSv's /dev/vblk0.1); "
                      "OSv would fail with 'Could not mount rofs root filesystem'")


def read_disk_rofs(disk: str | os.PathLike) -> RofsImage:
    """Open the ROFS in a disk's partition #2, bounded to that partition (close it when done)."""
    part = rofs_partition(disk)
    return read_rofs(disk, offset=part.offset, limit=part.size)


def read_cmdline(disk: str | os.PathLike) -> str | None:
    """The boot command line stored at byte 512 of a disk (up to the first NUL), or None when
    the disk has no command-line area (no MBR, or a partition starts there)."""
    head = _read_head(disk, CMDLINE_AREA_END)
    if len(head) < SECTOR or head[510:512] != MBR_SIGNATURE:
        return None
    if any(part.offset < CMDLINE_OFFSET + CMDLINE_MAX for part in read_partitions(disk)):
        return None
    return head[CMDLINE_OFFSET:].split(b"\0", 1)[0].decode(errors="replace")



# -- the boot command line grammar ------------------------------------------------------------

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


# -- reader ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RofsInode:
    number: int
    mode: int  # as stored (type bits + permission bits)
    data_offset: int
    count: int  # file size, child count, or 1 for a symlink

    @property
    def kind(self) -> str:
        if stat.S_ISDIR(self.mode):
            return DIR
        if stat.S_ISREG(self.mode):
            return FILE
        if stat.S_ISLNK(self.mode):
            return SYMLINK
        return "unknown"


@dataclass(frozen=True)
class RofsEntry:
    path: str  # absolute guest path, "/" for the root
    kind: str
    mode: int  # permission bits only
    size: int  # file size (0 for directories and symlinks)
    target: str | None  # symlink target
    inode: int


class RofsImage:
    """A ROFS image parsed the way OSv mounts it. Paths are guest paths like "/jvm/bin/java"."""

    def __init__(self, handle: BinaryIO, offset: int, limit: int | None, owned: bool):
        self._f = handle
        self._offset = offset
        self._owned = owned
        self.limit = limit  # bytes available to the filesystem (the partition size), if known
        self._end = handle.seek(0, os.SEEK_END)
        sb = self._read(0, BLOCK_SIZE, "super block")
        (self.magic, self.version, self.block_size, self.struct_first_block, self.struct_blocks,
         dirent_count, symlink_count, inode_count) = _SUPER.unpack_from(sb)
        if self.magic != MAGIC:
            raise UsageError(f"not a ROFS image: magic {self.magic:#x}, expected {MAGIC:#x}")
        if self.version != VERSION:
            raise UsageError(f"ROFS version {self.version} is not the version OSv reads ({VERSION})")
        if self.block_size != BLOCK_SIZE:
            raise UsageError(f"ROFS block size {self.block_size}; OSv needs {BLOCK_SIZE}")
        if self.struct_blocks == 0:
            raise UsageError("ROFS structure info block count is 0; OSv refuses to mount that")
        data = self._read(self.struct_first_block * BLOCK_SIZE, self.struct_blocks * BLOCK_SIZE,
                          "structure info")
        pos = 0

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if pos + n > len(data):
                raise UsageError(f"ROFS {what} runs past the structure info blocks")
            pos += n
            return data[pos - n:pos]

        self.dir_entries: list[tuple[int, bytes]] = []
        for _ in range(dirent_count):
            number, length = _DIRENT_HEAD.unpack(take(_DIRENT_HEAD.size, "directory entry table"))
            name = take(length, "directory entry name")
            self.dir_entries.append((number, name.split(b"\0", 1)[0]))  # strncpy semantics
        self.symlinks: list[bytes] = []
        for _ in range(symlink_count):
            (length,) = _U16.unpack(take(_U16.size, "symlink table"))
            self.symlinks.append(take(length, "symlink path").split(b"\0", 1)[0])
        raw = take(_INODE.size * inode_count, "inode table")
        self.inodes = [RofsInode(n, m & 0xFFFFFFFF, off, cnt) for m, n, off, cnt in _INODE.iter_unpack(raw)]
        self._check()

    def _read(self, pos: int, n: int, what: str) -> bytes:
        if self.limit is not None and pos + n > self.limit:
            raise UsageError(f"ROFS {what} at byte {pos} runs past the end of the partition ({self.limit} bytes)")
        if self._offset + pos + n > self._end:
            raise UsageError(f"ROFS image truncated: {what} at byte {pos} needs {n} bytes past its end")
        self._f.seek(self._offset + pos)
        data = self._f.read(n)
        if len(data) != n:
            raise UsageError(f"ROFS image truncated: {what} at byte {pos} needs {n} bytes, got {len(data)}")
        return data

    def _check(self) -> None:
        if not self.inodes or self.inodes[0].kind != DIR:
            raise UsageError("ROFS inode 1 (the root) is missing or not a directory")
        for index, inode in enumerate(self.inodes):
            if inode.number != index + 1:
                raise UsageError(f"ROFS inode at index {index} says it is inode {inode.number}; "
                                  "OSv keys its file cache on that number")
            if inode.kind == DIR:
                if inode.data_offset + inode.count > len(self.dir_entries):
                    raise UsageError(f"ROFS directory inode {inode.number} points past the directory entries")
            elif inode.kind == SYMLINK:
                if inode.data_offset >= len(self.symlinks):
                    raise UsageError(f"ROFS symlink inode {inode.number} points past the symlink table")
            elif inode.kind == FILE:
                if inode.count and inode.data_offset == 0:
                    raise UsageError(f"ROFS file inode {inode.number} has data in the super block")
            else:
                raise UsageError(f"ROFS inode {inode.number} has mode {inode.mode:#o}, not a dir, file or symlink")
        for number, name in self.dir_entries:
            if not 1 <= number <= len(self.inodes):
                raise UsageError(f"ROFS directory entry {name[:60]!r} names inode {number}, out of range")

    # -- navigation, as rofs_lookup / rofs_readdir do it --

    def _children(self, inode: RofsInode) -> list[tuple[int, bytes]]:
        return self.dir_entries[inode.data_offset:inode.data_offset + inode.count]

    def lookup(self, path: str | bytes) -> RofsInode:
        """The inode at `path` (symlinks are not followed)."""
        inode = self.inodes[0]
        for part in (p for p in os.fsencode(path).split(b"/") if p):
            if inode.kind != DIR:
                raise FileNotFoundError(f"{os.fsdecode(path)}: not a directory on the way")
            for number, name in self._children(inode):
                if name == part:  # strcmp, first match wins
                    inode = self.inodes[number - 1]
                    break
            else:
                raise FileNotFoundError(os.fsdecode(path))
        return inode

    def listdir(self, path: str | bytes = "/") -> list[str]:
        """Names in a directory, in on-disk (readdir) order, without "." and ".."."""
        inode = self.lookup(path)
        if inode.kind != DIR:
            raise NotADirectoryError(os.fsdecode(path))
        return [os.fsdecode(name) for _, name in self._children(inode)]

    def readlink(self, path: str | bytes) -> str:
        inode = self.lookup(path)
        if inode.kind != SYMLINK:
            raise OSError(f"{os.fsdecode(path)} is not a symlink")
        return os.fsdecode(self.symlinks[inode.data_offset])

    def iter_chunks(self, path: str | bytes, chunk: int = _CHUNK) -> Iterator[bytes]:
        inode = self.lookup(path)
        if inode.kind != FILE:
            raise IsADirectoryError(os.fsdecode(path)) if inode.kind == DIR else OSError(f"{os.fsdecode(path)} is not a file")
        start = inode.data_offset * BLOCK_SIZE
        done = 0
        while done < inode.count:
            n = min(chunk, inode.count - done)
            yield self._read(start + done, n, f"data of {os.fsdecode(path)}")
            done += n

    def read_bytes(self, path: str | bytes) -> bytes:
        return b"".join(self.iter_chunks(path))

    def walk(self) -> Iterator[RofsEntry]:
        """Every entry, root first, depth first in on-disk order. Refuses duplicate names in a
        directory (OSv could never reach the second) and directories reachable twice."""
        seen: set[int] = set()
        stack: list[tuple[str, int]] = [("/", 1)]
        while stack:
            path, number = stack.pop()
            inode = self.inodes[number - 1]
            if inode.kind == DIR:
                if number in seen:
                    raise UsageError(f"ROFS directory inode {number} is reachable twice (at {path})")
                seen.add(number)
            target = os.fsdecode(self.symlinks[inode.data_offset]) if inode.kind == SYMLINK else None
            size = inode.count if inode.kind == FILE else 0
            yield RofsEntry(path, inode.kind, inode.mode & 0o7777, size, target, number)
            if inode.kind == DIR:
                children = self._children(inode)
                names = [name for _, name in children]
                if len(set(names)) != len(names):
                    raise UsageError(f"ROFS directory {path} has duplicate names")
                if any(not name or name in (b".", b"..") or b"/" in name for name in names):
                    raise UsageError(f"ROFS directory {path} has an entry named '', '.', '..' or with a '/'")
                for child_number, name in reversed(children):
                    stack.append((path.rstrip("/") + "/" + os.fsdecode(name), child_number))

    def entries(self) -> dict[str, RofsEntry]:
        return {entry.path: entry for entry in self.walk()}

    @property
    def size(self) -> int:
        """Bytes the filesystem spans (super block through the structure info)."""
        return (self.struct_first_block + self.struct_blocks) * BLOCK_SIZE

    def close(self) -> None:
        if self._owned:
            self._f.close()

    def __enter__(self) -> "RofsImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rofs(source: str | os.PathLike | BinaryIO, *, offset: int = 0, limit: int | None = None) -> RofsImage:
    """Parse the ROFS image in `source` (a path or a seekable binary file) starting at byte
    `offset`, optionally bounded to `limit` bytes (a partition's size). Raises JvmkitError if OSv
    would not mount it. Close the result (or use it as a context manager) when given a path."""
    if isinstance(source, (str, bytes, os.PathLike)):
        try:
            handle = open(source, "rb")
        except OSError as exc:
            raise JvmkitError(f"can't open ROFS image {os.fsdecode(source)}: {exc.strerror}") from exc
        try:
            return RofsImage(handle, offset, limit, owned=True)
        except BaseException:
            handle.close()
            raise
    return RofsImage(source, offset, limit, owned=False)
