"""Reading the initramfs back (tests and `inspect`): a newc cpio reader, independent of the writer.

The input may be hostile (an image someone else built): every header field is checked, nothing
is read past the data, and any malformed archive is one `UsageError` (exit status 2) naming the
offset, never an IndexError or a UnicodeDecodeError.
"""

from __future__ import annotations

import re

from jvmkit.errors import UsageError
from jvmkit.packager.targets.linux.cpio import TRAILER

HEADER = 110
_HEX = re.compile(rb"[0-9A-Fa-f]{8}")
MAX_NAME = 4096  # PATH_MAX: the kernel's initramfs unpacker refuses longer names


def read_cpio(data: bytes) -> list[dict]:
    """Parse a newc archive (for tests and `inspect`): a list of {name, mode, size, data, rdev}."""
    entries = []
    pos = 0
    while True:
        if data[pos:pos + 6] != b"070701":
            raise UsageError(f"not a newc cpio archive: bad magic at offset {pos}")
        if pos + HEADER > len(data):
            raise UsageError(f"cpio archive truncated: the header at offset {pos} is cut short")
        raw = [data[pos + 6 + 8 * i: pos + 14 + 8 * i] for i in range(13)]
        if not all(_HEX.fullmatch(f) for f in raw):
            raise UsageError(f"cpio header at offset {pos} has a field that is not 8 hex digits")
        fields = [int(f, 16) for f in raw]
        namesize, filesize = fields[11], fields[6]
        if not 1 <= namesize <= MAX_NAME + 1:
            raise UsageError(f"cpio entry at offset {pos} has a name size of {namesize}")
        end_name = pos + HEADER + namesize
        if end_name > len(data) or data[end_name - 1] != 0:
            raise UsageError(f"cpio entry at offset {pos}: its name is truncated or not NUL-terminated")
        try:
            name = data[pos + HEADER: end_name - 1].decode()
        except UnicodeDecodeError:
            raise UsageError(f"cpio entry at offset {pos}: its name is not UTF-8") from None
        body_at = (end_name + 3) & ~3
        if body_at + filesize > len(data):
            raise UsageError(f"cpio entry {name[:80]!r} at offset {pos}: its {filesize} bytes run past the archive")
        body = data[body_at: body_at + filesize]
        pos = (body_at + filesize + 3) & ~3
        if name == TRAILER:
            return entries
        entries.append({"name": name, "mode": fields[1], "size": filesize, "data": body,
                        "mtime": fields[5], "rdev": (fields[9], fields[10])})
