"""Tests of the Linux side of jvmkit.packager.kernels (and of the ELF reader it uses): bzImage
payloads (zstd/xz/gzip/LZ4, our LZ4 decoder against the `lz4` package's), ELF notes (PVH), modinfo,
module load order, and a whole `pull_linux` against a fake Debian archive served on 127.0.0.1 with
synthetic packages. One opt-in test (JVMKIT_TEST_NETWORK=1) pulls the real kernel from
the mirror apt is configured with and boots it under QEMU."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from jvmkit.errors import JvmkitError
from jvmkit.packager import debian
from jvmkit.packager import elf as elfs
from jvmkit.packager.kernels import bzimage, linux, modules, store
from support.servers import serve_directory


# A fresh cache, no mirror or keyring overrides, and a console whose output the test can read.
pytestmark = pytest.mark.usefixtures("isolated_cache")


# ---- synthetic ELF files -------------------------------------------------------------------------------

def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def make_elf(*, notes: bytes = b"", note_segment: bool = True, sections: dict[str, bytes] | None = None,
             interp: bool = False, body: bytes = b"") -> bytes:
    """A small little-endian ELF64 file with optional PT_NOTE / PT_INTERP segments and named sections."""
    sections = dict(sections or {})
    if notes:
        sections.setdefault(".note.Xen", notes)
    interp_data = b"/lib64/ld-linux-x86-64.so.2\0" if interp else b""
    phdrs = [(1, None, None)]  # PT_LOAD over the whole file
    if notes and note_segment:
        phdrs.append((4, ".note.Xen", None))
    if interp:
        phdrs.append((3, "interp", None))
    header_size = 64 + 56 * len(phdrs)
    blobs: list[tuple[str, bytes]] = []
    if interp:
        blobs.append(("interp", interp_data))
    blobs += list(sections.items())
    blobs.append(("body", body))
    offsets: dict[str, int] = {}
    data = bytearray()
    for name, blob in blobs:
        while (header_size + len(data)) % 8:
            data.append(0)
        offsets[name] = header_size + len(data)
        data += blob
    names = [""] + list(sections) + [".shstrtab"]
    shstrtab = b"".join(n.encode() + b"\0" for n in names)
    name_off = {}
    at = 0
    for n in names:
        name_off[n] = at
        at += len(n) + 1
    offsets[".shstrtab"] = header_size + len(data)
    data += shstrtab
    while (header_size + len(data)) % 8:
        data.append(0)
    shoff = header_size + len(data)
    total = shoff + 64 * len(names)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    out = bytearray(ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, 64, shoff, 0, 64, 56, len(phdrs),
                                        64, len(names), len(names) - 1))
    for p_type, ref, _ in phdrs:
        if p_type == 1:
            offset, size = 0, total
        elif ref == "interp":
            offset, size = offsets["interp"], len(interp_data)
        else:
            offset, size = offsets[ref], len(sections[ref])
        out += struct.pack("<IIQQQQQQ", p_type, 4, offset, 0, 0, size, size, 4)
    out += data
    for n in names:
        if n == "":
            out += bytes(64)
            continue
        blob = shstrtab if n == ".shstrtab" else sections[n]
        sh_type = 3 if n == ".shstrtab" else (7 if n.startswith(".note") else 1)
        out += struct.pack("<IIQQQQIIQQ", name_off[n], sh_type, 0, 0, offsets[n], len(blob), 0, 0, 1, 0)
    assert len(out) == total
    return bytes(out)


PVH_NOTES = note(b"Xen", 6, b"linux\0") + note(b"GNU", 3, b"\x01" * 20) + note(b"Xen", 18, struct.pack("<Q", 0x1000850))
BANNER = b"Linux version 6.1.0-99-cloud-amd64 (builder) (gcc) #1 SMP PREEMPT_DYNAMIC Debian 6.1.999-1\n\0"


def vmlinux_blob(with_pvh: bool = True) -> bytes:
    notes = PVH_NOTES if with_pvh else note(b"Xen", 6, b"linux\0")
    return make_elf(notes=notes, body=BANNER + bytes(range(256)) * 8)


def ko_blob(name: str, depends: str) -> bytes:
    info = f"license=GPL\0depends={depends}\0name={name}\0vermagic=6.1.0-99-cloud-amd64 SMP\0".encode()
    return make_elf(sections={".modinfo": info, ".text": b"\xc3" * 16})


def test_pvh_note_found_in_segment_and_section():
    assert elfs.pvh_entry(vmlinux_blob()) == 0x1000850
    assert elfs.pvh_entry(make_elf(notes=PVH_NOTES, note_segment=False)) == 0x1000850  # SHT_NOTE fallback
    assert elfs.pvh_entry(vmlinux_blob(with_pvh=False)) is None
    assert elfs.pvh_entry(make_elf(notes=note(b"Foo", 18, b"\0" * 8))) is None
    assert elfs.pvh_entry(make_elf(notes=note(b"Xen", 18, struct.pack("<I", 0x2000)))) == 0x2000
    assert elfs.pvh_entry(b"MZ not an elf") is None
    names = [(n, t) for n, t, _ in elfs.elf_notes(vmlinux_blob())]
    assert names == [("Xen", 6), ("GNU", 3), ("Xen", 18)]


def test_static_elf_and_modinfo():
    assert elfs.is_static_elf(make_elf(body=b"x"))
    assert not elfs.is_static_elf(make_elf(interp=True))
    assert not elfs.is_static_elf(b"#!/bin/sh\n")
    info = modules.modinfo(ko_blob("virtio_net", "virtio_ring,virtio,net_failover"))
    assert info["depends"] == ["virtio_ring,virtio,net_failover"] and info["name"] == ["virtio_net"]
    with pytest.raises(ValueError):
        modules.modinfo(b"not elf")


# ---- bzImage payloads --------------------------------------------------------------------------------------

def lz4_literal_block(data: bytes) -> bytes:
    n = len(data)
    if n < 15:
        return bytes([n << 4]) + data
    rest, ext = n - 15, bytearray()
    while rest >= 255:
        ext.append(255)
        rest -= 255
    ext.append(rest)
    return bytes([0xF0]) + bytes(ext) + data


def lz4_legacy(blocks: list[bytes], total: int) -> bytes:
    out = struct.pack("<I", bzimage.LZ4_LEGACY_MAGIC)
    for block in blocks:
        out += struct.pack("<I", len(block)) + block
    return out + struct.pack("<I", total)  # the kernel's appended uncompressed size


def test_lz4_block_sequences():
    # "abc", then a match 3 back of length 9 (overlapping), then a last literal run "xyz"
    block = bytes([0x35]) + b"abc" + b"\x03\x00" + bytes([0x30]) + b"xyz"
    out = bytearray()
    bzimage.lz4_block_decompress(block, out, 0, len(block))
    assert bytes(out) == b"abcabcabcabcxyz"
    # long literal run and long match (length extension bytes)
    lit = bytes(range(200)) + b"Z" * 100
    block = (bytes([0xFF, 255, len(lit) - 15 - 255]) + lit + b"\x01\x00" + bytes([255, 10])
             + bytes([0x10]) + b"!")
    out = bytearray()
    bzimage.lz4_block_decompress(block, out, 0, len(block))
    assert bytes(out) == lit + b"Z" * (4 + 15 + 255 + 10) + b"!"
    with pytest.raises(ValueError):
        bzimage.lz4_block_decompress(b"\x10a\x05\x00", bytearray(), 0, 4)  # offset beyond the output


def test_lz4_legacy_frame_with_trailing_size():
    a, b = b"A" * 100, bytes(range(256))
    frame = lz4_legacy([lz4_literal_block(a), lz4_literal_block(b)], len(a) + len(b))
    assert bzimage.lz4_legacy_decompress(frame) == a + b
    assert bzimage.lz4_legacy_decompress(frame, fast=False) == a + b


def _lz4_block_module():
    try:
        import lz4.block
    except ImportError:
        pytest.skip("the lz4 package is not installed (pip install 'jvmkit[fast]' or lz4>=4): "
                    "nothing to check our LZ4 decoder against")
    return lz4.block


def test_our_lz4_decoder_matches_the_lz4_package():
    """Real LZ4 blocks (made by the lz4 package, both of its modes) through our pure-Python decoder
    and through the package's: the same bytes, and the fast path is the one in use."""
    lz4_block = _lz4_block_module()
    import random

    rng = random.Random(20240)
    data = b"".join([
        vmlinux_blob(), rng.randbytes(150_000), b"abc" * 20_000, bytes(70_000),
        b"".join(rng.choice([b"virtio", b"balloon", b"\0\0\0\x01", b"jvmkit "]) for _ in range(40_000)),
        bytes(range(256)) * 400, rng.randbytes(5),
    ])
    for mode in ("default", "high_compression"):
        blocks = [lz4_block.compress(data[i:i + (1 << 16)], mode=mode, store_size=False)
                  for i in range(0, len(data), 1 << 16)]
        frame = lz4_legacy(blocks, len(data))
        theirs = b"".join(lz4_block.decompress(b, uncompressed_size=1 << 16) for b in blocks)
        ours = bzimage.lz4_legacy_decompress(frame, fast=False)
        assert theirs == data and ours == data, mode
        assert bzimage.lz4_block is lz4_block and bzimage.lz4_legacy_decompress(frame) == data
    # a block the package refuses (it decompresses to more than a legacy block may) is decoded by ours
    big = bytes(bzimage.LZ4_LEGACY_BLOCK + 4096)
    assert bzimage.lz4_legacy_decompress(lz4_legacy([lz4_block.compress(big, store_size=False)], len(big))) == big
    with pytest.raises(ValueError, match="corrupt LZ4"):
        bzimage.lz4_legacy_decompress(lz4_legacy([b"\x10a\x05\x00"], 1))  # offset beyond the output


def make_bzimage(payload: bytes, *, setup_sects: int = 2, header: bool = True,
                 version: bytes = b"6.1.0-99-cloud-amd64 (builder) #1 SMP PREEMPT_DYNAMIC") -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    stub = b"\x90" * 77 + b"\x28\xb5\x2f\xfd" + b"junk that is no zstd frame" + b"\x1f\x8b\x08garbage"
    if header:
        setup[0x1F1] = setup_sects
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", setup, 0x206, 0x20F)
        setup[0x400:0x400 + len(version) + 1] = version + b"\0"
        struct.pack_into("<H", setup, 0x20E, 0x400 - 0x200)
        struct.pack_into("<II", setup, 0x248, len(stub), len(payload) + 4)
    return bytes(setup) + stub + payload + struct.pack("<I", 12345) + b"\0" * 100


@pytest.mark.parametrize("fmt", ["zstd", "xz", "gzip", "lz4", "lzma"])
def test_extract_vmlinux_from_header_payload(fmt):
    elf = vmlinux_blob()
    payload = {
        "zstd": lambda d: zstandard.ZstdCompressor(level=3).compress(d),
        "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
        "gzip": gzip.compress,
        "lz4": lambda d: lz4_legacy([lz4_literal_block(d)], len(d)),
        "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    }[fmt](elf)
    image = make_bzimage(payload)
    header = bzimage.bzimage_header(image)
    assert header["protocol"] == 0x20F and header["payload_offset"] == 3 * 512 + 77 + 4 + 26 + 3 + 7
    assert bzimage.payload_candidates(image)[0][:2] == (header["payload_offset"], fmt)
    assert bzimage.extract_vmlinux(image) == (elf, fmt)
    assert bzimage.kernel_release(image) == "6.1.0-99-cloud-amd64"


@pytest.mark.parametrize("fmt", ["zstd", "xz", "gzip"])
def test_extract_vmlinux_by_scanning_without_a_header(fmt):
    """No boot header: the magic scan skips the decoy magics in the stub and finds the real payload."""
    elf = vmlinux_blob()
    payload = {"zstd": zstandard.ZstdCompressor().compress, "gzip": gzip.compress,
               "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ)}[fmt](elf)
    image = make_bzimage(payload, header=False)
    assert bzimage.bzimage_header(image) is None
    assert bzimage.extract_vmlinux(image) == (elf, fmt)


def test_extract_vmlinux_refuses_non_elf_payloads():
    image = make_bzimage(zstandard.ZstdCompressor().compress(b"not an ELF kernel" * 10))
    with pytest.raises(ValueError, match="no compressed ELF kernel"):
        bzimage.extract_vmlinux(image)


def test_kernel_release_from_vmlinux_banner():
    assert bzimage.kernel_release(vmlinux_blob()) == "6.1.0-99-cloud-amd64"
    assert bzimage.kernel_release(b"nothing here") is None


def test_parse_kernel_config():
    text = "# comment\nCONFIG_PVH=y\nCONFIG_VIRTIO_BALLOON=m\n# CONFIG_FOO is not set\nCONFIG_STR=\"a b\"\n"
    assert linux.parse_kernel_config(text) == {"CONFIG_PVH": "y", "CONFIG_VIRTIO_BALLOON": "m",
                                               "CONFIG_FOO": "n", "CONFIG_STR": "a b"}


# ---- modules ---------------------------------------------------------------------------------------------

# The real dependency graph of Debian 12's cloud kernel (from the modules' .modinfo).
REAL_GRAPH = {
    "virtio_pci": ("virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"),
    "virtio_balloon": ("virtio", "virtio_ring"),
    "virtio_net": ("virtio_ring", "virtio", "net_failover"),
    "virtio_rng": ("virtio", "virtio_ring"),
    "qemu_fw_cfg": (),
    "virtio_pci_modern_dev": (), "virtio_pci_legacy_dev": (), "virtio_ring": (), "virtio": (),
    "net_failover": ("failover",), "failover": (), "rng_core": (),
}


def test_module_name():
    assert modules.module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert modules.module_name("virtio_net.ko") == "virtio_net"
    assert modules.module_name("a/b/qemu_fw_cfg.ko.zst") == "qemu_fw_cfg"


def test_plan_modules_dependencies_first():
    plan = modules.plan_modules(modules.GUEST_MODULES, REAL_GRAPH.get, {"rng_core"}, modules.OPTIONAL_MODULES)
    order = list(plan.order)
    assert order == ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio", "virtio_pci",
                     "virtio_balloon", "failover", "net_failover", "virtio_net", "virtio_rng", "qemu_fw_cfg"]
    for name, deps in REAL_GRAPH.items():
        if name in order:
            assert all(order.index(d) < order.index(name) for d in deps if d in order)
    assert plan.builtin == () and plan.missing == ()


def test_plan_modules_builtin_optional_missing_and_cycles():
    graph = dict(REAL_GRAPH)
    del graph["virtio_rng"]
    plan = modules.plan_modules(modules.GUEST_MODULES, graph.get, {"virtio_pci", "qemu_fw_cfg", "virtio"},
                                modules.OPTIONAL_MODULES)
    assert "virtio_pci" not in plan.order and "virtio" not in plan.order
    assert plan.builtin == ("virtio_pci", "virtio", "qemu_fw_cfg") and plan.missing == ("virtio_rng",)
    del graph["failover"]
    with pytest.raises(JvmkitError, match="no module failover .needed by net_failover."):
        modules.plan_modules(["virtio_net"], graph.get, set())
    with pytest.raises(JvmkitError, match="cycle: a -> b -> a"):
        modules.plan_modules(["a"], {"a": ("b",), "b": ("a",)}.get, set())


def test_parse_modules_dep_and_builtin():
    dep = ("kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n"
           "kernel/net/core/failover.ko.xz:\n")
    parsed = modules.parse_modules_dep(dep)
    assert parsed["virtio_net"] == ("kernel/drivers/net/virtio_net.ko.xz", ("net_failover", "failover"))
    assert parsed["failover"][1] == ()
    assert modules.parse_modules_builtin("kernel/crypto/rng.ko\nkernel/drivers/char/hw_random/rng-core.ko\n") == \
        {"rng", "rng_core"}


def test_module_tree_reads_modinfo_and_decompresses(tmp_path):
    root = tmp_path / "lib/modules/6.1.0-99-cloud-amd64"
    (root / "kernel/drivers/virtio").mkdir(parents=True)
    (root / "kernel/drivers/virtio/virtio.ko.xz").write_bytes(lzma.compress(ko_blob("virtio", "")))
    (root / "kernel/drivers/virtio/virtio_balloon.ko.zst").write_bytes(
        zstandard.ZstdCompressor().compress(ko_blob("virtio_balloon", "virtio")))
    (root / "modules.builtin").write_text("kernel/drivers/virtio/virtio_ring.ko\n")
    tree = modules.ModuleTree(root)
    assert tree.deps_of("virtio_balloon") == ("virtio",) and tree.deps_of("nope") is None
    assert tree.data("virtio")[:4] == b"\x7fELF" and "virtio_ring" in tree.builtin
    (root / "modules.dep").write_text("kernel/drivers/virtio/virtio_balloon.ko.zst: kernel/x/other.ko\n")
    assert modules.ModuleTree(root).deps_of("virtio_balloon") == ("other",)


# ---- choosing packages -----------------------------------------------------------------------------------

def index(suite: str, text: str) -> debian.Index:
    return debian.Index(repo=debian.Repo("http://127.0.0.1:1/debian", suite), release=debian.Release({}, {}),
                        packages=tuple(debian.parse_packages(text, base_uri="http://127.0.0.1:1/debian", suite=suite)),
                        signature="verified", fetched=0, from_cache=True)


def stanza(name: str, version: str, depends: str = "") -> str:
    return (f"Package: {name}\nVersion: {version}\nDepends: {depends}\nFilename: pool/{name}.deb\nSize: 1\n"
            f"SHA256: {'a' * 64}\n")


def test_choose_kernel_package_follows_the_newest_metapackage():
    main = index("bookworm", "\n".join([
        stanza("linux-image-cloud-amd64", "6.1.176-1", "linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)"),
        stanza("linux-image-6.1.0-50-cloud-amd64", "6.1.176-1"),
        stanza("linux-image-6.1.0-50-cloud-amd64-unsigned", "6.1.176-1"),
    ]))
    security = index("bookworm-security", "\n".join([
        stanza("linux-image-cloud-amd64", "6.1.192-2", "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"),
        stanza("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"),
        stanza("linux-image-6.1.0-57-cloud-amd64", "6.1.193-1"),  # not (yet) what the metapackage picks
    ]))
    archive = debian.Archive("bookworm", [main, security])
    chosen = linux.choose_kernel_package(archive)
    assert (chosen.name, chosen.version, chosen.suite) == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2",
                                                           "bookworm-security")
    # without the metapackage: the newest versioned cloud image
    no_meta = debian.Archive("bookworm", [index("bookworm", "\n".join([
        stanza("linux-image-6.1.0-50-cloud-amd64", "6.1.176-1"), stanza("linux-image-6.1.0-9-cloud-amd64", "6.1.27-1"),
        stanza("linux-image-6.1.0-50-amd64", "6.1.199-1")]))])
    assert linux.choose_kernel_package(no_meta).name == "linux-image-6.1.0-50-cloud-amd64"
    with pytest.raises(JvmkitError, match="--suite"):
        linux.choose_kernel_package(debian.Archive("sid", [index("sid", stanza("busybox-static", "1"))]))


# ---- the whole pull against a fake archive ---------------------------------------------------------------

def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += (name.encode().ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
                + str(len(data)).encode().ljust(10) + b"`\n") + data
        if len(data) % 2:
            out += b"\n"
    return bytes(out)


def make_deb(files: dict[str, bytes], name: str, version: str, comp: str = "xz") -> bytes:
    def tar(entries: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for path, data in entries.items():
                info = tarfile.TarInfo("./" + path)
                info.size, info.mode = len(data), 0o755 if path.endswith("busybox") else 0o644
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    z = (lambda d: lzma.compress(d)) if comp == "xz" else zstandard.ZstdCompressor().compress
    control = f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n".encode()
    return ar_archive([("debian-binary", b"2.0\n"), (f"control.tar.{comp}", z(tar({"control": control}))),
                       (f"data.tar.{comp}", z(tar(files)))])


RELEASE = "6.1.0-99-cloud-amd64"


def kernel_deb() -> bytes:
    mods = f"lib/modules/{RELEASE}/kernel/drivers"
    files = {
        f"boot/vmlinuz-{RELEASE}": make_bzimage(zstandard.ZstdCompressor().compress(vmlinux_blob())),
        f"boot/config-{RELEASE}": b"CONFIG_PVH=y\nCONFIG_RD_ZSTD=y\nCONFIG_VIRTIO_BALLOON=m\n"
                                  b"# CONFIG_VIRTIO_CONSOLE is not set\nCONFIG_FW_CFG_SYSFS=y\n",
        f"lib/modules/{RELEASE}/modules.builtin": b"kernel/drivers/firmware/qemu_fw_cfg.ko\n",
        f"{mods}/virtio/virtio.ko": ko_blob("virtio", ""),
        f"{mods}/virtio/virtio_ring.ko": ko_blob("virtio_ring", ""),
        f"{mods}/virtio/virtio_pci.ko": ko_blob("virtio_pci", "virtio_ring,virtio"),
        f"{mods}/virtio/virtio_balloon.ko": ko_blob("virtio_balloon", "virtio,virtio_ring"),
        f"{mods}/net/virtio_net.ko.xz": lzma.compress(ko_blob("virtio_net", "virtio_ring,virtio,net_failover")),
        f"{mods}/net/net_failover.ko": ko_blob("net_failover", "failover"),
        f"lib/modules/{RELEASE}/kernel/net/core/failover.ko": ko_blob("failover", ""),
        f"{mods}/char/hw_random/virtio-rng.ko.zst": zstandard.ZstdCompressor().compress(
            ko_blob("virtio_rng", "virtio,virtio_ring")),
        f"{mods}/block/virtio_blk.ko": ko_blob("virtio_blk", "virtio"),
        "usr/share/doc/x/changelog.gz": gzip.compress(b"log", mtime=0),
    }
    return make_deb(files, f"linux-image-{RELEASE}", "6.1.999-1")


def busybox_deb(version: str = "1:1.36.1-9") -> bytes:
    return make_deb({"bin/busybox": make_elf(body=b"busybox!"), "usr/share/doc/busybox-static/README": b"x"},
                    "busybox-static", version, comp="zst")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with serve_directory(root) as (base, seen):
        yield root, base, seen


def publish(root: Path, suite: str, debs: list[tuple[str, str, bytes, str]]) -> None:
    stanzas = []
    for name, version, data, depends in debs:
        filename = f"pool/main/{name}_{version.split(':')[-1]}_amd64.deb"
        (root / filename).parent.mkdir(parents=True, exist_ok=True)
        (root / filename).write_bytes(data)
        stanzas.append(f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
                       + (f"Depends: {depends}\n" if depends else "")
                       + f"Filename: {filename}\nSize: {len(data)}\nSHA256: {sha(data)}\n")
    text = "\n".join(stanzas).encode()
    gz = gzip.compress(text)
    binary = root / "dists" / suite / "main/binary-amd64"
    binary.mkdir(parents=True, exist_ok=True)
    (binary / "Packages.gz").write_bytes(gz)
    (root / "dists" / suite / "Release").write_text(
        f"Origin: Debian\nSuite: {suite}\nCodename: {suite}\nSHA256:\n {sha(gz)} {len(gz)} main/binary-amd64/Packages.gz\n")


@pytest.fixture
def fake_mirror(served):
    root, url, seen = served
    kdeb = kernel_deb()
    publish(root, "bookworm", [
        ("linux-image-cloud-amd64", "6.1.999-1", b"meta", f"linux-image-{RELEASE} (= 6.1.999-1)"),
        (f"linux-image-{RELEASE}", "6.1.999-1", kdeb, ""),
        ("linux-image-6.1.0-1-cloud-amd64", "6.1.1-1", b"old", ""),
        ("busybox-static", "1:1.36.1-9", busybox_deb(), ""),
    ])
    return url, seen


def test_pull_linux_from_a_fake_archive(fake_mirror, isolated_cache):
    url, seen = fake_mirror
    kernel = linux.pull_linux(suite="bookworm", mirror=url)
    assert kernel.version == RELEASE and kernel.package == f"linux-image-{RELEASE}"
    assert kernel.debian_version == "6.1.999-1" and kernel.source == "debian" and kernel.suite == "bookworm"
    assert kernel.vmlinux.read_bytes() == vmlinux_blob() and kernel.pvh and kernel.pvh_entry == 0x1000850
    assert kernel.vmlinux_sha256 == sha(vmlinux_blob())
    assert kernel.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"
    assert kernel.busybox.read_bytes() == make_elf(body=b"busybox!") and os.access(kernel.busybox, os.X_OK)
    assert [m.name for m in kernel.modules] == ["virtio_ring.ko", "virtio.ko", "virtio_pci.ko", "virtio_balloon.ko",
                                                "failover.ko", "net_failover.ko", "virtio_net.ko", "virtio_rng.ko"]
    assert all(m.read_bytes()[:4] == b"\x7fELF" for m in kernel.modules)  # .xz/.zst decompressed
    assert kernel.builtin == ("qemu_fw_cfg",)
    assert (kernel.path / "modules.order").read_text().split() == [m.name for m in kernel.modules]
    assert not (kernel.path / ".unpack").exists() and not list(kernel.path.glob("modules/virtio_blk*"))
    assert kernel.config["CONFIG_PVH"] == "y" and kernel.config["CONFIG_VIRTIO_CONSOLE"] == "n"
    assert kernel.config["CONFIG_PAGE_REPORTING"] is None  # not in this config at all
    meta = json.loads((kernel.path / "kernel.json").read_text())
    assert meta["debs"][f"linux-image-{RELEASE}"]["sha256"] == sha(kernel_deb())
    assert meta["payload_compression"] == "zstd" and meta["sha256"] == kernel.vmlinux_sha256
    info = kernel.describe()
    assert info["sha256"] == kernel.vmlinux_sha256 and info["version"] == RELEASE and info["path"] == str(kernel.path)
    assert json.dumps(info)
    assert kernel.path.parent == Path(os.environ["JVMKIT_CACHE"]) / "kernels" / "linux"

    # pulling again reuses everything: no .deb downloads, no index downloads
    n = len(seen)
    again = linux.pull_linux(suite="bookworm", mirror=url)
    assert again.path == kernel.path and len(seen) == n

    rows = store.list_kernels()
    assert [(r["target"], r["version"], r["sha256"]) for r in rows] == [("linux", RELEASE, kernel.vmlinux_sha256)]
    assert rows[0]["size"] > 0 and rows[0]["path"] == str(kernel.path)
    assert linux.cached_linux_kernel().path == kernel.path
    assert linux.cached_linux_kernel("bookworm").path == kernel.path
    assert linux.cached_linux_kernel("trixie") is None
    assert linux.ensure_linux_kernel().path == kernel.path and len(seen) == n
    assert linux.resolve_linux_kernel(None).path == kernel.path
    assert linux.resolve_linux_kernel(kernel.path).path == kernel.path


def test_pull_offline_uses_the_cached_kernel_or_fails_clearly(fake_mirror, isolated_cache, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/debian"
    with pytest.raises(debian.ArchiveUnavailable, match="not reachable.*jvmkit kernel import"):
        linux.pull_linux(suite="bookworm", mirror=dead)
    url, _ = fake_mirror
    kernel = linux.pull_linux(suite="bookworm", mirror=url)
    assert linux.pull_linux(suite="bookworm", mirror=dead).path == kernel.path
    assert "using the cached kernel" in isolated_cache.stream.getvalue()


def test_import_linux_bzimage_and_vmlinux(fake_mirror, tmp_path, isolated_cache):
    url, _ = fake_mirror
    image = tmp_path / "bzImage"
    image.write_bytes(make_bzimage(gzip.compress(vmlinux_blob())))
    busybox = tmp_path / "busybox"
    busybox.write_bytes(make_elf(body=b"my busybox"))
    kernel = linux.import_linux(image, busybox=busybox)
    assert kernel.source == "import" and kernel.version == RELEASE and kernel.modules == ()
    assert kernel.vmlinux.read_bytes() == vmlinux_blob() and kernel.busybox.read_bytes() == busybox.read_bytes()
    assert "no sign of built-in" in isolated_cache.stream.getvalue()  # a modular kernel: warned
    assert linux.cached_linux_kernel().path == kernel.path  # the most recently added kernel
    assert linux.resolve_linux_kernel(image).path == kernel.path  # same digest: same entry

    # a plain vmlinux with the drivers built in; busybox from Debian's archive (the fake mirror)
    builtin = b"".join(b"\0" + n.encode() + b"\0" for n in modules.DRIVER_NAMES.values())
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(make_elf(notes=PVH_NOTES, body=BANNER.replace(b"-99-", b"-77-") + builtin))
    k2 = linux.import_linux(vmlinux, mirror=url, suite="bookworm")
    assert k2.version == "6.1.0-77-cloud-amd64" and k2.vmlinuz is None
    assert set(k2.builtin) == set(modules.GUEST_MODULES)
    assert k2.busybox.read_bytes() == make_elf(body=b"busybox!")
    assert {r["id"] for r in store.list_kernels()} == {kernel.id, k2.id}

    no_pvh = tmp_path / "nopvh"
    no_pvh.write_bytes(vmlinux_blob(with_pvh=False))
    with pytest.raises(JvmkitError, match="PVH"):
        linux.import_linux(no_pvh, busybox=busybox)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(JvmkitError, match="not a Linux kernel"):
        linux.import_linux(junk, busybox=busybox)
    with pytest.raises(JvmkitError, match="does not exist"):
        linux.import_linux(tmp_path / "missing")


def test_kernel_entry_layout_and_targets():
    assert store.KERNEL_TARGETS == ("linux", "osv")
    path, built = store.kernel_entry("osv", "v0.1", lambda tmp: (tmp / "kernel.json").write_text(
        json.dumps({"target": "osv", "version": "v0.1", "sha256": "ab" * 32})))
    assert built and path == Path(os.environ["JVMKIT_CACHE"]) / "kernels" / "osv" / "v0.1"
    assert [(r["target"], r["version"]) for r in store.list_kernels()] == [("osv", "v0.1")]
    with pytest.raises(JvmkitError):
        store.kernel_entry("windows", "x", lambda tmp: None)


# ---- the real thing (opt-in) ----------------------------------------------------------------------------

@pytest.mark.network
@pytest.mark.vm
@pytest.mark.skipif(os.environ.get("JVMKIT_TEST_NETWORK") != "1",
                    reason="set JVMKIT_TEST_NETWORK=1 to pull the real kernel from the configured Debian mirror")
def test_real_pull_and_boot_to_panic():
    kernel = linux.pull_linux()
    assert kernel.pvh and kernel.vmlinux.read_bytes()[:4] == b"\x7fELF"
    names = [m.name for m in kernel.modules]
    for needed in ("virtio_balloon", "virtio_net", "qemu_fw_cfg", "virtio_pci"):
        assert f"{needed}.ko" in names or needed in kernel.builtin
    assert elfs.is_static_elf(kernel.busybox.read_bytes())
    assert kernel.config["CONFIG_PVH"] == "y"
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed: pulled, not booted")
    start = time.monotonic()
    proc = subprocess.run([qemu, "-accel", "tcg", "-M", "pc", "-m", "256M", "-nodefaults", "-no-user-config",
                           "-display", "none", "-serial", "stdio", "-kernel", str(kernel.vmlinux),
                           "-append", "console=ttyS0 panic=-1", "-no-reboot"],
                          capture_output=True, text=True, timeout=180)
    log = proc.stdout
    assert f"Linux version {kernel.version}" in log
    assert "Kernel panic" in log and "Unable to mount root" in log, log[-2000:]
    assert time.monotonic() - start < 120
