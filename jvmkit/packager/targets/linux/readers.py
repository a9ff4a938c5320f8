"""Reading the initramfs back (tests and `inspect`): a newc cpio reader, independent of the writer."""

from __future__ import annotations

from jvmkit.packager.targets.linux.cpio import TRAILER


def read_cpio(data: bytes) -> list[dict]:
    """Parse a newc archive (for tests and `inspect`): a list of {name, mode, size, data, rdev}."""
    entries = []
    pos = 0
    while True:
        if data[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos: pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == TRAILER:
            return entries
        entries.append({"name": name, "mode": fields[1], "size": filesize, "data": body,
                        "mtime": fields[5], "rdev": (fields[9], fields[10])})
