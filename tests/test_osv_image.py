"""The osv target without a VM: bundle files and manifest, ROFS contents as OSv reads them,
determinism, the boot command line and its run-time rebuild, the console filter, the seed disk,
and the classic disk export."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import stat
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard

from jvmkit import guest
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import bundle as bundles
from jvmkit.packager import native_libs, targets
from jvmkit.packager.manifest import KernelInfo, Manifest
from jvmkit.packager.targets.base import BootRequest, BundleFiles, PackInputs
from jvmkit.packager.targets.osv import image as osv_image
from jvmkit.packager.targets.osv.cmdline import CMDLINE_MAX
from jvmkit.packager.targets.osv.console import ConsoleFilter
from jvmkit.packager.targets.osv.disk import LOADER_OFFSET
from jvmkit.packager.targets.osv.export import export_classic
from jvmkit.packager.targets.osv.readers import parse_cmdline, read_cmdline, read_disk_rofs, read_partitions
from jvmkit.packager.targets.osv.target import OsvBoot, OsvTarget
from jvmkit.vm.rundir import RunDir
from support.images import manifest_for


# ---- fixtures: a fake runtime, host libraries and kernel ------------------------------------------------

def make_elf(needed: list[str] = (), soname: str | None = None, payload: bytes = b"") -> bytes:
    """A minimal little-endian ELF64 shared object: PT_LOAD over the file, PT_DYNAMIC with DT_NEEDED."""
    strtab = b"\0"
    offsets = []
    for name in [*needed, *([soname] if soname else [])]:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    phnum = 2
    head = 64 + 56 * phnum
    strtab_off = head
    dyn_off = (strtab_off + len(strtab) + 7) & ~7
    dyn = b"".join(struct.pack("<qQ", 1, off) for off in offsets[:len(needed)])
    if soname:
        dyn += struct.pack("<qQ", 14, offsets[-1])
    dyn += struct.pack("<qQ", 5, strtab_off) + struct.pack("<qQ", 0, 0)
    body_end = dyn_off + len(dyn)
    total = body_end + len(payload)
    ehdr = (b"\x7fELF\x02\x01\x01" + b"\0" * 9
            + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 64, 0, 0))
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, total, total, 0x1000)
    dynamic = struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, len(dyn), len(dyn), 8)
    data = bytearray(ehdr + load + dynamic)
    data += strtab
    data += b"\0" * (dyn_off - len(data))
    data += dyn + payload
    return bytes(data)


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A fake jlink'd runtime, app jars, agent, host library dir and kernel. The fake runtime's host
    libraries are fake too: the host's library directories (ld.so.conf) are replaced by the fake
    one, as the old writer's `lib_dirs` did (a real host has libz/libstdc++ files of its own)."""
    rt = tmp_path / "runtime"
    _write(rt / "release", b'JAVA_VERSION="17.0.15"\nMODULES="java.base"\n')
    _write(rt / "bin/java", make_elf(["libjli.so", "libz.so.1", "libc.so.6"]), 0o755)
    _write(rt / "lib/libjli.so", make_elf(["libc.so.6", "libdl.so.2"], soname="libjli.so"))
    _write(rt / "lib/libzip.so", make_elf(["libz.so.1"], soname="libzip.so"))
    _write(rt / "lib/server/libjvm.so", make_elf(["libstdc++.so.6", "libm.so.6"], soname="libjvm.so",
                                                  payload=b"J" * 5000))
    _write(rt / "lib/modules", bytes(range(256)) * 40)
    _write(rt / "lib/server/classes.jsa", b"\x01" * 513)
    _write(rt / "conf/security/java.security", b"# empty\n")
    (rt / "legal/java.logging").mkdir(parents=True)
    _write(rt / "legal/java.base/LICENSE", b"GPLv2+CE\n")
    (rt / "legal/java.logging/LICENSE").symlink_to("../java.base/LICENSE")
    host = tmp_path / "hostlib"
    _write(host / "libz.so.1.2.13", make_elf(["libc.so.6"], soname="libz.so.1"))
    (host / "libz.so.1").symlink_to("libz.so.1.2.13")
    _write(host / "libstdc++.so.6", make_elf(["libgcc_s.so.1", "libm.so.6", "libc.so.6"], soname="libstdc++.so.6"))
    _write(host / "libgcc_s.so.1", make_elf(["libc.so.6"], soname="libgcc_s.so.1"))
    app = _write(tmp_path / "in/app.jar", b"PK\x03\x04 the app")
    lib = _write(tmp_path / "in/lib.jar", b"PK\x03\x04 a lib")
    agent = _write(tmp_path / "in/agent.jar", b"PK\x03\x04 the agent")
    elf = _write(tmp_path / "kernel/loader-stripped.elf", make_elf(payload=b"OSv v0.57.0-test\n" * 100))
    kernel = SimpleNamespace(elf=elf, version="v0.57.0-test", describe=lambda: {"name": "osv", "sha256": "x"})
    monkeypatch.setattr(native_libs, "host_library_dirs", lambda: [str(host)])
    return SimpleNamespace(runtime=rt, host=host, app=app, lib=lib, agent=agent, kernel=kernel, root=tmp_path)


# pack's agent flags for an osv image: the seed property points at the seed disk (/dev/vblk1)
AGENT_FLAGS = guest.agent_flags(OsvTarget().agent_seed_path())
JAVA_ARGV = ["/jvm/bin/java", "-XX:+UseSerialGC", "-XX:MaxRAMPercentage=75", *AGENT_FLAGS,
             "-cp", "/app/app.jar:/app/lib/lib.jar", "io.jvmkit.agent.Launcher", "com.example.Main"]


def write(tree, dest: Path, java_argv=JAVA_ARGV, app_args=("--port", "8080"), agent_flags=AGENT_FLAGS) -> BundleFiles:
    dest.mkdir(parents=True, exist_ok=True)
    return OsvTarget().write_bundle(dest, PackInputs(
        kernel=tree.kernel, java_argv=tuple(java_argv), app_args=tuple(app_args), runtime=tree.runtime,
        app_files=(("/app/app.jar", tree.app), ("/app/lib/lib.jar", tree.lib)), agent_jar=tree.agent, mtime=0,
        agent_flags=tuple(agent_flags)))


def write_image(tree, dest: Path, kernel: dict | None = None, **kw) -> bundles.Bundle:
    """The writer's files plus a manifest, loaded back as `run` and `export` load it."""
    written = write(tree, dest, **kw)
    bundles.write_manifest(dest, manifest_for("osv", written, name=dest.name.removesuffix(".jvmkit"), kernel=kernel))
    return bundles.load(dest)


def unzstd(path: Path) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())


# ---- the bundle --------------------------------------------------------------------------------------

def test_bundle_files_and_records(tree):
    out = tree.root / "b"
    written = write(tree, out)
    files = written.files
    assert sorted(files) == ["disk", "kernel"]
    assert sorted(p.name for p in out.iterdir()) == ["disk.img.zst", "kernel.zst"]  # no temp files left
    for role, record in files.items():
        f = out / record.path
        assert record.compression == "zstd"
        assert record.size == f.stat().st_size and record.sha256 == bundles.sha256_file(f)
        raw = unzstd(f)
        assert len(raw) == record.raw_size
        assert __import__("hashlib").sha256(raw).hexdigest() == record.raw_sha256
    assert unzstd(out / "kernel.zst") == tree.kernel.elf.read_bytes()
    disk = tree.root / "disk.img"
    disk.write_bytes(unzstd(out / "disk.img.zst"))
    (part,) = [p for p in read_partitions(disk)]
    assert part.index == 1 and part.device == "vblk0.1"
    assert files["disk"].rofs_offset == part.offset == 2 << 20
    assert files["disk"].rofs_size == part.size


def test_bundle_loads_with_a_manifest(tree):
    out = tree.root / "img.jvmkit"
    image = write_image(tree, out)
    assert image.target == "osv" and image.file("disk").name == "disk.img.zst"
    assert isinstance(image.manifest.boot, OsvBoot) and image.manifest.files["disk"].rofs_offset == 2 << 20


def test_rofs_contents(tree):
    out = tree.root / "b"
    written = write(tree, out)
    disk = tree.root / "disk.img"
    disk.write_bytes(unzstd(out / "disk.img.zst"))
    with read_disk_rofs(disk) as fs:
        entries = fs.entries()
        assert fs.read_bytes("/jvm/bin/java") == (tree.runtime / "bin/java").read_bytes()
        assert entries["/jvm/bin/java"].mode == 0o755
        assert fs.read_bytes("/jvm/lib/server/libjvm.so") == (tree.runtime / "lib/server/libjvm.so").read_bytes()
        assert fs.read_bytes("/jvm/lib/modules") == (tree.runtime / "lib/modules").read_bytes()
        assert fs.readlink("/jvm/legal/java.logging/LICENSE") == "../java.base/LICENSE"
        assert fs.read_bytes("/app/app.jar") == tree.app.read_bytes()
        assert fs.read_bytes("/app/lib/lib.jar") == tree.lib.read_bytes()
        assert fs.read_bytes("/jvmkit/agent.jar") == tree.agent.read_bytes()
        # host libraries: the closure, minus the runtime's own and what OSv supplies, all in /usr/lib
        assert fs.listdir("/usr/lib") == ["libgcc_s.so.1", "libstdc++.so.6", "libz.so.1", "libzip.so"]
        assert fs.read_bytes("/usr/lib/libz.so.1") == (tree.host / "libz.so.1.2.13").read_bytes()
        assert entries["/usr/lib/libz.so.1"].kind == "file"  # the host symlink was resolved
        assert fs.readlink("/usr/lib/libzip.so") == "/jvm/lib/libzip.so"
        assert written.boot.libraries == ("libgcc_s.so.1", "libstdc++.so.6", "libz.so.1")
        fstab = fs.read_bytes("/etc/fstab").decode().splitlines()
        assert [line.split()[:3] for line in fstab] == [
            ["/dev/vblk0.1", "/", "rofs"], ["none", "/dev", "devfs"], ["none", "/proc", "procfs"],
            ["none", "/sys", "sysfs"], ["none", "/tmp", "ramfs"]]
        assert fs.readlink("/etc/mnttab") == "/proc/mounts"
        assert b"localhost" in fs.read_bytes("/etc/hosts")
        for mount_point in ("/dev", "/proc", "/sys", "/tmp"):
            assert entries[mount_point].kind == "dir"
        assert set(fs.listdir("/")) == {"app", "dev", "etc", "jvm", "jvmkit", "proc", "sys", "tmp", "usr"}


def test_missing_host_library_is_refused(tree):
    (tree.host / "libstdc++.so.6").unlink()
    with pytest.raises(JvmkitError, match="libstdc"):
        write(tree, tree.root / "b")


def test_same_inputs_same_bytes(tree):
    first = write(tree, tree.root / "one")
    second = write(tree, tree.root / "two")
    assert first == second
    for name in ("disk.img.zst", "kernel.zst"):
        assert (tree.root / "one" / name).read_bytes() == (tree.root / "two" / name).read_bytes()


def test_kernel_without_elf_is_refused(tree):
    tree.kernel.elf = None
    with pytest.raises(JvmkitError, match="loader ELF"):
        write(tree, tree.root / "b")


# ---- the command line --------------------------------------------------------------------------------

def test_cmdline_in_manifest_parses_back(tree):
    tricky = ["plain", "with space", 'quo"te', "back\\slash", "$HOME", "cost=$5", "semi;colon", "amp&", "tab\tnl\n", ""]
    out = tree.root / "b.jvmkit"
    written = write(tree, out, app_args=tricky)
    bundles.write_manifest(out, manifest_for("osv", written))
    boot = bundles.load(out).manifest.boot  # as `run` reads it back from manifest.json
    assert boot == written.boot
    parsed = parse_cmdline(boot.kernel_cmdline)
    assert parsed.ok
    expected_argv = ["/jvm/bin/java", *osv_image.encoding_flags(17), *JAVA_ARGV[1:3], "-Djvmkit.seed=/dev/vblk1",
                     *JAVA_ARGV[4:]]
    agent = ["-Djvmkit.seed=/dev/vblk1", "-javaagent:/jvmkit/agent.jar"]
    assert list(boot.cmdline.argv) == expected_argv and list(boot.cmdline.agent_flags) == agent
    assert list(boot.cmdline.args) == tricky
    assert len(parsed.commands) == 1
    # the image's own line runs without the guest agent; a --balloon run puts its flags back
    assert parsed.commands[0] == [a for a in expected_argv if a not in agent] + tricky
    assert parse_cmdline(osv_image.runtime_cmdline(boot, agent=True)).commands == [expected_argv + tricky]
    assert parsed.options[:4] == ["--rootfs=rofs", "--power-off-on-abort", "--cwd=/", "--verbose"]
    assert parsed.env["JAVA_HOME"] == "/jvm"
    assert boot.exit_marker == "program exited with status "
    assert boot.acpi_shutdown is True
    # keys the manifest no longer carries (nobody read them): gone from a freshly written manifest
    written_boot = json.loads((out / "manifest.json").read_text())["boot"]
    for gone in ("app_console", "quiet_append", "verbose_append", "seed_device", "console_filter"):
        assert gone not in written_boot
    assert written_boot["kernel_cmdline"] == boot.kernel_cmdline


def test_cmdline_without_tricky_args_parses_exactly(tree):
    boot = write(tree, tree.root / "b", app_args=["a b", "$x", "c"]).boot
    parsed = parse_cmdline(boot.kernel_cmdline)
    no_agent = [a for a in boot.cmdline.argv if a not in boot.cmdline.agent_flags]
    assert parsed.commands == [no_agent + ["a b", "$x", "c"]]
    everything = write(tree, tree.root / "c", app_args=["z"], agent_flags=[]).boot
    assert everything.cmdline.agent_flags == ()
    assert parse_cmdline(everything.kernel_cmdline).commands == [list(everything.cmdline.argv) + ["z"]]
    assert "-javaagent:/jvmkit/agent.jar" in everything.cmdline.argv


def test_runtime_cmdline_rebuilds_with_new_args(tree):
    written = write(tree, tree.root / "b")
    boot = written.boot
    argv, flags = list(boot.cmdline.argv), boot.cmdline.agent_flags
    no_agent = [a for a in argv if a not in flags]
    assert osv_image.runtime_cmdline(boot) == boot.kernel_cmdline
    through_json = Manifest.from_json(json.loads(json.dumps(manifest_for("osv", written).to_json()))).boot
    assert osv_image.runtime_cmdline(through_json, None) == boot.kernel_cmdline
    assert osv_image.runtime_cmdline(through_json, ["x y", "3"]) == osv_image.runtime_cmdline(boot, ["x y", "3"])
    line = osv_image.runtime_cmdline(boot, ["x y", "3"])
    assert parse_cmdline(line).commands == [no_agent + ["x y", "3"]]
    assert parse_cmdline(osv_image.runtime_cmdline(boot, [])).commands == [no_agent]
    assert parse_cmdline(osv_image.runtime_cmdline(boot, ["q"], agent=True)).commands == [argv + ["q"]]
    assert parse_cmdline(osv_image.runtime_cmdline(boot, None, agent=True)).commands == [argv + ["--port", "8080"]]
    with pytest.raises(UsageError, match="1023"):
        osv_image.runtime_cmdline(boot, ["x" * CMDLINE_MAX])


def test_non_ascii_words_refused(tree):
    # OSv parses the app command with boost::spirit ascii::char_: a non-ASCII byte fails the parse
    boot = write(tree, tree.root / "b").boot
    with pytest.raises(UsageError, match="not ASCII"):
        osv_image.runtime_cmdline(boot, ["caf\u00e9"])
    with pytest.raises(UsageError, match="not ASCII"):
        write(tree, tree.root / "c", app_args=["\u2713"])


def test_too_long_cmdline_refused_before_writing(tree):
    out = tree.root / "b"
    with pytest.raises(UsageError, match="at most 1023"):
        write(tree, out, app_args=["y" * 1100])
    assert list(out.iterdir()) == []


def test_guest_argv_and_encoding_flags():
    # pack points the seed property at the seed disk itself; guest_argv adds only the UTF-8 flags
    assert AGENT_FLAGS == ("-Djvmkit.seed=/dev/vblk1", "-javaagent:/jvmkit/agent.jar")
    argv = ["/jvm/bin/java", "-Djvmkit.seed=/dev/vblk1", "-cp", "/app/a.jar", "M"]
    assert osv_image.guest_argv(argv, 17) == ["/jvm/bin/java", "-Dfile.encoding=UTF-8", "-Dsun.stdout.encoding=UTF-8",
                                              "-Dsun.stderr.encoding=UTF-8", "-Djvmkit.seed=/dev/vblk1",
                                              "-cp", "/app/a.jar", "M"]
    linux_seed = ["/jvm/bin/java", "-Djvmkit.seed=/run/jvmkit/seed", "M"]
    assert osv_image.guest_argv(linux_seed, 17)[4:] == linux_seed[1:]  # no longer rewritten
    assert osv_image.guest_argv(argv, 21)[1:3] == ["-Dstdout.encoding=UTF-8", "-Dstderr.encoding=UTF-8"]
    assert osv_image.guest_argv(argv, 18)[1:3] == ["-Dsun.stdout.encoding=UTF-8", "-Dsun.stderr.encoding=UTF-8"]
    mine = ["/jvm/bin/java", "-Dfile.encoding=ISO-8859-1", "M"]
    assert osv_image.guest_argv(mine, 17) == ["/jvm/bin/java", "-Dsun.stdout.encoding=UTF-8",
                                              "-Dsun.stderr.encoding=UTF-8", "-Dfile.encoding=ISO-8859-1", "M"]
    assert osv_image.guest_argv([], 17) == []


def test_runtime_release(tmp_path):
    (tmp_path / "release").write_text('JAVA_VERSION="21.0.2"\n')
    assert osv_image.runtime_release(tmp_path) == 21
    (tmp_path / "release").write_text('JAVA_VERSION="1.8.0_392"\n')
    assert osv_image.runtime_release(tmp_path) == 8
    assert osv_image.runtime_release(tmp_path / "nope") is None


# ---- the console filter ------------------------------------------------------------------------------

BOOT_LOG = (b"OSv v0.57.0-398-g0e34e4dc\r\n"
            b"Setting in environment: JAVA_HOME=/jvm\r\n"
            b"[I/17 dhcp]: Waiting for IP...\r\n"
            b"eth0: 10.0.2.15\r\n"
            b"Booted up in 0.00 ms\r\n"
            b"Cmdline: /jvm/bin/java -cp /app/app.jar Hello\r\n"
            b"/jvm/lib/server/libjvm.so: ignoring missing symbol malloc_trim\r\n"
            b"random: device unblocked.\r\n")
SHUTDOWN_LOG = (b"[I/28 dhcp]: Unicasting DHCPRELEASE message\r\n"
                b"VFS: unmounting /dev\r\n"
                b"Powering off.\r\n")


def run_filter(chunks, verbose=True):
    app, osv = io.BytesIO(), io.BytesIO()
    f = ConsoleFilter(app, osv if verbose else None)
    for chunk in chunks:
        f.feed(chunk)
    f.close()
    return app.getvalue(), osv.getvalue(), f


def test_console_filter_splits_app_and_osv():
    log = BOOT_LOG + b"Hello, world\r\nprogram exited with status 3\r\n" + SHUTDOWN_LOG
    app, osv, f = run_filter([log])
    assert app == b"Hello, world\n"
    assert f.status == 3 and f.state == "done"
    assert b"OSv v0.57.0" in osv and b"ignoring missing symbol" in osv and b"Powering off." in osv
    assert b"program exited with status 3\n" in osv and b"\r" not in osv
    app2, osv2, f2 = run_filter([log[i:i + 7] for i in range(0, len(log), 7)], verbose=False)  # any chunking
    assert (app2, osv2, f2.status) == (app, b"", 3)


def test_console_filter_app_lines_and_statuses():
    body = (b"line one\r\n"
            b"Exception in thread \"main\" java.lang.IllegalStateException: boom\r\n"
            b"\tat Hello.main(Hello.java:5)\r\n"
            b"/jvm/lib/libnio.so: ignoring missing symbol fgetxattr\r\n"
            b"[I/25 dhcp]: renewing\r\n"
            b"program /jvm/bin/java returned 1\r\n"
            b"program exited with status 4294967295\r\n")
    app, _osv, f = run_filter([BOOT_LOG + body])
    assert app == (b"line one\nException in thread \"main\" java.lang.IllegalStateException: boom\n"
                   b"\tat Hello.main(Hello.java:5)\n")
    assert f.status == 255  # System.exit(-1), printed by OSv with %ld


def test_console_filter_unfinished_app_line_before_exit():
    app, osv, f = run_filter([BOOT_LOG + b"no newline at the end"
                              + b"program exited with status 0\r\n" + SHUTDOWN_LOG])
    assert app == b"no newline at the end\n" and f.status == 0
    assert osv.endswith(b"program exited with status 0\n" + SHUTDOWN_LOG.replace(b"\r", b""))


def test_console_filter_flush_partial():
    app, osv = io.BytesIO(), io.BytesIO()
    f = ConsoleFilter(app, osv)
    f.feed(BOOT_LOG + b"Enter name: ")
    assert app.getvalue() == b""
    f.flush_partial()
    assert app.getvalue() == b"Enter name: "
    f.feed(b"done\r\nrandom: device unblocked.\r\nprogram exited with status 7\r\n")
    f.close()
    assert app.getvalue() == b"Enter name: done\n" and f.status == 7


def test_console_filter_power_button():
    app, osv, f = run_filter([BOOT_LOG + b"httpd listening on port 8080\r\nPowering off.\r\n"])
    assert app == b"httpd listening on port 8080\n" and f.status is None and osv.endswith(b"Powering off.\n")


def test_console_filter_boot_failure_has_no_status():
    app, osv, f = run_filter([b"OSv v0.57.0\r\nCould not mount rofs root filesystem.\r\n"])
    assert app == b"" and f.status is None and b"Could not mount" in osv
    app, osv, f = run_filter([BOOT_LOG + b"trying to execute null pointer\r\n[backtrace]\r\n"
                              b"0x0000000040306fa6 <page_fault+278>\r\nAborted\r\n"])
    assert f.status is None and app == b"trying to execute null pointer\n"
    assert b"[backtrace]" in osv and b"page_fault" in osv


# ---- the seed disk -----------------------------------------------------------------------------------

def test_seed_disk(tree, tmp_path):
    """A run with a seed (`run --balloon`) gets it on a second raw disk, written 0600 into the run
    directory by the runner's write_secret, and the agent's flags back on the command line."""
    image = write_image(tree, tmp_path / "seeded.jvmkit")
    run = RunDir("seeded", tmp_path / "run")
    run.path.mkdir(mode=0o700)
    files = {"kernel": tmp_path / "kernel.elf", "disk": tmp_path / "disk.img"}
    seed = b"jmx.port=7091\njmx.user=jvmkit\njmx.password=s3cret\n"
    plan = OsvTarget().boot_plan(image.manifest, files, BootRequest(seed=seed), run.write_secret)
    (path,) = plan.data_disks
    data = path.read_bytes()
    assert path.parent == run.path
    assert len(data) == osv_image.SEED_DISK_SIZE and data.startswith(seed) and set(data[len(seed):]) == {10}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert parse_cmdline(plan.append).commands == [list(image.manifest.boot.cmdline.argv) + ["--port", "8080"]]
    assert plan.disk == files["disk"] and plan.kernel == files["kernel"] and plan.initrd is None
    # OSv's one console carries the app's output (QEMU's stdio), and ACPI's button powers it off
    assert plan.console_stdio and not plan.app_serial and plan.acpi_shutdown
    plain = OsvTarget().boot_plan(image.manifest, files, BootRequest(), run.write_secret)
    assert plain.data_disks == () and plain.append == image.manifest.boot.kernel_cmdline
    assert seed not in plan.append.encode()  # nothing secret on QEMU's command line
    with pytest.raises(JvmkitError):
        osv_image.seed_disk_image(b"x" * 5000)


# ---- export: the classic disk ------------------------------------------------------------------------

def fake_loader_image(path: Path) -> Path:
    boot = bytearray(512)
    boot[510:512] = b"\x55\xaa"
    data = bytes(boot) + b"\0" * (LOADER_OFFSET - 512) + make_elf(payload=b"lzloader" * 100)
    return _write(path, data)


@pytest.fixture
def image(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "cache"))
    return write_image(tree, tmp_path / "hello.jvmkit",
                       kernel={"name": "osv", "version": "v0.57.0-test", "sha256": "ab" * 32})


def test_export_classic_raw(image, tmp_path):
    loader = fake_loader_image(tmp_path / "loader.img")
    dest = export_classic(image, loader, tmp_path / "out" / "hello.img", "raw")
    data = dest.read_bytes()
    original = loader.read_bytes()
    assert data[:0x1BE] == original[:0x1BE] and data[510:512] == b"\x55\xaa"  # boot code kept, table rewritten
    assert data[LOADER_OFFSET:len(original)] == original[LOADER_OFFSET:]  # the compressed loader at sector 128
    assert read_cmdline(dest) == image.manifest.boot.kernel_cmdline
    (part,) = read_partitions(dest)
    assert part.index == 1 and part.offset % (2 << 20) == 0
    with read_disk_rofs(dest) as fs:
        assert fs.read_bytes("/app/app.jar") == b"PK\x03\x04 the app"
        assert fs.readlink("/usr/lib/libzip.so") == "/jvm/lib/libzip.so"
        direct = tmp_path / "direct.img"
        direct.write_bytes(unzstd(image.file("disk")))
        with read_disk_rofs(direct) as fs2:
            assert fs.entries() == fs2.entries()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_export_classic_qcow2(image, tmp_path):
    loader = fake_loader_image(tmp_path / "loader.img")
    dest = export_classic(image, loader, tmp_path / "hello.qcow2", "qcow2")
    assert dest.read_bytes()[:4] == b"QFI\xfb"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hello.qcow2")]


def test_export_uses_the_cached_loader_image(image, tmp_path):
    from jvmkit.packager.kernels import osv

    with pytest.raises(JvmkitError, match="jvmkit kernel import osv"):
        export_classic(image, None, tmp_path / "x.img")
    loader = fake_loader_image(tmp_path / "osv" / "loader.img")
    kernel = osv.import_osv(loader)
    assert kernel.elf is None and kernel.loader_image is not None
    manifest = dataclasses.replace(image.manifest, kernel=KernelInfo(name="osv", sha256=kernel.sha256))
    again = bundles.Bundle(image.path, manifest)
    dest = export_classic(again, None, tmp_path / "x.img")
    assert read_cmdline(dest) == image.manifest.boot.kernel_cmdline


def test_export_refuses_linux_images_and_bad_formats(image, tmp_path):
    with pytest.raises(UsageError, match="'vmdk' is not one of raw, qcow2"):
        export_classic(image, None, tmp_path / "x.img", "vmdk")
    # `jvmkit export` reaches export through the image's target: linux has no export format
    linux = bundles.Bundle(image.path, dataclasses.replace(image.manifest, target="linux"))
    with pytest.raises(UsageError, match="linux image"):
        targets.get(linux.target).export(linux, "raw", tmp_path / "x.img")
    assert not (tmp_path / "x.img").exists()


def test_export_of_a_damaged_disk_stream_is_one_error_and_leaves_nothing(image, tmp_path):
    """A disk whose zstd stream is broken mid-way but whose manifest digest was made to match it (a
    hostile image) is one UsageError naming the image's disk, not zstandard's own exception."""
    disk = image.file("disk")
    data = bytearray(disk.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    disk.chmod(0o644)
    disk.write_bytes(bytes(data))
    loader = fake_loader_image(tmp_path / "loader.img")
    with pytest.raises(UsageError, match=r"its disk \(.*\) is not a valid zstd stream"):
        export_classic(image, loader, tmp_path / "out" / "hello.img", "raw")
    with pytest.raises(UsageError, match="is not a valid zstd stream"):
        from jvmkit.engines.export import unpack_file

        unpack_file(image, "disk", tmp_path / "disk.raw")
    assert not (tmp_path / "out" / "hello.img").exists() and not (tmp_path / "disk.raw").exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no partial file
