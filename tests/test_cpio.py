"""The newc cpio writer: format, determinism, device nodes, and the kernel's own reader's view."""

import hashlib
import io
import shutil
import stat
import subprocess

import pytest

from jvmkit.packager.targets.linux.cpio import CpioWriter
from jvmkit.packager.targets.linux.readers import read_cpio


def build(tmp_path, mtime=0):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True, exist_ok=True)
    (tree / "a.txt").write_bytes(b"hello")
    (tree / "sub" / "b.bin").write_bytes(bytes(range(256)) * 3)
    exe = tree / "run.sh"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    buf = io.BytesIO()
    w = CpioWriter(buf, mtime=mtime)
    w.add_dir("dev")
    w.add_char_device("dev/console", 5, 1)
    w.add_bytes("init", b"#!/bin/sh\necho hi\n", mode=0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_tree(tree, "/data")
    w.close()
    return buf.getvalue()


def test_round_trip_and_modes(tmp_path):
    data = build(tmp_path)
    assert len(data) % 512 == 0
    entries = {e["name"]: e for e in read_cpio(data)}
    assert stat.S_ISCHR(entries["dev/console"]["mode"]) and entries["dev/console"]["rdev"] == (5, 1)
    assert entries["init"]["data"] == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(entries["init"]["mode"]) == 0o755
    assert stat.S_ISLNK(entries["bin/sh"]["mode"]) and entries["bin/sh"]["data"] == b"busybox"
    assert entries["data/sub/b.bin"]["data"] == bytes(range(256)) * 3
    assert stat.S_IMODE(entries["data/run.sh"]["mode"]) == 0o755
    assert stat.S_IMODE(entries["data/a.txt"]["mode"]) == 0o644
    assert [n for n in entries if n.startswith("data/")] == ["data/a.txt", "data/run.sh", "data/sub", "data/sub/b.bin"]


def test_deterministic_and_mtime(tmp_path):
    first = build(tmp_path, mtime=1234)
    second = build(tmp_path, mtime=1234)
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    assert all(e["mtime"] == 1234 for e in read_cpio(first))
    assert build(tmp_path, mtime=0) != first


def test_refuses_parent_paths():
    w = CpioWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.add_bytes("../etc/passwd", b"x")


@pytest.mark.skipif(not shutil.which("cpio"), reason="GNU cpio is not installed (it only cross-checks the format)")
def test_gnu_cpio_reads_it(tmp_path):
    data = build(tmp_path)
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True).stdout.decode()
    assert "data/sub/b.bin" in listing and "dev/console" in listing
