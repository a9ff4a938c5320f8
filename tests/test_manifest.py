"""The typed manifest: images written by an older jvmkit still load and round-trip, bad fields are
one line naming the field, and `bundle.load` refuses files outside the image.

tests/data/manifest-v1-{linux,osv}.json are the manifests of two images packed by jvmkit before
the typed manifest (the hello sample, one per target), kept as they were written.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from jvmkit.errors import UsageError
from jvmkit.packager import bundle as bundles
from jvmkit.packager.manifest import (AppInfo, FileRecord, JdkInfo, KernelInfo, Manifest, ManifestError,
                                      decode)
from jvmkit.packager.targets.base import BootRequest
from jvmkit.packager.targets.linux.target import LinuxBoot, LinuxTarget
from jvmkit.packager.targets.osv.image import runtime_cmdline
from jvmkit.packager.targets.osv.readers import parse_cmdline
from jvmkit.packager.targets.osv.target import OsvBoot, OsvCmdline

DATA = Path(__file__).parent / "data"
# written by format-1 jvmkits before the typed manifest, read by no code: ignored, no longer written
DROPPED = ("app_console", "quiet_append", "verbose_append", "seed_device", "console_filter")


def v1(target: str) -> dict:
    return json.loads((DATA / f"manifest-v1-{target}.json").read_text())


def without_dropped(data: dict) -> dict:
    out = copy.deepcopy(data)
    for key in DROPPED:
        out["boot"].pop(key, None)
    return out


def image_dir(tmp_path: Path, data: dict, name: str = "old.jvmkit") -> Path:
    """A bundle directory holding only `data` as its manifest.json (load with verify=False)."""
    path = tmp_path / name
    path.mkdir()
    (path / bundles.MANIFEST).write_text(json.dumps(data))
    return path


# ---- images from the old jvmkit --------------------------------------------------------------------

@pytest.mark.parametrize("target", ["linux", "osv"])
def test_old_manifest_round_trips_minus_the_dropped_keys(target):
    data = v1(target)
    assert any(key in data["boot"] for key in DROPPED)  # the fixture really is an old one
    manifest = Manifest.from_json(data)
    assert manifest.to_json() == without_dropped(data)
    for key in DROPPED:
        assert key not in manifest.to_json()["boot"]
    # and through the text bundle.write_manifest writes
    assert json.loads(bundles.manifest_text(manifest)) == without_dropped(data)
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_old_linux_manifest_fields_are_typed():
    m = Manifest.from_json(v1("linux"))
    assert m.target == "linux" and m.name == "hello-linux" and m.format == 1
    assert isinstance(m.app, AppInfo) and m.app.main_class == "hello.Hello"
    assert m.app.class_path == ("/app/app.jar",) and m.app.args == ()
    assert isinstance(m.jdk, JdkInfo) and m.jdk.release == 17 and "java.base" in m.jdk.modules
    assert isinstance(m.jdk.modules, tuple) and m.jdk.profile["name"] == "auto"
    assert isinstance(m.boot, LinuxBoot)
    assert m.boot.machine == "q35" and m.boot.exit_marker == "jvmkit-exit="
    assert m.boot.kernel_cmdline.startswith("console=ttyS0 ")
    assert m.boot.seed_fw_cfg == "opt/io.jvmkit/seed" and m.boot.args_fw_cfg == "opt/io.jvmkit/args"
    assert sorted(m.files) == ["initramfs", "kernel"]
    initrd = m.files["initramfs"]
    assert isinstance(initrd, FileRecord) and initrd.path == "initramfs.cpio.zst" and initrd.compression == "zstd"
    assert isinstance(initrd.raw_size, int) and initrd.raw_size > initrd.size > 0
    assert initrd.rofs_offset is None and "rofs_offset" not in m.to_json()["files"]["initramfs"]
    assert m.size == sum(f.size for f in m.files.values())
    assert isinstance(m.kernel, KernelInfo) and m.kernel.target == "linux"
    assert m.kernel.details["debian_version"]  # the kernel's own description is kept as written
    assert m.defaults.memory_mib == 512 and m.defaults.cpus == 1
    assert m.guest.jmx_port == 7091 and m.guest.ports == ()
    assert m.command.agent_flags == ("-Djvmkit.seed=/run/jvmkit/seed", "-javaagent:/jvmkit/agent.jar")


def test_old_osv_manifest_fields_are_typed():
    m = Manifest.from_json(v1("osv"))
    assert m.target == "osv" and isinstance(m.boot, OsvBoot) and isinstance(m.boot.cmdline, OsvCmdline)
    assert m.boot.machine == "pc" and m.boot.acpi_shutdown is True
    assert m.boot.exit_marker == "program exited with status "
    assert m.boot.libraries == ("libgcc_s.so.1", "libstdc++.so.6", "libz.so.1")
    assert m.boot.cmdline.env == {"JAVA_HOME": "/jvm"} and m.boot.cmdline.rootfs == "rofs"
    assert m.boot.cmdline.agent_flags == ("-Djvmkit.seed=/dev/vblk1", "-javaagent:/jvmkit/agent.jar")
    disk = m.files["disk"]
    assert disk.rofs_offset == 2 << 20 and isinstance(disk.rofs_size, int) and disk.rofs_size > 0
    assert m.kernel.has_balloon is True and m.kernel.loader_image_sha256 and m.kernel.version.startswith("v0.57")
    assert m.jdk.launcher_cds == "/jvmkit/launcher.jsa" and m.jdk.appcds is None


def test_old_images_still_give_a_boot_plan(tmp_path):
    """Loaded by bundle.load (as `run` does) and turned into the boot the runner executes."""
    secrets: dict[str, bytes] = {}

    def write_secret(name: str, data: bytes) -> Path:
        secrets[name] = data
        return tmp_path / name

    linux = bundles.load(image_dir(tmp_path, v1("linux"), "linux.jvmkit"), verify=False)
    files = {"kernel": tmp_path / "vmlinux", "initramfs": tmp_path / "initrd"}
    plan = LinuxTarget().boot_plan(linux.manifest, files, BootRequest(args=("a b",)), write_secret)
    assert plan.machine == "q35" and plan.initrd == files["initramfs"] and plan.app_serial
    assert plan.append.startswith(linux.manifest.boot.kernel_cmdline) and " quiet" in plan.append
    assert secrets == {"args": b"'a b'"}
    osv = bundles.load(image_dir(tmp_path, v1("osv"), "osv.jvmkit"), verify=False)
    assert runtime_cmdline(osv.manifest.boot) == osv.manifest.boot.kernel_cmdline
    with_agent = parse_cmdline(runtime_cmdline(osv.manifest.boot, ["x"], agent=True)).commands
    assert with_agent == [list(osv.manifest.boot.cmdline.argv) + ["x"]]


def test_a_linux_image_from_before_q35_boots_on_pc():
    data = v1("linux")
    del data["boot"]["machine"]
    assert Manifest.from_json(data).boot.machine == "pc"


def test_unknown_keys_are_ignored():
    data = v1("linux")
    data["from_the_future"] = {"x": 1}
    data["boot"]["new_knob"] = True
    data["files"]["kernel"]["extra"] = "y"
    assert Manifest.from_json(data).to_json() == without_dropped(v1("linux"))


# ---- bad manifests: one line naming the field ------------------------------------------------------

def _set(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize("target,field,value,message", [
    ("linux", "files.kernel.size", "2441841", "manifest.files.kernel.size must be a whole number"),
    ("linux", "files.kernel.size", True, "manifest.files.kernel.size must be a whole number"),
    ("linux", "files.kernel.path", _DELETE, "manifest.files.kernel.path is missing"),
    ("linux", "defaults.memory_mib", 1.5, "manifest.defaults.memory_mib must be a whole number"),
    ("linux", "defaults", _DELETE, "manifest.defaults is missing"),
    ("linux", "app.class_path", "/app/app.jar", "manifest.app.class_path must be a list"),
    ("linux", "app.class_path", ["/app/app.jar", 3], "manifest.app.class_path[1] must be a string"),
    ("linux", "app.main_class", None, "manifest.app.main_class must be a string"),
    ("linux", "boot.kernel_cmdline", _DELETE, "manifest.boot.kernel_cmdline is missing"),
    ("linux", "boot", _DELETE, "manifest.boot is missing"),
    ("linux", "boot", "console=ttyS0", "manifest.boot must be an object"),
    ("linux", "files", [], "manifest.files must be an object"),
    ("osv", "boot.cmdline.env", ["JAVA_HOME=/jvm"], "manifest.boot.cmdline.env must be an object"),
    ("osv", "boot.acpi_shutdown", "yes", "manifest.boot.acpi_shutdown must be true or false"),
    ("osv", "kernel.has_balloon", 1, "manifest.kernel.has_balloon must be true or false"),
    ("osv", "files.disk.rofs_offset", "2097152", "manifest.files.disk.rofs_offset must be a whole number"),
    ("osv", "jdk.release", "17", "manifest.jdk.release must be a whole number"),
    ("osv", "target", "windows", "manifest.target 'windows' is not one of osv, linux"),
    ("osv", "target", _DELETE, "manifest.target None is not one of osv, linux"),
])
def test_wrong_types_and_missing_fields_name_the_field(target, field, value, message):
    data = _set(v1(target), field, value)
    with pytest.raises(ManifestError) as err:
        Manifest.from_json(data)
    assert err.value.message == message
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2


def test_decode_checks_a_single_section():
    with pytest.raises(ManifestError, match=r"^files\.disk\.sha256 is missing$"):
        decode(FileRecord, {"path": "disk.img", "size": 3}, "files.disk")
    assert decode(FileRecord, {"path": "d", "sha256": "ab", "size": 3}) == FileRecord("d", "ab", 3)


def test_format_and_shape_are_checked():
    with pytest.raises(ManifestError, match="format 2"):
        Manifest.from_json({**v1("linux"), "format": 2})
    with pytest.raises(ManifestError, match="must be a JSON object"):
        Manifest.from_json([v1("linux")])


def test_bundle_load_reports_a_bad_field_in_one_line(tmp_path):
    path = image_dir(tmp_path, _set(v1("osv"), "files.disk.size", "big"))
    with pytest.raises(UsageError) as err:
        bundles.load(path, verify=False)
    assert err.value.exit_code == 2
    assert err.value.message == (f"image {path} has an invalid manifest.json: "
                                 "manifest.files.disk.size must be a whole number")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content,message", [
    ("{not json", "has a corrupt manifest.json"),
    (json.dumps({**v1("linux"), "format": 7}), "has manifest format 7; this jvmkit reads format 1"),
])
def test_bundle_load_refuses_corrupt_and_foreign_manifests(tmp_path, content, message):
    path = tmp_path / "x.jvmkit"
    path.mkdir()
    (path / bundles.MANIFEST).write_text(content)
    with pytest.raises(UsageError, match=message) as err:
        bundles.load(path, verify=False)
    assert err.value.exit_code == 2


def test_bundle_load_refuses_missing_and_non_images(tmp_path):
    with pytest.raises(UsageError, match="does not exist") as err:
        bundles.load(tmp_path / "nope.jvmkit")
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="is not a jvmkit image"):
        bundles.load(tmp_path)


# ---- files must stay inside the bundle -------------------------------------------------------------

@pytest.mark.parametrize("escape", ["../outside.img", "/etc/hostname", "sub/../../outside.img", "", "link.img"])
def test_a_file_outside_the_bundle_is_refused(tmp_path, escape):
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"not yours")
    data = v1("osv")
    data["files"]["disk"]["path"] = escape
    path = image_dir(tmp_path, data)
    (path / "link.img").symlink_to(outside)  # a symlink inside the bundle to a file outside it
    for verify in (False, True):  # checked before any file is opened or hashed
        with pytest.raises(UsageError) as err:
            bundles.load(path, verify=verify)
        message = err.value.message  # the manifest's own check names the path; a symlink is caught on disk
        assert message.startswith(f"image {path}") and repr(escape) in message, message
        assert "points outside the image" in message or "is not a plain relative path inside the image" in message
        assert err.value.exit_code == 2


def test_a_file_inside_the_bundle_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "cache"))
    data = v1("osv")
    path = image_dir(tmp_path, data)
    (path / "sub").mkdir()
    for role, name in (("disk", "disk.img"), ("kernel", "sub/kernel.bin")):
        body = role.encode() * 10
        (path / name).write_bytes(body)
        data["files"][role] = {"path": name, "sha256": __import__("hashlib").sha256(body).hexdigest(),
                               "size": len(body)}
    (path / bundles.MANIFEST).write_text(json.dumps(data))
    image = bundles.load(path)
    assert os.path.realpath(image.file("disk")) == os.path.realpath(path / "disk.img")
    assert image.file("kernel").read_bytes() == b"kernel" * 10
