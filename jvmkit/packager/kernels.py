"""Guest kernels in jvmkit's cache: `jvmkit kernel pull/import/ls` and what each target needs to boot.

Cache layout: `kernels/<target>/<id>/` for each target in `KERNEL_TARGETS`, every entry holding a
`kernel.json` with at least `target`, `version` and `sha256` (of the file QEMU boots), which is
what `list_kernels()` reads. Entries are built atomically with `cache.ensure_entry`.

Linux (this part): a Debian cloud kernel (`linux-image-*-cloud-amd64`) and a static busybox taken
from Debian's archive (see `jvmkit.packager.debian`). An entry holds
    vmlinuz        the bzImage as shipped
    vmlinux        the uncompressed ELF taken out of the bzImage's payload; it carries a PVH entry
                   note (Xen note type 18), so QEMU boots it with `-kernel vmlinux` directly
    config         the kernel's build configuration
    busybox        the static busybox binary
    modules/*.ko   decompressed modules the guest needs (virtio-pci, balloon, net, rng, fw_cfg and
                   their dependencies) that are not built in; `modules.order` lists them deps-first
    kernel.json    versions, digests, PVH status, module order, configuration facts
A user's own kernel (`import_linux`) must have the drivers built in: no modules come with it.

The OSv part (`pull_osv`, `import_osv`) lives beside this and uses `kernels/osv/<id>/`.
Pure functions (payload detection, LZ4, ELF notes, modinfo, module order) are kept apart from I/O.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import zstandard

from jvmkit import cache, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import debian

KERNEL_TARGETS = ("linux", "osv")
KERNEL_JSON = "kernel.json"
LAYOUT = 1  # bump when what a linux entry holds changes; old entries are then ignored and rebuilt

LINUX_META_PACKAGE = "linux-image-cloud-amd64"
LINUX_IMAGE_RE = re.compile(r"linux-image-(\d[\w.+~-]*)-cloud-amd64")
BUSYBOX_PACKAGE = "busybox-static"
# The drivers the guest needs, in the order the init loads them (dependencies are put first).
# virtio_pci is the bus every other virtio device sits on with `-M pc`.
GUEST_MODULES = ("virtio_pci", "virtio_balloon", "virtio_net", "virtio_rng", "qemu_fw_cfg")
OPTIONAL_MODULES = frozenset({"virtio_rng"})
CONFIG_FACTS = ("CONFIG_RD_ZSTD", "CONFIG_VIRTIO_BALLOON", "CONFIG_PAGE_REPORTING", "CONFIG_PVH",
                "CONFIG_FW_CFG_SYSFS", "CONFIG_VIRTIO_CONSOLE", "CONFIG_SERIAL_8250_CONSOLE",
                "CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_NET", "CONFIG_HW_RANDOM_VIRTIO")

XEN_ELFNOTE_PHYS32_ENTRY = 18


# ---- the cache -----------------------------------------------------------------------------------------

def kernels_dir(target: str) -> Path:
    if target not in KERNEL_TARGETS:
        raise UsageError(f"unknown kernel target {target!r} (one of {', '.join(KERNEL_TARGETS)})")
    return cache.cache_dir("kernels", target)


def kernel_entry(target: str, key: str, build: Callable[[Path], None], **info: object) -> tuple[Path, bool]:
    """The cache entry `kernels/<target>/<key>/`, built with `build(tmpdir)` when missing.

    Passing `kernels/<target>` as the kind keeps the lock file (`.<key>.lock`) beside the entry, where
    `cache.prune` looks for it too."""
    kernels_dir(target)
    if "/" in key or key.startswith("."):
        raise JvmkitError(f"bad kernel cache key {key!r}")
    return cache.ensure_entry(f"kernels/{target}", key, build, **info)


def _entries(target: str) -> list[tuple[Path, dict, float]]:
    """(entry, kernel.json, last_used) of the complete entries of a target."""
    base = cache.cache_root() / "kernels" / target
    if not base.is_dir():
        return []
    found = []
    for entry in sorted(base.iterdir()):
        marker = entry / cache.ENTRY_FILE
        if entry.name.startswith(".") or not marker.is_file():
            continue
        try:
            meta = json.loads((entry / KERNEL_JSON).read_text())
        except (OSError, ValueError):
            meta = {}
        try:
            last_used = float(json.loads(marker.read_text()).get("last_used", 0))
        except (OSError, ValueError):
            last_used = 0.0
        found.append((entry, meta, last_used))
    return found


def list_kernels() -> list[dict]:
    """Every cached kernel: target, id, version, sha256 (of what QEMU boots), size, path, source."""
    rows = []
    for target in KERNEL_TARGETS:
        for entry, meta, last_used in _entries(target):
            rows.append({"target": target, "id": entry.name, "version": str(meta.get("version", "?")),
                         "sha256": str(meta.get("sha256", "")), "size": cache.dir_size(entry),
                         "path": str(entry), "source": meta.get("source", ""), "last_used": last_used})
    return rows


# ---- pure: bzImage payloads ---------------------------------------------------------------------------

PAYLOAD_MAGICS = (
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b\x08"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
)
LZ4_LEGACY_MAGIC = 0x184C2102
MAX_SCAN_HITS = 32  # per magic, when scanning a blob without a usable header


def bzimage_header(data: bytes) -> dict | None:
    """The x86 boot protocol header of a bzImage ("HdrS" at 0x202), or None if it isn't one."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    protocol = struct.unpack_from("<H", data, 0x206)[0]
    setup_sects = data[0x1F1] or 4
    header = {"protocol": protocol, "setup_size": (setup_sects + 1) * 512, "kernel_version": None,
              "payload_offset": None, "payload_length": None}
    version_ptr = struct.unpack_from("<H", data, 0x20E)[0]
    if version_ptr and version_ptr + 0x200 < len(data):
        start = version_ptr + 0x200
        end = data.find(b"\0", start, start + 256)
        if end > start:
            header["kernel_version"] = data[start:end].decode("ascii", "replace")
    if protocol >= 0x208:
        offset, length = struct.unpack_from("<II", data, 0x248)
        if length:
            header["payload_offset"] = header["setup_size"] + offset
            header["payload_length"] = length
    return header


def detect_format(data: bytes, offset: int = 0) -> str | None:
    for fmt, magic in PAYLOAD_MAGICS:
        if data.startswith(magic, offset):
            return fmt
    return None


def payload_candidates(data: bytes) -> list[tuple[int, str, int | None]]:
    """Where a compressed kernel may start: (offset, format, length or None), best guess first.

    The boot header's payload_offset comes first; then every place one of the compressors' magic
    numbers occurs (as the kernel's extract-vmlinux script does)."""
    result: list[tuple[int, str, int | None]] = []
    header = bzimage_header(data)
    if header and header["payload_offset"] is not None:
        fmt = detect_format(data, header["payload_offset"])
        if fmt:
            result.append((header["payload_offset"], fmt, header["payload_length"]))
    hits = []
    for fmt, magic in PAYLOAD_MAGICS:
        start, count = 0, 0
        while count < MAX_SCAN_HITS:
            at = data.find(magic, start)
            if at < 0:
                break
            hits.append((at, fmt, None))
            start, count = at + 1, count + 1
    result += sorted(h for h in hits if h[:2] not in {r[:2] for r in result})
    return result


def lz4_block_decompress(src: bytes | memoryview, out: bytearray, pos: int, end: int) -> None:
    """Decompress one LZ4 block src[pos:end], appending to `out` (which also serves as the window)."""
    while pos < end:
        token = src[pos]
        pos += 1
        literals = token >> 4
        if literals == 15:
            while True:
                b = src[pos]
                pos += 1
                literals += b
                if b != 255:
                    break
        if literals:
            out += src[pos:pos + literals]
            pos += literals
        if pos >= end:
            break
        offset = src[pos] | (src[pos + 1] << 8)
        pos += 2
        length = token & 15
        if length == 15:
            while True:
                b = src[pos]
                pos += 1
                length += b
                if b != 255:
                    break
        length += 4
        start = len(out) - offset
        if offset == 0 or start < 0:
            raise ValueError("corrupt LZ4 block (bad match offset)")
        if offset >= length:
            out += out[start:start + length]
        else:  # overlapping copy: a repeated pattern
            pattern = bytes(out[start:])
            q, r = divmod(length, offset)
            out += pattern * q + pattern[:r]


def lz4_legacy_decompress(data: bytes) -> bytes:
    """Decompress the LZ4 "legacy" frame format the kernel uses (magic, then size-prefixed blocks).

    Stops at the end of the data or at a size field that can't be a block (the kernel appends the
    uncompressed size after the last block)."""
    if struct.unpack_from("<I", data, 0)[0] != LZ4_LEGACY_MAGIC:
        raise ValueError("not an LZ4 legacy frame")
    view = memoryview(data)
    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        if size == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(data):
            break
        pos += 4
        try:
            lz4_block_decompress(view, out, pos, pos + size)
        except IndexError:
            raise ValueError("corrupt LZ4 block (truncated)") from None
        pos += size
    return bytes(out)


def decompress_payload(data: bytes, fmt: str) -> bytes:
    """Decompress one compressed stream at the start of `data` (trailing bytes are ignored)."""
    if fmt == "zstd":
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj().decompress(data)
    if fmt == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if fmt == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if fmt == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if fmt == "bzip2":
        import bz2

        return bz2.BZ2Decompressor().decompress(data)
    if fmt == "lz4":
        return lz4_legacy_decompress(data)
    raise ValueError(f"unknown compression {fmt}")


def extract_vmlinux(image: bytes) -> tuple[bytes, str]:
    """The uncompressed ELF kernel inside a bzImage, and the compression it used.

    Tries the boot header's payload first, then every compressor magic found in the image; the first
    candidate that decompresses to an ELF file wins. Raises ValueError when none does."""
    errors = []
    for offset, fmt, length in payload_candidates(image):
        chunk = image[offset:offset + length] if length else image[offset:]
        try:
            result = decompress_payload(chunk, fmt)
        except (ValueError, lzma.LZMAError, zlib.error, zstandard.ZstdError, OSError, EOFError) as exc:
            errors.append(f"{fmt}@{offset}: {exc}")
            continue
        if result[:4] == b"\x7fELF":
            return result, fmt
        errors.append(f"{fmt}@{offset}: not an ELF file")
    raise ValueError("no compressed ELF kernel found in the image" + (f" ({errors[0]})" if errors else ""))


# ---- pure: ELF -------------------------------------------------------------------------------------------

PT_INTERP, PT_NOTE = 3, 4
SHT_NOTE = 7


@dataclass(frozen=True)
class Elf:
    bits: int
    little: bool
    segments: tuple[tuple[int, int, int, int], ...]  # (p_type, offset, filesz, align)
    sections: tuple[tuple[str, int, int, int], ...]  # (name, sh_type, offset, size)


def parse_elf(data: bytes) -> Elf:
    """Program and section headers of an ELF file (32 or 64 bit, either byte order)."""
    if data[:4] != b"\x7fELF" or len(data) < 52:
        raise ValueError("not an ELF file")
    bits = {1: 32, 2: 64}.get(data[4])
    little = {1: True, 2: False}.get(data[5])
    if bits is None or little is None:
        raise ValueError("unknown ELF class or byte order")
    e = "<" if little else ">"
    if bits == 64:
        phoff, shoff = struct.unpack_from(e + "QQ", data, 0x20)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(e + "HHHHH", data, 0x36)
    else:
        phoff, shoff = struct.unpack_from(e + "II", data, 0x1C)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(e + "HHHHH", data, 0x2A)
    segments = []
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + phentsize > len(data):
            break
        if bits == 64:
            p_type, _flags, offset, _va, _pa, filesz, _memsz, align = struct.unpack_from(e + "IIQQQQQQ", data, at)
        else:
            p_type, offset, _va, _pa, filesz, _memsz, _flags, align = struct.unpack_from(e + "IIIIIIII", data, at)
        segments.append((p_type, offset, filesz, align))
    raw_sections = []
    for i in range(shnum if shoff else 0):
        at = shoff + i * shentsize
        if at + shentsize > len(data):
            break
        if bits == 64:
            name, sh_type, _f, _addr, offset, size = struct.unpack_from(e + "IIQQQQ", data, at)
        else:
            name, sh_type, _f, _addr, offset, size = struct.unpack_from(e + "IIIIII", data, at)
        raw_sections.append((name, sh_type, offset, size))
    sections = []
    if raw_sections and shstrndx < len(raw_sections):
        _n, _t, str_off, str_size = raw_sections[shstrndx]
        strtab = data[str_off:str_off + str_size]
        for name, sh_type, offset, size in raw_sections:
            end = strtab.find(b"\0", name)
            sections.append((strtab[name:end if end >= 0 else None].decode("ascii", "replace"), sh_type, offset, size))
    return Elf(bits=bits, little=little, segments=tuple(segments), sections=tuple(sections))


def _notes(data: bytes, offset: int, size: int, little: bool, align: int) -> Iterable[tuple[str, int, bytes]]:
    e = "<" if little else ">"
    align = 8 if align == 8 else 4
    pad = lambda n: (n + align - 1) & ~(align - 1)  # noqa: E731
    pos, end = offset, min(offset + size, len(data))
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from(e + "III", data, pos)
        name_at = pos + 12
        desc_at = name_at + pad(namesz)
        if desc_at + descsz > end:
            break
        yield data[name_at:name_at + namesz].rstrip(b"\0").decode("ascii", "replace"), ntype, \
            data[desc_at:desc_at + descsz]
        pos = desc_at + pad(descsz)


def elf_notes(data: bytes) -> list[tuple[str, int, bytes]]:
    """All ELF notes (name, type, desc): from PT_NOTE segments, else from SHT_NOTE sections."""
    elf = parse_elf(data)
    found = []
    for p_type, offset, filesz, align in elf.segments:
        if p_type == PT_NOTE:
            found += _notes(data, offset, filesz, elf.little, align)
    if not found:
        for _name, sh_type, offset, size in elf.sections:
            if sh_type == SHT_NOTE:
                found += _notes(data, offset, size, elf.little, 4)
    return found


def pvh_entry(data: bytes) -> int | None:
    """The PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY in a "Xen" note) of an ELF kernel, or None."""
    try:
        notes = elf_notes(data)
    except (ValueError, struct.error):
        return None
    for name, ntype, desc in notes:
        if name == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
            return int.from_bytes(desc, "little" if data[5] == 1 else "big")
    return None


def is_static_elf(data: bytes) -> bool:
    """An ELF executable without a program interpreter (statically linked)."""
    try:
        elf = parse_elf(data)
    except (ValueError, struct.error):
        return False
    return bool(elf.segments) and not any(p[0] == PT_INTERP for p in elf.segments)


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The `.modinfo` key=value strings of a kernel module (e.g. depends, name, vermagic)."""
    elf = parse_elf(ko)
    info: dict[str, list[str]] = {}
    for name, _t, offset, size in elf.sections:
        if name == ".modinfo":
            for item in ko[offset:offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


def kernel_release(data: bytes) -> str | None:
    """The kernel release (`uname -r`) of a bzImage (boot header) or vmlinux (linux_banner)."""
    header = bzimage_header(data)
    if header and header["kernel_version"]:
        return header["kernel_version"].split()[0]
    m = re.search(rb"Linux version (\S+) \(", data)
    return m.group(1).decode("ascii", "replace") if m else None


def parse_kernel_config(text: str) -> dict[str, str]:
    """A kernel .config as {CONFIG_X: value}; `# CONFIG_X is not set` gives "n"."""
    values = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2).strip().strip('"')
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set", line)
        if m:
            values[m.group(1)] = "n"
    return values


# ---- pure: modules ---------------------------------------------------------------------------------------

MODULE_SUFFIX = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def module_name(path: str) -> str:
    """`kernel/drivers/char/hw_random/virtio-rng.ko.xz` -> `virtio_rng`."""
    base = MODULE_SUFFIX.sub("", os.path.basename(path))
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """modules.dep -> {name: (path, (dependency names...))}."""
    result = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if sep and path.strip():
            result[module_name(path.strip())] = (path.strip(), tuple(module_name(d) for d in deps.split()))
    return result


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


@dataclass(frozen=True)
class ModulePlan:
    order: tuple[str, ...]      # modules to load, dependencies first
    builtin: tuple[str, ...]    # wanted or needed modules that are built into the kernel
    missing: tuple[str, ...]    # optional wanted modules that exist neither way


def plan_modules(wanted: Iterable[str], deps_of: Callable[[str], Iterable[str] | None], builtin: set[str],
                 optional: Iterable[str] = ()) -> ModulePlan:
    """The load order for `wanted` modules and their dependencies (pure, deterministic).

    `deps_of(name)` gives a module's dependencies, or None when there is no such module file. Built-in
    modules need no loading; a missing optional module is left out; a missing required one (or a
    dependency cycle) raises JvmkitError."""
    optional = {module_name(o) for o in optional}
    order: list[str] = []
    done: set[str] = set()
    used_builtin: list[str] = []
    missing: list[str] = []

    def visit(name: str, chain: tuple[str, ...], required: bool) -> bool:
        if name in done:
            return True
        if name in chain:
            raise JvmkitError(f"kernel module dependency cycle: {' -> '.join(chain + (name,))}")
        if name in builtin:
            if name not in used_builtin:
                used_builtin.append(name)
            return True
        deps = deps_of(name)
        if deps is None:
            if required:
                via = f" (needed by {chain[-1]})" if chain else ""
                raise JvmkitError(f"the kernel has no module {name}{via} and it is not built in")
            missing.append(name)
            return False
        for dep in deps:
            visit(module_name(dep), chain + (name,), True)
        done.add(name)
        order.append(name)
        return True

    for want in wanted:
        name = module_name(want)
        visit(name, (), name not in optional)
    return ModulePlan(tuple(order), tuple(used_builtin), tuple(missing))


def decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    return data


class ModuleTree:
    """The modules of an unpacked kernel package (`lib/modules/<release>/`), for `plan_modules`."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, Path] = {}
        for path in sorted(root.rglob("*.ko*")):
            if MODULE_SUFFIX.search(path.name):
                self.files.setdefault(module_name(path.name), path)
        dep_file = root / "modules.dep"
        self.dep = parse_modules_dep(dep_file.read_text()) if dep_file.is_file() else None
        builtin = root / "modules.builtin"
        self.builtin = parse_modules_builtin(builtin.read_text()) if builtin.is_file() else set()
        self._cache: dict[str, bytes] = {}

    def data(self, name: str) -> bytes:
        if name not in self._cache:
            self._cache[name] = decompress_module(self.files[name])
        return self._cache[name]

    def deps_of(self, name: str) -> tuple[str, ...] | None:
        if name not in self.files:
            return None
        if self.dep is not None and name in self.dep:
            return self.dep[name][1]
        depends = modinfo(self.data(name)).get("depends", [""])[0]
        return tuple(module_name(d) for d in depends.split(",") if d.strip())


# ---- Linux kernels ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinuxKernel:
    """A Linux guest kernel in the cache, with the userland the `linux` image needs."""

    path: Path                       # the cache entry
    id: str
    version: str                     # kernel release, e.g. 6.1.0-50-cloud-amd64
    source: str                      # "debian" or "import"
    vmlinux: Path                    # uncompressed ELF with a PVH note: what QEMU boots
    vmlinux_sha256: str
    vmlinuz: Path | None             # the bzImage, when there was one
    busybox: Path                    # static busybox
    modules: tuple[Path, ...]        # decompressed .ko files, load order (dependencies first)
    builtin: tuple[str, ...]         # needed drivers that are built into the kernel
    pvh: bool
    pvh_entry: int | None
    config: Mapping[str, str | None] = field(default_factory=dict)  # CONFIG_FACTS (None: unknown)
    package: str | None = None       # Debian package name
    debian_version: str | None = None
    suite: str | None = None
    debs: Mapping[str, Mapping] = field(default_factory=dict)  # package -> {version, sha256, size, url}

    target = "linux"

    @property
    def sha256(self) -> str:
        return self.vmlinux_sha256

    @property
    def name(self) -> str:
        return self.package or f"linux ({self.source})"

    def describe(self) -> dict:
        return {"target": "linux", "id": self.id, "name": self.name, "version": self.version,
                "source": self.source, "package": self.package, "debian_version": self.debian_version,
                "suite": self.suite, "sha256": self.vmlinux_sha256, "size": self.vmlinux.stat().st_size,
                "path": str(self.path), "pvh": self.pvh, "modules": [m.name for m in self.modules],
                "builtin": list(self.builtin), "config": dict(self.config),
                "debs": {k: dict(v) for k, v in self.debs.items()}}


def load_linux_kernel(entry: Path) -> LinuxKernel:
    """The LinuxKernel recorded in a cache entry's kernel.json."""
    try:
        meta = json.loads((entry / KERNEL_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise JvmkitError(f"{entry} is not a jvmkit linux kernel entry ({exc})",
                          hint="run `jvmkit cache prune --all` or `jvmkit kernel pull linux`") from None
    vmlinuz = meta.get("vmlinuz")
    return LinuxKernel(
        path=entry, id=entry.name, version=meta["version"], source=meta.get("source", "debian"),
        vmlinux=entry / meta.get("vmlinux", "vmlinux"), vmlinux_sha256=meta["sha256"],
        vmlinuz=entry / vmlinuz if vmlinuz else None, busybox=entry / meta.get("busybox", "busybox"),
        modules=tuple(entry / "modules" / m for m in meta.get("modules", [])),
        builtin=tuple(meta.get("builtin", [])), pvh=bool(meta.get("pvh")),
        pvh_entry=int(meta["pvh_entry"], 16) if meta.get("pvh_entry") else None,
        config=meta.get("config", {}), package=meta.get("package"), debian_version=meta.get("debian_version"),
        suite=meta.get("suite"), debs=meta.get("debs", {}))


def _usable(entry: Path, meta: dict) -> bool:
    return meta.get("layout") == LAYOUT and (entry / meta.get("vmlinux", "vmlinux")).is_file()


def cached_linux_kernel(suite: str | None = None) -> LinuxKernel | None:
    """The cached Linux kernel most recently pulled, imported or used (restricted to Debian kernels of
    `suite` when one is given), or None."""
    best = None
    for entry, meta, last_used in _entries("linux"):
        if not _usable(entry, meta):
            continue
        if suite and (meta.get("source") != "debian" or meta.get("suite") != suite):
            continue
        key = (last_used, meta.get("created", 0))
        if best is None or key > best[0]:
            best = (key, entry)
    return load_linux_kernel(best[1]) if best else None


def _want(name: str) -> bool:
    return name.startswith("linux-image-") or name == BUSYBOX_PACKAGE


def choose_kernel_package(archive: debian.Archive) -> debian.Package:
    """The newest real `linux-image-<abi>-cloud-amd64` package (pure, given the archive's indexes):
    the one the newest `linux-image-cloud-amd64` metapackage depends on, else the newest by name."""
    meta = archive.newest(LINUX_META_PACKAGE)
    if meta is not None:
        for group in meta.relations():
            for rel in group:
                if LINUX_IMAGE_RE.fullmatch(rel.name):
                    pkg = archive.find(rel)
                    if pkg is not None:
                        return pkg
    images = [p for index in archive.indexes for p in index.packages if LINUX_IMAGE_RE.fullmatch(p.name)]
    if not images:
        raise JvmkitError(f"no {LINUX_META_PACKAGE} or linux-image-*-cloud-amd64 in Debian's {archive.suite} index",
                          hint="choose another suite with --suite")
    return max(images, key=lambda p: (debian.version_key(p.version), p.name))


def _find_one(directory: Path, pattern: str, what: str) -> Path:
    found = sorted(directory.glob(pattern))
    if not found:
        raise JvmkitError(f"the kernel package has no {what}")
    return found[-1]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


def build_linux_entry(dest: Path, kernel_deb: Path, busybox_deb: Path, *, kernel_pkg: debian.Package,
                      busybox_pkg: debian.Package, suite: str, archive: list[dict]) -> dict:
    """Fill a new cache entry from the two verified .deb files; returns the kernel.json written."""
    console = ui.current()
    scratch = dest / ".unpack"
    try:
        with console.step(f"unpacking {kernel_pkg.name}"):
            debian.extract_deb(kernel_deb, scratch, select=lambda p: p.startswith("boot/")
                               or re.match(r"(usr/)?lib/modules/[^/]+/", p) is not None)
        vmlinuz_path = _find_one(scratch / "boot", "vmlinuz-*", "boot/vmlinuz-*")
        release = vmlinuz_path.name[len("vmlinuz-"):]
        modroot = next((p for p in (scratch / "lib/modules" / release, scratch / "usr/lib/modules" / release)
                        if p.is_dir()), None)
        if modroot is None:
            raise JvmkitError(f"{kernel_pkg.name} has no lib/modules/{release}")
        config_path = scratch / "boot" / f"config-{release}"
        config_all = parse_kernel_config(config_path.read_text()) if config_path.is_file() else {}
        if config_path.is_file():
            shutil.copyfile(config_path, dest / "config")

        image = vmlinuz_path.read_bytes()
        with console.step("extracting vmlinux from the bzImage"):
            try:
                vmlinux, compression = extract_vmlinux(image)
            except ValueError as exc:
                raise JvmkitError(f"{vmlinuz_path.name}: {exc}") from None
        entry_point = pvh_entry(vmlinux)
        if entry_point is None:
            console.warn(f"{kernel_pkg.name}: vmlinux has no PVH entry note; QEMU can't boot it directly")
        _write(dest / "vmlinuz", image)
        _write(dest / "vmlinux", vmlinux)

        tree = ModuleTree(modroot)
        plan = plan_modules(GUEST_MODULES, tree.deps_of, tree.builtin, OPTIONAL_MODULES)
        (dest / "modules").mkdir()
        names = []
        for name in plan.order:
            ko = tree.data(name)
            if ko[:4] != b"\x7fELF":
                raise JvmkitError(f"{tree.files[name].name} did not decompress to an ELF module")
            _write(dest / "modules" / f"{name}.ko", ko)
            names.append(f"{name}.ko")
        (dest / "modules.order").write_text("".join(n + "\n" for n in names))

        shutil.rmtree(scratch)
        debian.extract_deb(busybox_deb, scratch, select=lambda p: p in ("bin/busybox", "usr/bin/busybox"))
        busybox_src = next((p for p in (scratch / "usr/bin/busybox", scratch / "bin/busybox") if p.is_file()), None)
        if busybox_src is None:
            raise JvmkitError(f"{busybox_pkg.name} {busybox_pkg.version} has no bin/busybox")
        busybox = busybox_src.read_bytes()
        if not is_static_elf(busybox):
            raise JvmkitError(f"{busybox_pkg.name}: bin/busybox is not a statically linked ELF executable")
        _write(dest / "busybox", busybox, 0o755)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    meta = {
        "target": "linux", "layout": LAYOUT, "source": "debian", "created": time.time(),
        "version": release, "package": kernel_pkg.name, "debian_version": kernel_pkg.version, "suite": suite,
        "archive": archive,
        "debs": {kernel_pkg.name: kernel_pkg.to_dict(), busybox_pkg.name: busybox_pkg.to_dict()},
        "vmlinuz": "vmlinuz", "vmlinuz_sha256": _sha256(image), "payload_compression": compression,
        "vmlinux": "vmlinux", "sha256": _sha256(vmlinux), "size": len(vmlinux),
        "pvh": entry_point is not None, "pvh_entry": f"{entry_point:#x}" if entry_point is not None else None,
        "busybox": "busybox", "busybox_sha256": _sha256(busybox), "busybox_version": busybox_pkg.version,
        "modules": names, "builtin": list(plan.builtin), "missing_optional": list(plan.missing),
        "config": {key: config_all.get(key) for key in CONFIG_FACTS},
    }
    (dest / KERNEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def linux_entry_id(release: str, kernel_sha256: str, busybox_sha256: str) -> str:
    digest = hashlib.sha256(f"{LAYOUT}\n{kernel_sha256}\n{busybox_sha256}".encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9.+_-]', '_', release)}-{digest}"


def pull_linux(suite: str | None = None, mirror: str | None = None, refresh: bool = False) -> LinuxKernel:
    """Find the newest Debian cloud kernel and busybox-static for `suite`, download and verify them,
    and build the cache entry (reused when it already exists). `refresh` re-reads the indexes.

    Offline with a kernel cached: warns and returns the cached one; with none: one JvmkitError."""
    console = ui.current()
    suite = debian.choose_suite(suite)
    console.info(f"jvmkit: looking for the Debian {suite} cloud kernel and {BUSYBOX_PACKAGE}")
    try:
        archive = debian.open_archive(suite, mirror, refresh=refresh, want=_want)
    except debian.ArchiveUnavailable:
        cached = cached_linux_kernel(suite)
        if cached is None:
            raise
        console.warn(f"Debian's archive is not reachable; using the cached kernel {cached.version}")
        return cached
    kernel_pkg = choose_kernel_package(archive)
    busybox_pkg = archive.newest(BUSYBOX_PACKAGE)
    if busybox_pkg is None:
        raise JvmkitError(f"no {BUSYBOX_PACKAGE} in Debian's {suite} index")
    release = LINUX_IMAGE_RE.fullmatch(kernel_pkg.name)
    release_name = f"{release.group(1)}-cloud-amd64" if release else kernel_pkg.name
    console.info(f"  kernel {kernel_pkg.name} {kernel_pkg.version} ({kernel_pkg.suite}), "
                 f"{BUSYBOX_PACKAGE} {busybox_pkg.version} ({busybox_pkg.suite})")
    if not archive.verified:
        reason = next(i.signature for i in archive.indexes if not i.verified)
        console.warn(f"the archive's signature was {reason}; the downloads are checked against the "
                     "index's SHA-256 only")
    key = linux_entry_id(release_name, kernel_pkg.sha256, busybox_pkg.sha256)

    def build(tmp: Path) -> None:
        sess = debian.session()
        kernel_deb = debian.fetch_deb(kernel_pkg, sess=sess)
        busybox_deb = debian.fetch_deb(busybox_pkg, sess=sess)
        build_linux_entry(tmp, kernel_deb, busybox_deb, kernel_pkg=kernel_pkg, busybox_pkg=busybox_pkg,
                          suite=suite, archive=archive.describe())

    entry, built = kernel_entry("linux", key, build, version=release_name)
    kernel = load_linux_kernel(entry)
    if not built:
        console.info(f"  {kernel.version}: already in the cache")
    return kernel


def ensure_linux_kernel(suite: str | None = None, mirror: str | None = None, refresh: bool = False) -> LinuxKernel:
    """The cached Linux kernel (see `cached_linux_kernel`), pulled from Debian's archive if there is none
    (or when `refresh` is set). A cached kernel is used without asking the network for newer ones."""
    if not refresh:
        kernel = cached_linux_kernel(suite)
        if kernel is not None:
            cache.touch_entry(kernel.path)
            return kernel
    return pull_linux(suite=suite, mirror=mirror, refresh=refresh)


def resolve_linux_kernel(kernel: Path | None = None, *, suite: str | None = None,
                         mirror: str | None = None) -> LinuxKernel:
    """The kernel `pack --target linux` uses: `--kernel PATH` (a bzImage, vmlinux, or a cache entry
    directory) when given, else the cached or freshly pulled Debian kernel."""
    if kernel is None:
        return ensure_linux_kernel(suite=suite, mirror=mirror)
    kernel = Path(kernel)
    if kernel.is_dir() and (kernel / KERNEL_JSON).is_file():
        return load_linux_kernel(kernel)
    return import_linux(kernel, suite=suite, mirror=mirror)


def _busybox_for_import(busybox: Path | None, suite: str | None, mirror: str | None) -> tuple[bytes, str]:
    if busybox is not None:
        data = Path(busybox).read_bytes()
        if not is_static_elf(data):
            raise UsageError(f"{busybox} is not a statically linked ELF executable")
        return data, str(busybox)
    for entry, meta, _used in sorted(_entries("linux"), key=lambda e: -e[2]):
        if meta.get("source") == "debian" and _usable(entry, meta) and (entry / "busybox").is_file():
            return (entry / "busybox").read_bytes(), f"{BUSYBOX_PACKAGE} {meta.get('busybox_version', '')}".strip()
    archive = debian.open_archive(suite, mirror, want=lambda n: n == BUSYBOX_PACKAGE)
    pkg = archive.newest(BUSYBOX_PACKAGE)
    if pkg is None:
        raise JvmkitError(f"no {BUSYBOX_PACKAGE} in Debian's {archive.suite} index")
    deb = debian.fetch_deb(pkg)
    scratch = cache.cache_dir("debian") / f".busybox.{os.getpid()}"
    try:
        debian.extract_deb(deb, scratch, select=lambda p: p in ("bin/busybox", "usr/bin/busybox"))
        src = next((p for p in (scratch / "usr/bin/busybox", scratch / "bin/busybox") if p.is_file()), None)
        if src is None:
            raise JvmkitError(f"{pkg.name} {pkg.version} has no bin/busybox")
        return src.read_bytes(), f"{pkg.name} {pkg.version}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# The name each guest driver registers with (a NUL-terminated string in a kernel that has it built in).
DRIVER_NAMES = {"virtio_pci": "virtio-pci", "virtio_balloon": "virtio_balloon", "virtio_net": "virtio_net",
                "virtio_rng": "virtio_rng", "qemu_fw_cfg": "fw_cfg"}


def builtin_driver_guess(vmlinux: bytes) -> dict[str, bool]:
    """Whether each guest driver looks built into a kernel (its driver name string is present).

    A heuristic for imported kernels, whose configuration we usually don't have: a modular kernel
    (like Debian's) has none of these strings."""
    return {name: re.search(b"\0" + DRIVER_NAMES.get(name, name).encode() + b"\0", vmlinux) is not None
            for name in GUEST_MODULES}


def import_linux(path: Path, *, busybox: Path | None = None, suite: str | None = None,
                 mirror: str | None = None) -> LinuxKernel:
    """Add a user's own kernel (bzImage, or an uncompressed vmlinux with a PVH note) to the cache.

    No modules come with it: the virtio drivers must be built in. busybox comes from `busybox`, from a
    cached Debian kernel entry, or from Debian's archive."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"kernel {path} does not exist")
    image = path.read_bytes()
    vmlinuz: bytes | None = None
    if image[:4] == b"\x7fELF":
        vmlinux = image
    elif bzimage_header(image):
        vmlinuz = image
        try:
            vmlinux, _fmt = extract_vmlinux(image)
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from None
    else:
        raise UsageError(f"{path} is not a Linux kernel (neither a bzImage nor an ELF vmlinux)")
    entry_point = pvh_entry(vmlinux)
    if entry_point is None:
        raise UsageError(f"{path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)",
                         hint="jvmkit boots the uncompressed kernel directly; build it with CONFIG_PVH=y")
    release = kernel_release(image) or kernel_release(vmlinux) or "unknown"
    guess = builtin_driver_guess(vmlinux)
    absent = [n for n, ok in guess.items() if not ok and n not in OPTIONAL_MODULES]
    if absent:
        ui.current().warn(f"{path.name}: no sign of built-in {', '.join(absent)}; an imported kernel gets no "
                          "modules, so the guest may lack these devices (build them in: =y)")
    digest = _sha256(vmlinux)
    key = f"import-{re.sub(r'[^A-Za-z0-9.+_-]', '_', release)}-{digest[:12]}"

    def build(tmp: Path) -> None:  # only when this kernel is not in the cache yet
        bb, bb_origin = _busybox_for_import(busybox, suite, mirror)
        _write(tmp / "vmlinux", vmlinux)
        if vmlinuz is not None:
            _write(tmp / "vmlinuz", vmlinuz)
        _write(tmp / "busybox", bb, 0o755)
        (tmp / "modules").mkdir()
        (tmp / "modules.order").write_text("")
        meta = {"target": "linux", "layout": LAYOUT, "source": "import", "created": time.time(),
                "version": release, "imported_from": str(path.resolve()), "vmlinux": "vmlinux",
                "vmlinuz": "vmlinuz" if vmlinuz is not None else None, "sha256": digest, "size": len(vmlinux),
                "pvh": True, "pvh_entry": f"{entry_point:#x}", "busybox": "busybox", "busybox_sha256": _sha256(bb),
                "busybox_version": bb_origin, "modules": [],
                "builtin": [n for n, ok in guess.items() if ok], "config": {k: None for k in CONFIG_FACTS}}
        (tmp / KERNEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    entry, _built = kernel_entry("linux", key, build, version=release)
    return load_linux_kernel(entry)
