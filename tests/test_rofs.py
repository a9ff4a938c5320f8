"""ROFS writer and reader: round trips, layout against the format OSv reads, determinism, limits."""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import struct
import tracemalloc
from pathlib import Path

import pytest

from jvmkit.errors import JvmkitError
from jvmkit.packager.targets.osv import rofs
from jvmkit.packager.targets.osv.readers import read_rofs
from jvmkit.packager.targets.osv.rofs import BLOCK_SIZE, MAGIC, RofsBuilder

SIZES = [0, 1, 511, 512, 513, 3 * 1024 * 1024 + 17]


def _data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1000003 + size).randbytes(size)


def _image(builder: RofsBuilder) -> bytes:
    buf = io.BytesIO()
    n = builder.write(buf)
    assert n == len(buf.getvalue()) == builder.size()
    return buf.getvalue()


def _open(data: bytes):
    return read_rofs(io.BytesIO(data))


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("from_host", [False, True], ids=["bytes", "host-file"])
def test_file_sizes_round_trip(tmp_path: Path, from_host: bool) -> None:
    b = RofsBuilder()
    for size in SIZES:
        content = _data(size)
        if from_host:
            src = tmp_path / f"src{size}"
            src.write_bytes(content)
            b.add_file(f"/d/f{size}", src, mode=0o640)
        else:
            b.add_file(f"/d/f{size}", content, mode=0o640)
    data = _image(b)
    assert len(data) % BLOCK_SIZE == 0
    img = _open(data)
    for size in SIZES:
        path = f"/d/f{size}"
        assert img.read_bytes(path) == _data(size)
        inode = img.lookup(path)
        assert inode.count == size and stat.S_ISREG(inode.mode) and inode.mode & 0o7777 == 0o640
        # data really sits at block data_offset of the image, as OSv reads it
        start = inode.data_offset * BLOCK_SIZE
        assert data[start:start + size] == _data(size)
    assert img.listdir("/d") == sorted(f"f{s}" for s in SIZES)


def test_file_data_is_block_aligned_and_padded() -> None:
    b = RofsBuilder()
    b.add_file("/a", b"x" * 513)
    b.add_file("/b", b"y")
    data = _image(b)
    img = _open(data)
    a, bb = img.lookup("/a"), img.lookup("/b")
    assert a.data_offset == 1 and bb.data_offset == 3  # 513 bytes take two blocks
    assert data[512 + 513:3 * 512] == b"\0" * (1024 - 513)
    assert data[3 * 512 + 1:4 * 512] == b"\0" * 511


def _make_tree(root: Path, n_files: int = 300) -> None:
    rng = random.Random(42)
    dirs = [root]
    for i in range(40):
        d = rng.choice(dirs) / f"dir{i:02d}"
        d.mkdir()
        dirs.append(d)
    (root / "empty-dir").mkdir()
    for i in range(n_files):
        f = rng.choice(dirs) / f"file{i:03d}.{rng.choice(['so', 'jar', 'txt', 'class'])}"
        f.write_bytes(rng.randbytes(rng.choice([0, 1, 100, 511, 512, 513, 4096, 70000])))
        os.chmod(f, rng.choice([0o644, 0o755, 0o600, 0o700]))
    (root / "dir00" / "rel-link").symlink_to("../file000.so")
    (root / "abs-link").symlink_to("/proc/mounts")
    (root / "dangling").symlink_to("does/not/exist")
    (root / "dir-link").symlink_to("dir01")


def test_add_tree_round_trip(tmp_path: Path) -> None:
    host = tmp_path / "tree"
    host.mkdir()
    _make_tree(host)
    b = RofsBuilder()
    b.add_tree(host, "/opt/app")
    img = _open(_image(b))
    entries = img.entries()
    assert img.listdir("/") == ["opt"] and img.listdir("/opt") == ["app"]
    seen = set()
    for dirpath, dirnames, filenames in os.walk(host):
        rel = os.path.relpath(dirpath, host)
        guest = "/opt/app" if rel == "." else f"/opt/app/{rel}"
        names = sorted(dirnames + filenames, key=os.fsencode)
        assert img.listdir(guest) == names
        assert entries[guest].kind == "dir" and entries[guest].mode == 0o755
        seen.add(guest)
        for name in names:
            hp, gp = os.path.join(dirpath, name), f"{guest}/{name}"
            seen.add(gp)
            st = os.lstat(hp)
            if stat.S_ISLNK(st.st_mode):
                assert entries[gp].kind == "symlink"
                assert img.readlink(gp) == os.readlink(hp) == entries[gp].target
            elif stat.S_ISREG(st.st_mode):
                assert entries[gp].kind == "file" and entries[gp].size == st.st_size
                assert entries[gp].mode == (0o755 if st.st_mode & 0o111 else 0o644)
                assert img.read_bytes(gp) == Path(hp).read_bytes()
    assert seen == set(entries) - {"/", "/opt"}
    # symlinks are stored, never followed
    assert entries["/opt/app/dir-link"].kind == "symlink"


def test_symlinks_and_dirs(tmp_path: Path) -> None:
    b = RofsBuilder()
    b.add_symlink("/usr/bin/java", "/jvm/bin/java")
    b.add_symlink("/etc/mnttab", "/proc/mounts")
    b.add_dir("/tmp", mode=0o1777)
    b.add_dir("/proc")
    img = _open(_image(b))
    assert img.readlink("/usr/bin/java") == "/jvm/bin/java"
    assert img.readlink("/etc/mnttab") == "/proc/mounts"
    assert img.lookup("/tmp").mode == stat.S_IFDIR | 0o1777
    assert img.listdir("/proc") == []
    assert img.lookup("/usr/bin/java").count == 1
    assert img.listdir("/") == ["etc", "proc", "tmp", "usr"]


def test_deep_tree() -> None:
    b = RofsBuilder()
    deep = "/" + "/".join(f"d{i}" for i in range(400))
    b.add_file(deep + "/leaf", b"bottom")
    b.add_symlink(deep + "/up", "../" * 400)
    img = _open(_image(b))
    assert img.read_bytes(deep + "/leaf") == b"bottom"
    assert img.readlink(deep + "/up") == "../" * 400
    assert len(list(img.walk())) == 400 + 3


def test_many_entries() -> None:
    b = RofsBuilder()
    for i in range(4000):
        b.add_file(f"/flat/n{i}", str(i).encode())
    for i in range(2000):
        b.add_file(f"/nested/{i % 37}/{i}", b"")
    img = _open(_image(b))
    names = img.listdir("/flat")
    assert names == sorted(f"n{i}" for i in range(4000))
    assert img.read_bytes("/flat/n3999") == b"3999" and img.read_bytes("/flat/n0") == b"0"
    assert len(img.listdir("/nested")) == 37
    assert sum(1 for e in img.walk() if e.kind == "file") == 6000
    assert b.counts() == {"dir": 1 + 1 + 1 + 37, "file": 6000, "symlink": 0}


def test_names_sorted_by_bytes_and_non_utf8_names(tmp_path: Path) -> None:
    b = RofsBuilder()
    for name in ["b", "B", "_", "a", "é", "Z", "a.b", "a-b"]:
        b.add_file(f"/{name}", name.encode())
    host = tmp_path / "h"
    host.mkdir()
    (Path(os.fsdecode(os.fsencode(str(host)) + b"/\xff.bin"))).write_bytes(b"raw")
    b.add_tree(host, "/raw")
    img = _open(_image(b))
    assert img.listdir("/") == sorted(["b", "B", "_", "a", "é", "Z", "a.b", "a-b", "raw"], key=str.encode)
    assert img.read_bytes(b"/raw/\xff.bin") == b"raw"


# -- determinism and streaming ---------------------------------------------------------------


def test_deterministic_whatever_the_order(tmp_path: Path) -> None:
    host = tmp_path / "tree"
    host.mkdir()
    _make_tree(host, 120)

    def build(reverse: bool) -> RofsBuilder:
        b = RofsBuilder()
        items = [("f", "/x/one", b"1"), ("l", "/x/link", "one"), ("f", "/a", b"")]
        for kind, path, arg in (reversed(items) if reverse else items):
            b.add_file(path, arg) if kind == "f" else b.add_symlink(path, arg)
        b.add_tree(host, "/t")
        return b

    first, second = _image(build(False)), _image(build(True))
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    out = tmp_path / "img.rofs"
    assert build(False).write(out) == len(first)
    assert out.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(24 * 1024 * 1024)
        f.seek(12345)
        f.write(b"marker")
    b = RofsBuilder()
    b.add_file("/big", big)
    tracemalloc.start()
    try:
        with open(tmp_path / "out", "wb") as out:
            b.write(out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"writer peaked at {peak} bytes for a 24 MiB file"
    with read_rofs(tmp_path / "out") as img:
        assert img.lookup("/big").count == 24 * 1024 * 1024
        chunks = list(img.iter_chunks("/big"))
        assert b"".join(chunks)[12345:12351] == b"marker"


def test_source_changing_size_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.write_bytes(b"abc")
    b = RofsBuilder()
    b.add_file("/s", src)
    src.write_bytes(b"abcdef")
    dest = tmp_path / "out.rofs"
    with pytest.raises(JvmkitError, match="changed size"):
        b.write(dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == [src]


# -- the format as OSv reads it --------------------------------------------------------------


def test_exact_layout_of_a_tiny_image() -> None:
    """Bytes computed by hand from fs/rofs/rofs.hh and gen-rofs-img.py's description."""
    b = RofsBuilder()
    b.add_file("/a", b"x", mode=0o644)
    b.add_symlink("/l", "a")
    data = _image(b)
    sb = struct.pack("<8Q", 0xDEADBEAD, 1, 512, 2, 1, 2, 1, 3).ljust(512, b"\0")
    file_block = b"x".ljust(512, b"\0")
    table = (struct.pack("<QH", 2, 1) + b"a" + struct.pack("<QH", 3, 1) + b"l"   # dir entries
             + struct.pack("<H", 1) + b"a"                                          # symlinks
             + struct.pack("<4Q", 0o040755, 1, 0, 2)                                # root dir
             + struct.pack("<4Q", 0o100644, 2, 1, 1)                                # /a at block 1
             + struct.pack("<4Q", 0o120777, 3, 0, 1))                               # /l -> link 0
    assert data == sb + file_block + table.ljust(512, b"\0")


def _foreign_image() -> bytes:
    """An image laid out the way OSv's gen-rofs-img.py lays it out (depth-first, a directory's
    entries appended after its subdirectories', type-only modes, unsorted names)."""
    data = [b"hello".ljust(512, b"\0"), b"inner!".ljust(512, b"\0")]  # blocks 1, 2
    # inodes: 1 root, 2 'zz' file, 3 'sub' dir, 4 'sub/in' file, 5 'sub/ln' symlink
    entries = [(4, b"in"), (5, b"ln"), (2, b"zz"), (3, b"sub")]  # sub's entries first (post-order)
    inodes = [(0x4000, 1, 2, 2), (0x8000, 2, 1, 5), (0x4000, 3, 0, 2), (0x8000, 4, 2, 6), (0xA000, 5, 0, 1)]
    table = b"".join(struct.pack("<QH", n, len(name)) + name for n, name in entries)
    table += struct.pack("<H", 5) + b"../zz"
    table += b"".join(struct.pack("<4Q", *i) for i in inodes)
    sb = struct.pack("<8Q", MAGIC, 1, 512, 3, 1, len(entries), 1, len(inodes)).ljust(512, b"\0")
    return sb + b"".join(data) + table.ljust(512, b"\0")


def test_reader_follows_osv_not_the_writer() -> None:
    img = _open(_foreign_image())
    assert img.listdir("/") == ["zz", "sub"]  # on-disk order, as readdir gives it
    assert img.read_bytes("/zz") == b"hello"
    assert img.read_bytes("/sub/in") == b"inner!"
    assert img.readlink("/sub/ln") == "../zz"
    assert [e.path for e in img.walk()] == ["/", "/zz", "/sub", "/sub/in", "/sub/ln"]
    assert img.entries()["/zz"].mode == 0  # OSv's own images carry no permission bits


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: _patched(d, 0, "<Q", 0x12345678), "magic"),
    (lambda d: _patched(d, 8, "<Q", 2), "version"),
    (lambda d: _patched(d, 16, "<Q", 4096), "block size"),
    (lambda d: _patched(d, 32, "<Q", 0), "block count is 0"),
    (lambda d: d[:-512], "truncated"),
    (lambda d: _patched(d, 512 * 3 + 11 + 8, "<Q", 9), "says it is inode 9"),  # root's number field
])
def test_reader_refuses_what_osv_would_not_mount(mutate, message) -> None:
    b = RofsBuilder()
    b.add_file("/a", b"x" * 600)
    data = _image(b)
    assert data[512 * 3:512 * 3 + 8] == struct.pack("<QH", 2, 1)[:8]  # structure info at block 3
    with pytest.raises(JvmkitError, match=message):
        _open(mutate(data))


def test_reader_checks_directory_bounds() -> None:
    data = bytearray(_foreign_image())
    inode_table = 512 * 3 + sum(10 + len(n) for n in (b"in", b"ln", b"zz", b"sub")) + 7
    struct.pack_into("<Q", data, inode_table + 24, 99)  # root claims 99 children
    with pytest.raises(JvmkitError, match="past the directory entries"):
        _open(bytes(data))


# -- what OSv can't store --------------------------------------------------------------------


@pytest.mark.parametrize("path, message", [
    ("/" + "n" * 256, "at most 255 bytes"),
    ("/a/../b", "'..'"),
    ("/a/./b", "'.'"),
    ("/a\0b", "NUL"),
    ("/" + "/".join(["d" * 200] * 21), "at most 4095 bytes"),
])
def test_refuses_names_osv_cannot_store(path: str, message: str) -> None:
    with pytest.raises(JvmkitError, match=message):
        RofsBuilder().add_file(path, b"")


def test_refuses_conflicts_and_bad_inputs(tmp_path: Path) -> None:
    b = RofsBuilder()
    b.add_file("/a/f", b"1")
    with pytest.raises(JvmkitError, match="added twice"):
        b.add_file("/a/f", b"2")
    with pytest.raises(JvmkitError, match="/a/f.*already a file"):
        b.add_file("/a/f/g", b"")
    with pytest.raises(JvmkitError, match="root"):
        b.add_file("/", b"")
    with pytest.raises(JvmkitError, match="empty target"):
        b.add_symlink("/l", "")
    with pytest.raises(JvmkitError, match="4095"):
        b.add_symlink("/l", "x" * 4096)
    with pytest.raises(JvmkitError, match="mode"):
        b.add_file("/m", b"", mode=0o10000)
    with pytest.raises(JvmkitError, match="missing"):
        b.add_file("/h", tmp_path / "missing")
    tree = tmp_path / "t"
    tree.mkdir()
    os.mkfifo(tree / "fifo")
    with pytest.raises(JvmkitError, match="fifo.*not a file, directory or symlink"):
        RofsBuilder().add_tree(tree, "/x")
    long_name = tmp_path / "l"
    long_name.mkdir()
    (long_name / ("y" * 255)).write_bytes(b"")  # exactly at the limit is fine
    RofsBuilder().add_tree(long_name, "/")


def test_empty_image_is_mountable() -> None:
    data = _image(RofsBuilder())
    assert len(data) == 1024  # super block + one structure block holding the root inode
    img = _open(data)
    assert img.listdir("/") == [] and [e.path for e in img.walk()] == ["/"]


def test_writer_module_does_not_keep_paths_as_content(tmp_path: Path) -> None:
    """Host paths arrive as bytes from os.scandir: they must be read, not stored as content."""
    host = tmp_path / "t"
    host.mkdir()
    (host / "f").write_bytes(b"content!")
    b = RofsBuilder()
    b.add_tree(host, "/")
    assert _open(_image(b)).read_bytes("/f") == b"content!"
    assert rofs.PATH_MAX == 4095 and rofs.NAME_MAX == 255
