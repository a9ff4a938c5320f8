"""OSv disks: the MBR around ROFS, the classic single-file disk, the boot command line, qcow2."""

from __future__ import annotations

import io
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager.targets.osv import disk as osv_disk
from jvmkit.packager.targets.osv.cmdline import build_cmdline
from jvmkit.packager.targets.osv.disk import set_cmdline, write_classic_disk, write_rofs_disk
from jvmkit.packager.targets.osv.readers import (
    parse_cmdline, read_cmdline, read_disk_rofs, read_partitions, rofs_partition,
)
from jvmkit.packager.targets.osv.rofs import RofsBuilder

MiB = 1 << 20


def _builder() -> RofsBuilder:
    b = RofsBuilder()
    b.add_file("/jvm/bin/java", random.Random(1).randbytes(70000), mode=0o755)
    b.add_file("/app/app.jar", b"PK\x03\x04jar")
    b.add_symlink("/etc/mnttab", "/proc/mounts")
    b.add_dir("/tmp")
    return b


def _rofs_bytes(b: RofsBuilder) -> bytes:
    buf = io.BytesIO()
    b.write(buf)
    return buf.getvalue()


def _entry(disk: bytes, index: int) -> tuple:
    off = 0x1BE + 16 * index
    return struct.unpack_from("<B3sB3sII", disk, off)


# -- the ROFS disk ---------------------------------------------------------------------------


def test_rofs_disk_mbr_layout(tmp_path: Path) -> None:
    b = _builder()
    rofs = _rofs_bytes(b)
    info = write_rofs_disk(b, tmp_path / "disk.raw")
    disk = (tmp_path / "disk.raw").read_bytes()
    assert disk[510:512] == b"\x55\xaa"
    status, chs_start, ptype, _chs_end, lba, count = _entry(disk, 1)  # entry #2 at 0x1ce
    assert 0x1BE + 16 == 0x1CE
    assert (status, ptype, lba, count) == (0, 0x83, 2 * MiB // 512, len(rofs) // 512)
    assert chs_start[1] & 0x3F != 0  # OSv skips entries whose CHS start sector is 0
    for other in (0, 2, 3):
        assert disk[0x1BE + 16 * other:0x1BE + 16 * (other + 1)] == b"\0" * 16
    assert disk[:0x1BE] == b"\0" * 0x1BE  # no boot code, no command line
    assert disk[512:2 * MiB] == b"\0" * (2 * MiB - 512)
    assert disk[2 * MiB:] == rofs  # the ROFS, byte for byte, right at 2 MiB
    assert (info.size, info.rofs_offset, info.rofs_size) == (len(disk), 2 * MiB, len(rofs))
    [part] = read_partitions(tmp_path / "disk.raw")
    assert (part.device, part.offset, part.size) == ("vblk0.1", 2 * MiB, len(rofs))
    with read_disk_rofs(tmp_path / "disk.raw") as img:
        assert img.listdir("/") == ["app", "etc", "jvm", "tmp"]
        assert img.read_bytes("/jvm/bin/java") == random.Random(1).randbytes(70000)
        assert img.limit == len(rofs)


def test_rofs_disk_from_image_file_or_stream_is_identical(tmp_path: Path) -> None:
    b = _builder()
    write_rofs_disk(b, tmp_path / "a.raw")
    b.write(tmp_path / "x.rofs")
    write_rofs_disk(tmp_path / "x.rofs", tmp_path / "b.raw")
    with open(tmp_path / "x.rofs", "rb") as stream:
        write_rofs_disk(stream, tmp_path / "c.raw")
    a = (tmp_path / "a.raw").read_bytes()
    assert a == (tmp_path / "b.raw").read_bytes() == (tmp_path / "c.raw").read_bytes()
    write_rofs_disk(_builder(), tmp_path / "d.raw")
    assert a == (tmp_path / "d.raw").read_bytes()  # deterministic


def test_non_rofs_input_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(JvmkitError, match="not a ROFS image"):
        write_rofs_disk(junk, out / "disk.raw")
    assert list(out.iterdir()) == []


def test_bare_rofs_has_no_root_partition(tmp_path: Path) -> None:
    _builder().write(tmp_path / "bare.rofs")
    assert read_partitions(tmp_path / "bare.rofs") == []
    with pytest.raises(JvmkitError, match="vblk0.1"):
        rofs_partition(tmp_path / "bare.rofs")


def test_mbr_entry_chs() -> None:
    entry = osv_disk.mbr_entry(4096, 100)
    assert entry[0] == 0 and entry[4] == 0x83
    assert entry[1:4] == bytes((65, 2, 0))  # LBA 4096 = C0 H65 S2
    assert struct.unpack("<II", entry[8:]) == (4096, 100)
    far = osv_disk.mbr_entry(20_000_000, 8)
    assert far[1:4] == bytes((254, 63 | 0xC0, 0xFF))  # past cylinder 1023: clamped
    with pytest.raises(JvmkitError, match="MBR"):
        osv_disk.mbr_entry(1 << 32, 1)


# -- the classic disk ------------------------------------------------------------------------


def _fake_loader(size: int) -> bytes:
    """Looks like OSv's loader.img: boot sector (code, 'VSO' disk id, empty table, 0x55AA),
    zeros, then an 'lzloader.elf' at sector 128."""
    boot = bytearray(random.Random(7).randbytes(0x1B8)) + bytearray(b"VSO\0\0\0") + bytearray(64) + b"\x55\xaa"
    assert len(boot) == 512
    body = b"\x7fELF" + random.Random(8).randbytes(size - 65536 - 4)
    return bytes(boot) + b"\0" * (65536 - 512) + body


@pytest.mark.parametrize("loader_size, partition_start", [
    (300_000, 2 * MiB), (2 * MiB, 2 * MiB), (2 * MiB + 1, 4 * MiB)])
def test_classic_disk_layout(tmp_path: Path, loader_size: int, partition_start: int) -> None:
    loader = _fake_loader(loader_size)
    (tmp_path / "loader.img").write_bytes(loader)
    b = _builder()
    rofs = _rofs_bytes(b)
    cmdline = build_cmdline(["/jvm/bin/java", "-cp", "/app/app.jar", "Main"], {"A": "b"})
    info = write_classic_disk(tmp_path / "loader.img", cmdline, b, tmp_path / "osv.raw")
    disk = (tmp_path / "osv.raw").read_bytes()
    assert disk[:0x1BE] == loader[:0x1BE]  # boot code and disk signature kept
    assert disk[510:512] == b"\x55\xaa"
    assert disk[512:512 + len(cmdline) + 1] == cmdline.encode() + b"\0"  # command line at byte 512
    assert disk[512 + len(cmdline):65536] == b"\0" * (65536 - 512 - len(cmdline))
    assert disk[65536:loader_size] == loader[65536:]  # compressed loader at sector 128
    assert disk[loader_size:partition_start] == b"\0" * (partition_start - loader_size)
    assert disk[partition_start:] == rofs
    _, _, ptype, _, lba, count = _entry(disk, 1)
    assert (ptype, lba * 512, count * 512) == (0x83, partition_start, len(rofs))
    assert (info.rofs_offset, info.size) == (partition_start, len(disk))
    assert read_cmdline(tmp_path / "osv.raw") == cmdline
    with read_disk_rofs(tmp_path / "osv.raw") as img:
        assert img.readlink("/etc/mnttab") == "/proc/mounts"


@pytest.mark.parametrize("blob, message", [
    (b"QFI\xfb" + b"\0" * 70000, "qcow2"),
    (b"\0" * 70000, "boot sector"),
    (_fake_loader(70000)[:65536], "too short"),
    (_fake_loader(70000)[:65536] + b"MZ" + b"\0" * 1000, "ELF"),
])
def test_classic_disk_refuses_what_is_not_a_loader(tmp_path: Path, blob: bytes, message: str) -> None:
    (tmp_path / "loader").write_bytes(blob)
    with pytest.raises(JvmkitError, match=message):
        write_classic_disk(tmp_path / "loader", "/x", _builder(), tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_set_cmdline_in_place(tmp_path: Path) -> None:
    (tmp_path / "loader.img").write_bytes(_fake_loader(100_000))
    disk = tmp_path / "osv.raw"
    write_classic_disk(tmp_path / "loader.img", "/a " + "x" * 900, _builder(), disk)
    before = disk.read_bytes()
    set_cmdline(disk, "/b")
    after = disk.read_bytes()
    assert read_cmdline(disk) == "/b"
    assert after[512:1536] == b"/b".ljust(1024, b"\0")  # no tail of the longer old line left
    assert after[:512] == before[:512] and after[1536:] == before[1536:]
    with pytest.raises(UsageError, match="1024 bytes"):
        set_cmdline(disk, "/" + "y" * 1023)


def test_set_cmdline_refuses_disks_without_room(tmp_path: Path) -> None:
    rofs = tmp_path / "x.rofs"
    _builder().write(rofs)
    with pytest.raises(JvmkitError, match="no MBR"):
        set_cmdline(rofs, "/x")
    # a disk whose partition starts at sector 1 (OSv's --create-disk layout) has no command line
    disk = bytearray(512) + bytearray(rofs.read_bytes())
    disk[0x1CE:0x1DE] = osv_disk.mbr_entry(1, len(disk) // 512 - 1)
    disk[510:512] = b"\x55\xaa"
    (tmp_path / "d.raw").write_bytes(disk)
    assert read_cmdline(tmp_path / "d.raw") is None
    with pytest.raises(JvmkitError, match="where the command line goes"):
        set_cmdline(tmp_path / "d.raw", "/x")


# -- command lines ---------------------------------------------------------------------------


def test_plain_command_line() -> None:
    line = build_cmdline(["/jvm/bin/java", "-Xmx64m", "-cp", "/app/app.jar:/app/lib/a.jar", "com.example.Main"],
                         {"JAVA_HOME": "/jvm", "LANG": "C.UTF-8"})
    assert line == ("--rootfs=rofs --env=JAVA_HOME=/jvm --env=LANG=C.UTF-8 "
                    "/jvm/bin/java -Xmx64m -cp /app/app.jar:/app/lib/a.jar com.example.Main")
    assert build_cmdline(["/x"], rootfs=None, extra_opts=["--verbose", "--ip=eth0,10.0.2.15,255.255.255.0"]) == \
        "--verbose --ip=eth0,10.0.2.15,255.255.255.0 /x"


def test_quoting_golden() -> None:
    line = build_cmdline(["/p", "a b", "semi;colon", "x\"y", "back\\slash", "", "t\tn\n", "it's", "!"], rootfs=None)
    assert line == '/p "a b" "semi;colon" "x\\"y" "back\\\\slash" "" "t\\tn\\n" "it\'s" "!"'
    opts = build_cmdline(["/p"], {"K": "v w\\x\ty"}, rootfs=None)
    assert opts == "--env=K=v\\ w\\\\x\\\ty /p"


def test_dollar_arguments_go_through_the_environment() -> None:
    line = build_cmdline(["/jvm/bin/java", "-cp", "/app", "Outer$Inner", "-Dp=a b$c"], {"HOME": "/"})
    assert line == ("--rootfs=rofs --env=HOME=/ --env=JVMKIT_ARG3=Outer$Inner --env=JVMKIT_ARG4=-Dp=a\\ b$c "
                    "/jvm/bin/java -cp /app $JVMKIT_ARG3 $JVMKIT_ARG4")
    with pytest.raises(UsageError, match="reserved"):
        build_cmdline(["/x", "$y"], {"JVMKIT_ARG1": "z"})


TRICKY = ["/jvm/bin/java", "-Dp=a b$c", "-cp", "/app", "Outer$Inner", "hello world", "semi;colon", "amp&",
          "bang!", "&!", "quo\"te", "back\\slash", "", "tab\there", "nl\nx", "dollar$HOME", "$", "it's", "-x",
          "trailing\\", "\\\"", "ünïcödé", "--not-an-os-option", "a\rb\vc\fd\ae\bf"]


def test_round_trip_through_osvs_parser() -> None:
    env = {"FOO": "f o\\o", "BAR": "$x y", "EMPTY": "", "EQ": "a=b", "TAB": "a\tb\nc"}
    parsed = parse_cmdline(build_cmdline(TRICKY, env))
    assert parsed.ok
    assert parsed.commands == [TRICKY]
    assert {k: parsed.env[k] for k in env} == env
    assert parsed.options[0] == "--rootfs=rofs"
    # the same ran on a real OSv (v0.57.0-398) + JDK 17 while writing this module: main printed
    # exactly TRICKY[5:14] and the env values


def test_parser_model_matches_osv_examples() -> None:
    """Examples from OSv's core/commands.cc comments and grammar."""
    p = parse_cmdline("--env=AA=aa --env=BB=bb1\\ bb2 app.so arg1 arg2")
    assert p.options == ["--env=AA=aa", "--env=BB=bb1 bb2"]
    assert p.commands == [["app.so", "arg1", "arg2"]]
    p = parse_cmdline("--env=AA=aa /a X$AA $AA $NOPE; /b \"q w\"&/c&!/d")
    assert p.commands == [["/a", "Xaa", "aa", ""], ["/b", "q w"], ["/c"], ["/d"]]
    assert parse_cmdline("   ").commands == [] and parse_cmdline(" ; ;").ok
    assert not parse_cmdline("&").ok
    assert not parse_cmdline("-x /a").ok  # OSv: "not an option: -x"


def test_command_line_limit() -> None:
    fill = 1023 - len("/p ")
    ok = build_cmdline(["/p", "a" * fill], rootfs=None)
    assert len(ok.encode()) == 1023
    with pytest.raises(UsageError) as err:
        build_cmdline(["/p", "a" * (fill + 1)], rootfs=None)
    text = str(err.value)
    assert "1024 bytes" in text and "at most 1023" in text
    assert "argument 1 (aaaa" in text and f"{fill + 1} bytes" in text  # names what to shorten
    with pytest.raises(UsageError, match="environment variable BIG"):
        build_cmdline(["/p"], {"BIG": "v" * 2000})
    with pytest.raises(UsageError):
        write_classic_disk("/nonexistent", "x" * 1024, RofsBuilder(), "/nonexistent/out")


@pytest.mark.parametrize("argv, env, message", [
    ([], {}, "program path"),
    (["-jar", "x"], {}, "starts with '-'"),
    (["/p", "a\0b"], {}, "NUL"),
    (["/p"], {"A=B": "x"}, "not usable"),
    (["/p"], {"": "x"}, "not usable"),
])
def test_bad_command_lines(argv, env, message) -> None:
    with pytest.raises(UsageError, match=message):
        build_cmdline(argv, env)
    with pytest.raises(UsageError, match="must start with '--'"):
        build_cmdline(["/p"], extra_opts=["-v"])


# -- qcow2 -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) is not installed")
def test_convert_to_qcow2(tmp_path: Path) -> None:
    write_rofs_disk(_builder(), tmp_path / "disk.raw")
    out = osv_disk.convert_to_qcow2(tmp_path / "disk.raw", tmp_path / "disk.qcow2")
    assert out.read_bytes()[:4] == b"QFI\xfb"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out), str(tmp_path / "back.raw")],
                   check=True)
    assert (tmp_path / "back.raw").read_bytes() == (tmp_path / "disk.raw").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_convert_to_qcow2_reports_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("qemu-img"):
        # proc.run's one failure line: what ran, on which file, its status and qemu-img's last line
        with pytest.raises(JvmkitError, match=r"qemu-img convert of \S*missing\.raw failed \(exit status 1\): "
                                              r"qemu-img: Could not open"):
            osv_disk.convert_to_qcow2(tmp_path / "missing.raw", tmp_path / "y.qcow2")
        assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(JvmkitError, match="qemu-img is not installed"):
        osv_disk.convert_to_qcow2(tmp_path / "x.raw", tmp_path / "y.qcow2")
