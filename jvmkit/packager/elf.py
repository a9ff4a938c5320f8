"""The one ELF reader: headers, program and section headers, notes (the Xen PVH entry note), the
dynamic section (DT_NEEDED, DT_RUNPATH/DT_RPATH) and named sections.

Used by the kernel modules (is a vmlinux or an OSv loader bootable with `-kernel`: its PVH note;
a kernel module's `.modinfo`; is busybox static) and by `native_libs` (a runtime's program
interpreter and DT_NEEDED closure). Pure functions over bytes; nothing is executed. Both classes
(32/64 bit) and both byte orders are read. A malformed file raises ValueError from `parse_elf`;
the query helpers answer None / False / empty instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE = 1, 2, 3, 4
SHT_NOTE = 7
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU's -kernel jumps to


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    offset: int
    size: int


@dataclass(frozen=True)
class Elf:
    bits: int                       # 32 or 64
    little: bool                    # byte order
    type: int                       # e_type (2 executable, 3 shared object, 1 relocatable)
    machine: int
    entry: int
    segments: tuple[Segment, ...]
    sections: tuple[Section, ...]

    @property
    def endian(self) -> str:
        return "<" if self.little else ">"

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def file_offset(self, vaddr: int) -> int | None:
        """The file offset of a virtual address inside a PT_LOAD segment, or None."""
        for seg in self.segments:
            if seg.type == PT_LOAD and seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                return vaddr - seg.vaddr + seg.offset
        return None


def is_elf(data: bytes) -> bool:
    return data[:4] == MAGIC


def parse_elf(data: bytes) -> Elf:
    """Program and section headers of an ELF file. Raises ValueError when it is not one (or is cut short)."""
    if data[:4] != MAGIC or len(data) < 52:
        raise ValueError("not an ELF file")
    bits = {1: 32, 2: 64}.get(data[4])
    little = {1: True, 2: False}.get(data[5])
    if bits is None or little is None:
        raise ValueError("unknown ELF class or byte order")
    try:
        return _parse(data, bits, little)
    except struct.error:
        raise ValueError("truncated ELF file") from None


def _parse(data: bytes, bits: int, little: bool) -> Elf:
    e = "<" if little else ">"
    e_type, machine = struct.unpack_from(e + "HH", data, 0x10)
    if bits == 64:
        entry, phoff, shoff = struct.unpack_from(e + "QQQ", data, 0x18)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(e + "HHHHH", data, 0x36)
        ph_fmt, sh_fmt = e + "IIQQQQQQ", e + "IIQQQQ"
    else:
        entry, phoff, shoff = struct.unpack_from(e + "III", data, 0x18)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(e + "HHHHH", data, 0x2A)
        ph_fmt, sh_fmt = e + "IIIIIIII", e + "IIIIII"
    segments = []
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + phentsize > len(data):
            break
        if bits == 64:
            p_type, _flags, offset, vaddr, _pa, filesz, memsz, align = struct.unpack_from(ph_fmt, data, at)
        else:
            p_type, offset, vaddr, _pa, filesz, memsz, _flags, align = struct.unpack_from(ph_fmt, data, at)
        segments.append(Segment(p_type, offset, vaddr, filesz, memsz, align))
    raw = []
    for i in range(shnum if shoff else 0):
        at = shoff + i * shentsize
        if at + shentsize > len(data):
            break
        name, sh_type, _flags, _addr, offset, size = struct.unpack_from(sh_fmt, data, at)
        raw.append((name, sh_type, offset, size))
    sections = []
    if raw and shstrndx < len(raw):
        _n, _t, str_off, str_size = raw[shstrndx]
        strtab = data[str_off:str_off + str_size]
        for name, sh_type, offset, size in raw:
            end = strtab.find(b"\0", name)
            label = strtab[name:end if end >= 0 else None].decode("ascii", "replace")
            sections.append(Section(label, sh_type, offset, size))
    return Elf(bits=bits, little=little, type=e_type, machine=machine, entry=entry,
               segments=tuple(segments), sections=tuple(sections))


def try_parse(data: bytes) -> Elf | None:
    try:
        return parse_elf(data)
    except ValueError:
        return None


# ---- notes ---------------------------------------------------------------------------------------

def _notes(data: bytes, offset: int, size: int, little: bool, align: int) -> Iterator[tuple[str, int, bytes]]:
    e = "<" if little else ">"
    step = 8 if align == 8 else 4
    pad = lambda n: (n + step - 1) & ~(step - 1)  # noqa: E731
    pos, end = offset, min(offset + size, len(data))
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from(e + "III", data, pos)
        name_at = pos + 12
        desc_at = name_at + pad(namesz)
        if desc_at + descsz > end:
            break
        yield (data[name_at:name_at + namesz].rstrip(b"\0").decode("ascii", "replace"), ntype,
               data[desc_at:desc_at + descsz])
        pos = desc_at + pad(descsz)


def elf_notes(data: bytes, elf: Elf | None = None) -> list[tuple[str, int, bytes]]:
    """All ELF notes (name, type, desc): from PT_NOTE segments, else from SHT_NOTE sections.
    Raises ValueError when `data` is not an ELF file."""
    elf = elf or parse_elf(data)
    found = []
    for seg in elf.segments:
        if seg.type == PT_NOTE:
            found += _notes(data, seg.offset, seg.filesz, elf.little, seg.align)
    if not found:
        for sec in elf.sections:
            if sec.type == SHT_NOTE:
                found += _notes(data, sec.offset, sec.size, elf.little, 4)
    return found


def pvh_entry(data: bytes) -> int | None:
    """The PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY in a "Xen" note) of an ELF kernel, or None.

    A Linux vmlinux built with CONFIG_PVH and OSv's loader-stripped.elf carry it; QEMU boots such a
    file with `-kernel` directly."""
    elf = try_parse(data)
    if elf is None:
        return None
    for name, ntype, desc in elf_notes(data, elf):
        if name == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
            return int.from_bytes(desc, "little" if elf.little else "big")
    return None


# ---- segments, sections, dynamic -----------------------------------------------------------------

def interpreter(data: bytes, elf: Elf) -> str | None:
    """The program interpreter (PT_INTERP), e.g. /lib64/ld-linux-x86-64.so.2."""
    seg = next((s for s in elf.segments if s.type == PT_INTERP), None)
    if seg is None:
        return None
    return data[seg.offset:seg.offset + seg.filesz].split(b"\0", 1)[0].decode("utf-8", "replace")


def is_static_elf(data: bytes) -> bool:
    """An ELF executable without a program interpreter (statically linked)."""
    elf = try_parse(data)
    return elf is not None and bool(elf.segments) and not any(s.type == PT_INTERP for s in elf.segments)


def section_data(data: bytes, name: str) -> bytes | None:
    """The bytes of the section called `name`, or None when there is none. Raises ValueError when
    `data` is not an ELF file."""
    sec = parse_elf(data).section(name)
    return None if sec is None else data[sec.offset:sec.offset + sec.size]


@dataclass(frozen=True)
class ElfDeps:
    interpreter: str | None
    needed: tuple[str, ...]         # DT_NEEDED, in file order
    runpath: tuple[str, ...] = ()   # DT_RUNPATH directories (DT_RPATH when there is no DT_RUNPATH)


def _dynamic(data: bytes, elf: Elf, seg: Segment) -> Iterator[tuple[int, int]]:
    fmt = elf.endian + ("qQ" if elf.bits == 64 else "iI")
    size = struct.calcsize(fmt)
    end = min(seg.offset + seg.filesz, len(data))
    for at in range(seg.offset, end - size + 1, size):
        tag, value = struct.unpack_from(fmt, data, at)
        if tag == DT_NULL:
            return
        yield tag, value


def dynamic_deps(data: bytes) -> ElfDeps | None:
    """Program interpreter, DT_NEEDED names and run path of an ELF file; None if it is not one."""
    elf = try_parse(data)
    if elf is None:
        return None
    interp = interpreter(data, elf)
    seg = next((s for s in elf.segments if s.type == PT_DYNAMIC), None)
    if seg is None:
        return ElfDeps(interp, ())
    entries = list(_dynamic(data, elf, seg))
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    if strtab is None:
        return ElfDeps(interp, ())
    # DT_STRTAB is an address; a library whose loads don't map it has it as a file offset already
    base = elf.file_offset(strtab)
    base = strtab if base is None else base

    def string(offset: int) -> str:
        start = base + offset
        end = data.find(b"\0", start)
        if start >= len(data) or end < 0:
            raise ValueError("dynamic string outside the file")
        return data[start:end].decode("utf-8", "replace")

    try:
        needed = tuple(string(v) for t, v in entries if t == DT_NEEDED)
        paths = [string(v) for t, v in entries if t == DT_RUNPATH] or \
            [string(v) for t, v in entries if t == DT_RPATH]
    except ValueError:
        return ElfDeps(interp, ())
    runpath = tuple(d for p in paths for d in p.split(":") if d)
    return ElfDeps(interp, needed, runpath)
