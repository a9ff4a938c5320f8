"""Property-based tests (hypothesis) of every reader of image formats: hostile or corrupt cpio,
ROFS, MBR and OSv command lines give a result or one `UsageError` (exit status 2), never another
exception, a hang (each example has a deadline) or an allocation the input does not hold.

Inputs are real archives written by jvmkit's own writers, then mutated (bytes overwritten,
truncated, 64-bit fields set to extreme values), and plain random bytes. No VM.
"""

from __future__ import annotations

import io
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jvmkit.errors import UsageError
from jvmkit.packager.targets.linux.cpio import CpioWriter
from jvmkit.packager.targets.linux.readers import read_cpio
from jvmkit.packager.targets.osv import disk as osv_disk
from jvmkit.packager.targets.osv.readers import (parse_cmdline, read_cmdline, read_disk_rofs, read_partitions,
                                                 read_rofs)
from jvmkit.packager.targets.osv.rofs import RofsBuilder

FUZZ = settings(max_examples=1000, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
EXTREMES = (0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1)


def _cpio() -> bytes:
    out = io.BytesIO()
    cpio = CpioWriter(out, mtime=1)
    cpio.add_dir("bin")
    cpio.add_bytes("init", b"#!/bin/sh\necho hi\n", mode=0o755)
    cpio.add_bytes("bin/x", b"x" * 300)
    cpio.add_char_device("dev-console", 5, 1)
    cpio.close()
    return out.getvalue()


def _rofs() -> bytes:
    rofs = RofsBuilder()
    rofs.add_dir("/etc")
    rofs.add_file("/etc/hosts", b"127.0.0.1 localhost\n")
    rofs.add_file("/app/app.jar", b"PK" + b"\0" * 5000)
    rofs.add_symlink("/etc/mnttab", "/proc/mounts")
    out = io.BytesIO()
    rofs.write(out)
    return out.getvalue()


CPIO, ROFS = _cpio(), _rofs()


def _disk() -> bytes:
    rofs = RofsBuilder()
    rofs.add_file("/hello", b"hello")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.img"
        osv_disk.write_rofs_disk(rofs, path)
        return path.read_bytes()


DISK = _disk()


def mutated(seed: bytes, *, words: bool = False):
    """Strategy: `seed` with bytes overwritten, optionally extreme 64-bit words written over its
    first 4 KiB (the headers), and optionally truncated."""
    n = len(seed)
    edits = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), max_size=12)
    wide = st.lists(st.tuples(st.integers(0, min(n, 4096) - 8), st.sampled_from(EXTREMES)), max_size=4 if words else 0)
    cut = st.one_of(st.just(n), st.integers(0, n))

    @st.composite
    def build(draw):
        data = bytearray(seed)
        for pos, value in draw(edits):
            data[pos] = value
        for pos, value in draw(wide):
            data[pos:pos + 8] = struct.pack("<Q", value)
        return bytes(data[:draw(cut)])

    return st.one_of(build(), st.binary(max_size=2048))


@FUZZ
@given(mutated(CPIO))
def test_cpio_reader(data):
    try:
        entries = read_cpio(data)
    except UsageError:
        return
    assert all(isinstance(e["name"], str) and len(e["data"]) == e["size"] for e in entries)


def _read_all(image) -> int:
    """Everything a reader offers: walk, list, read every file, read every link."""
    total = 0
    for entry in image.walk():
        if entry.kind == "file":
            total += len(image.read_bytes(entry.path))
        elif entry.kind == "symlink":
            image.readlink(entry.path)
        else:
            image.listdir(entry.path)
    return total


@FUZZ
@given(mutated(ROFS, words=True))
def test_rofs_reader(data):
    try:
        with read_rofs(io.BytesIO(data)) as image:
            total = _read_all(image)
    except UsageError:
        return
    assert total <= len(data)


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(DISK, words=True))
def test_mbr_and_disk_rofs_readers(data):
    with tempfile.NamedTemporaryFile(suffix=".img") as tmp:
        tmp.write(data)
        tmp.flush()
        for part in read_partitions(tmp.name):
            assert 0 <= part.index < 4
        cmdline = read_cmdline(tmp.name)
        assert cmdline is None or isinstance(cmdline, str)
        try:
            with read_disk_rofs(tmp.name) as image:
                _read_all(image)
        except UsageError:
            pass


@settings(max_examples=1500, deadline=2000)
@given(st.text(alphabet=st.sampled_from(list(' \t\n;&!"\\$=-abcXYZ019/')), max_size=80) | st.text(max_size=80))
def test_osv_cmdline_grammar(line):
    parsed = parse_cmdline(line)
    assert isinstance(parsed.ok, bool)
    assert all(isinstance(word, str) for command in parsed.commands for word in command)


def test_the_seeds_are_valid():
    """The mutations start from archives the readers accept (else the fuzzing tests little)."""
    assert {e["name"] for e in read_cpio(CPIO)} >= {"init", "bin/x"}
    with read_rofs(io.BytesIO(ROFS)) as image:
        assert image.read_bytes("/etc/hosts") == b"127.0.0.1 localhost\n"
    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(DISK)
        tmp.flush()
        with read_disk_rofs(tmp.name) as image:
            assert image.read_bytes("/hello") == b"hello"


@pytest.mark.parametrize("value", [(1 << 64) - 1, 1 << 40])
def test_a_huge_structure_count_is_refused_without_allocating_it(value):
    data = bytearray(ROFS)
    data[32:40] = struct.pack("<Q", value)  # the super block's structure info block count
    with pytest.raises(UsageError, match="past"):
        read_rofs(io.BytesIO(bytes(data)))
