"""The bounds and allow-lists a manifest must meet: an image may come from someone else.

`manifest.decode` checks each field's type; `check_json` (before decoding) and `check` (after) add
what a hostile author could otherwise use: sizes, counts, string lengths and nesting bounded (so
`inspect` and `run` neither exhaust memory nor recurse without end), no control characters where
a value reaches a command line, QEMU or a terminal, file roles and paths and digests of the
shapes jvmkit writes (a role and a digest name a cache entry: they must never name a path; a file's
path is `bundle.load`'s to check, against the bundle directory with symlinks resolved), the
machine type from the target's allow-list, and the boot section's fw_cfg names and exit marker
from jvmkit's own grammar. Every failure is a `ManifestError` naming the field (exit status 2).

App arguments and JVM flags are not limited beyond size: they reach the guest only inside the
`-append` value or an fw_cfg file (vm/qemu.py), never as QEMU options.
"""

from __future__ import annotations

import dataclasses
import re

MAX_MANIFEST_BYTES = 4 << 20        # manifest.json itself (jvmkit writes a few KiB)
MAX_DEPTH = 16                      # nesting of JSON arrays and objects
MAX_ITEMS = 4096                    # entries of any one array or object
MAX_STRING = 64 << 10               # characters of any one string (a long class path fits)
MAX_FILES = 16
MAX_FILE_BYTES = 16 << 30           # any file of the bundle, packed or unpacked
MAX_MEMORY_MIB = 4 << 20            # 4 TiB
MAX_CPUS = 64
MAX_CMDLINE = 4096
MAX_NAME = 128

ROLE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
SHA256 = re.compile(r"[0-9a-f]{64}")
FW_CFG_NAME = re.compile(r"opt/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")   # QEMU: at most 55 bytes, opt/ for users
FW_CFG_MAX = 55
MARKER = re.compile(r"[A-Za-z0-9 _.:=-]{1,64}")
COMPRESSIONS = (None, "zstd")


def _control(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def check_json(data, where: str = "manifest", depth: int = 0) -> None:
    """Bounds on the raw JSON (pure): depth, entries per array/object, string lengths."""
    from jvmkit.packager.manifest import ManifestError

    if depth > MAX_DEPTH:
        raise ManifestError(f"{where} nests deeper than {MAX_DEPTH} levels")
    if isinstance(data, str):
        if len(data) > MAX_STRING:
            raise ManifestError(f"{where} is longer than {MAX_STRING} characters")
        if "\0" in data:
            raise ManifestError(f"{where} holds a NUL character")
    elif isinstance(data, list):
        if len(data) > MAX_ITEMS:
            raise ManifestError(f"{where} has more than {MAX_ITEMS} items")
        for i, item in enumerate(data):
            check_json(item, f"{where}[{i}]", depth + 1)
    elif isinstance(data, dict):
        if len(data) > MAX_ITEMS:
            raise ManifestError(f"{where} has more than {MAX_ITEMS} keys")
        for key, value in data.items():
            check_json(key, f"{where} key", depth + 1)
            check_json(value, f"{where}.{key}", depth + 1)
    elif isinstance(data, int) and not isinstance(data, bool) and abs(data) > 1 << 63:
        raise ManifestError(f"{where} is out of range")


def _int(value: int, low: int, high: int, where: str) -> None:
    from jvmkit.packager.manifest import ManifestError

    if not low <= value <= high:
        raise ManifestError(f"{where} is {value}, not between {low} and {high}")


def check(manifest, target) -> None:
    """The manifest's fields against jvmkit's bounds and `target`'s allow-lists (pure)."""
    from jvmkit.packager.manifest import ManifestError

    if len(manifest.name) > MAX_NAME or _control(manifest.name):
        raise ManifestError(f"manifest.name must be at most {MAX_NAME} printable characters")
    files = manifest.files
    if not 1 <= len(files) <= MAX_FILES:
        raise ManifestError(f"manifest.files lists {len(files)} files, not between 1 and {MAX_FILES}")
    for role, record in files.items():
        where = f"manifest.files.{role}"
        if not ROLE.fullmatch(role):
            raise ManifestError(f"manifest.files has a role {role[:40]!r} that is not a plain lowercase name")
        for name in ("sha256", "raw_sha256"):
            digest = getattr(record, name)
            if digest is not None and not SHA256.fullmatch(digest):
                raise ManifestError(f"{where}.{name} is not a SHA-256 (64 lowercase hex digits)")
        for name in ("size", "raw_size", "rofs_offset", "rofs_size"):
            value = getattr(record, name)
            if value is not None:
                _int(value, 0, MAX_FILE_BYTES, f"{where}.{name}")
        if record.compression not in COMPRESSIONS:
            raise ManifestError(f"{where}.compression {record.compression!r} is not zstd")
        if record.compression == "zstd" and (record.raw_sha256 is None or record.raw_size is None):
            raise ManifestError(f"{where} is compressed but names no raw_sha256 and raw_size")
    _int(manifest.defaults.memory_mib, 1, MAX_MEMORY_MIB, "manifest.defaults.memory_mib")
    _int(manifest.defaults.cpus, 1, MAX_CPUS, "manifest.defaults.cpus")
    for i, port in enumerate(manifest.guest.ports):
        _int(port, 1, 65535, f"manifest.guest.ports[{i}]")
    _int(manifest.guest.jmx_port, 1, 65535, "manifest.guest.jmx_port")
    if not manifest.command.java:
        raise ManifestError("manifest.command.java is empty")
    _check_boot(manifest.boot, target)


def check_bootable(manifest, target) -> None:
    """The files `target`'s boot plan reads are all listed (pure; `run` checks it, `inspect` shows
    an image without them)."""
    from jvmkit.packager.manifest import ManifestError

    for role in target.file_roles:
        if role not in manifest.files:
            raise ManifestError(f"manifest.files has no {role!r}, which a {target.name} image boots from")


def _check_boot(boot, target) -> None:
    """The target's boot section, by what its fields are: the machine type from the target's
    allow-list, fw_cfg names and exit markers of jvmkit's grammar, command lines bounded and
    free of control characters."""
    from jvmkit.packager.manifest import ManifestError

    for f in dataclasses.fields(boot):
        value = getattr(boot, f.name)
        where = f"manifest.boot.{f.name}"
        if f.name == "machine" and value not in target.machines:
            raise ManifestError(f"{where} asks for QEMU machine type {value[:40]!r}, which jvmkit does not use for "
                                f"{target.name} images (known: {', '.join(target.machines)})")
        if f.name.endswith("_fw_cfg") and not (FW_CFG_NAME.fullmatch(value) and len(value) <= FW_CFG_MAX):
            raise ManifestError(f"{where} {value[:60]!r} is not an fw_cfg name (opt/..., at most {FW_CFG_MAX} "
                                "characters of letters, digits, '.', '_', '-' and '/')")
        if f.name == "exit_marker" and not MARKER.fullmatch(value):
            raise ManifestError(f"{where} {value[:60]!r} is not a marker (1-64 letters, digits, ' _.:=-')")
        if f.name.endswith("cmdline") and isinstance(value, str) and (len(value) > MAX_CMDLINE or _control(value)):
            raise ManifestError(f"{where} must be at most {MAX_CMDLINE} printable characters")
