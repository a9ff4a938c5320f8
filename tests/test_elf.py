"""The ELF reader (jvmkit.packager.elf) against binutils' readelf on this host's real binaries and
libraries (DT_NEEDED, run path, program interpreter), on synthetic 32-bit big-endian files, and
`native_libs.runtime_native_deps` on the JDKs installed here (its closure must be complete)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

from jvmkit import proc
from jvmkit.packager import elf, native_libs

JDKS = sorted(p for p in glob.glob("/usr/lib/jvm/*") if os.path.isfile(os.path.join(p, "bin", "java"))
              and not os.path.islink(p))


def host_elf_files() -> list[Path]:
    found = [Path(sys.executable).resolve(), Path("/usr/bin/ls"), Path("/lib/x86_64-linux-gnu/libc.so.6"),
             Path("/lib/x86_64-linux-gnu/libz.so.1")]
    for jdk in JDKS:
        found += [Path(jdk, "bin", "java"), Path(jdk, "lib", "server", "libjvm.so"), Path(jdk, "lib", "libjli.so")]
    return [p.resolve() for p in found if p.is_file()]


def readelf(*args: str) -> str:
    return proc.run(["readelf", "-W", *args], what="readelf", timeout=60).stdout


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_dynamic_deps_agree_with_readelf():
    files = host_elf_files()
    assert len(files) >= 3
    for path in files:
        deps = elf.dynamic_deps(path.read_bytes())
        dynamic = readelf("-d", str(path))
        needed = tuple(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
        runpath = re.findall(r"\(RUNPATH\)\s+Library runpath: \[([^\]]*)\]", dynamic) or \
            re.findall(r"\(RPATH\)\s+Library rpath: \[([^\]]*)\]", dynamic)
        interp = re.search(r"\[Requesting program interpreter: ([^\]]+)\]", readelf("-l", str(path)))
        assert deps is not None, path
        assert deps.needed == needed, path
        assert deps.runpath == tuple(d for p in runpath for d in p.split(":") if d), path
        assert deps.interpreter == (interp.group(1) if interp else None), path


def elf32_be(*, note: bytes | None = None, interp: bytes | None = None) -> bytes:
    """A 32-bit big-endian ELF (e.g. PowerPC) with an optional PT_NOTE and PT_INTERP."""
    blobs = [(4, note), (3, interp)]
    blobs = [(t, b) for t, b in blobs if b is not None]
    phoff = 52
    data_at = phoff + 32 * len(blobs)
    header = b"\x7fELF" + bytes([1, 2, 1]) + bytes(9) + struct.pack(
        ">HHIIIIIHHHHHH", 2, 20, 1, 0x10000, phoff, 0, 0, 52, 32, len(blobs), 40, 0, 0)
    phdrs, body = b"", b""
    for p_type, blob in blobs:
        phdrs += struct.pack(">IIIIIIII", p_type, data_at + len(body), 0, 0, len(blob), len(blob), 4, 4)
        body += blob + bytes(-len(blob) % 4)
    return header + phdrs + body


def test_elf32_big_endian_notes_and_interpreter():
    xen = struct.pack(">III", 4, 4, elf.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + struct.pack(">I", 0x123456)
    data = elf32_be(note=struct.pack(">III", 4, 4, 6) + b"Xen\0" + b"ppc\0" + xen)
    parsed = elf.parse_elf(data)
    assert (parsed.bits, parsed.little, parsed.machine, parsed.entry) == (32, False, 20, 0x10000)
    assert [(n, t) for n, t, _ in elf.elf_notes(data)] == [("Xen", 6), ("Xen", 18)]
    assert elf.pvh_entry(data) == 0x123456
    assert elf.is_static_elf(data)
    dynamic = elf32_be(interp=b"/lib/ld.so.1\0")
    assert elf.dynamic_deps(dynamic) == elf.ElfDeps("/lib/ld.so.1", ())
    assert not elf.is_static_elf(dynamic)


def test_what_is_not_an_elf_file():
    for junk in (b"", b"MZ\x90\0" * 20, b"\x7fELF" + bytes([3, 1]) + bytes(60)):
        with pytest.raises(ValueError):
            elf.parse_elf(junk)
        assert elf.try_parse(junk) is None and elf.dynamic_deps(junk) is None
        assert elf.pvh_entry(junk) is None and not elf.is_static_elf(junk)
    truncated = elf32_be(note=b"x" * 12)[:60]  # program headers cut off
    assert elf.parse_elf(truncated).segments == ()


@pytest.mark.skipif(not JDKS, reason="no JDK under /usr/lib/jvm")
@pytest.mark.parametrize("jdk", JDKS)
def test_runtime_native_deps_is_a_closure(jdk):
    runtime = Path(jdk)
    deps = native_libs.runtime_native_deps(runtime)
    guests = {g for g, _ in deps}
    assert "/lib64/ld-linux-x86-64.so.2" in guests and any(g.endswith("/libc.so.6") for g in guests)
    inside = {p.name for p in runtime.rglob("*.so")}
    for _guest, host in deps:
        assert host.is_file() and not host.is_symlink()
        for name in elf.dynamic_deps(host.read_bytes()).needed:
            assert name in inside or any(g.endswith("/" + name) for g in guests), (host, name)
    osv = native_libs.runtime_native_deps(runtime, exclude=native_libs.LIBC_FAMILY)
    assert not any(os.path.basename(g) in native_libs.LIBC_FAMILY for g, _ in osv)
    assert {g for g, _ in osv} < guests
