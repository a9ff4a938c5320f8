"""Property-based tests (hypothesis) of what an image from someone else reaches: the manifest
loader, bundle.load, `inspect`'s rendering, the zstd unpacking of `run`, and the QEMU argv built
from a manifest.

Every hostile or corrupt input gives a result or one `UsageError` (exit status 2), never another
exception; no file is written outside the cache; and whatever a manifest or `run`'s arguments
hold, QEMU's argv has the same options: app arguments and JVM flags reach the guest only inside
`-append` or an fw_cfg file, and option values are escaped (QEMU splits them on commas). No VM.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jvmkit import fileio
from jvmkit.cli import describe_manifest
from jvmkit.errors import UsageError
from jvmkit.packager import bundle as bundles
from jvmkit.packager import targets
from jvmkit.packager.manifest import Manifest, ManifestError
from jvmkit.packager.targets.base import BootRequest
from jvmkit.vm import runner
from jvmkit.vm.qemu import Confinement, NetDev, PortForward, VmConfig, qemu_argv

def fuzz(n: int):
    return settings(max_examples=n, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
H = "ab" * 32

COMMON = {
    "format": 1, "name": "probe", "created_by": "jvmkit 0.1", "source_date_epoch": 0,
    "app": {"jar": "probe.jar", "main_class": "p.Main", "class_path": ["/app/app.jar"], "jar_sha256": H,
            "args": [], "add_opens": ["java.base/java.lang=ALL-UNNAMED"]},
    "jdk": {"version": "17.0.15", "release": 17, "modules": ["java.base"], "cds": True,
            "profile": {"name": "auto", "flags": ["-XX:CompileThresholdScaling=5"], "gc": "g1"}},
    "agent": {"path": "/jvmkit/agent.jar", "key": "k1"},
    "kernel": {"name": "linux", "version": "6.1", "sha256": H, "target": "linux", "package": "linux-image"},
    "command": {"java": ["/jvm/bin/java", "-cp", "/app/app.jar:/jvmkit/agent.jar", "p.Main"], "args": ["a"],
                "agent_flags": ["-javaagent:/jvmkit/agent.jar"]},
    "defaults": {"memory_mib": 256, "cpus": 1},
    "guest": {"ports": [8080], "jmx_port": 7091},
}
LINUX = {**COMMON, "target": "linux",
         "files": {"kernel": {"path": "vmlinux.zst", "sha256": H, "size": 10, "compression": "zstd",
                              "raw_sha256": H, "raw_size": 20},
                   "initramfs": {"path": "initramfs.cpio.zst", "sha256": H, "size": 10, "compression": "zstd",
                                 "raw_sha256": H, "raw_size": 20}},
         "boot": {"kernel_cmdline": "console=ttyS0 panic=-1 rdinit=/init swiotlb=noforce", "exit_marker": "jvmkit-exit=",
                  "seed_fw_cfg": "opt/io.jvmkit/seed", "args_fw_cfg": "opt/io.jvmkit/args", "machine": "q35"}}
OSV = {**COMMON, "target": "osv",
       "kernel": {"name": "osv", "version": "v0.57", "sha256": H, "target": "osv", "has_balloon": True},
       "files": {"kernel": {"path": "kernel.zst", "sha256": H, "size": 10, "compression": "zstd",
                            "raw_sha256": H, "raw_size": 20},
                 "disk": {"path": "disk.img.zst", "sha256": H, "size": 10, "compression": "zstd", "raw_sha256": H,
                          "raw_size": 4096, "rofs_offset": 1024, "rofs_size": 2048}},
       "boot": {"kernel_cmdline": "--rootfs=rofs --verbose /jvm/bin/java -cp app/app.jar p.Main",
                "cmdline": {"argv": ["/jvm/bin/java", "-Djvmkit.seed=/dev/vblk1", "-javaagent:/jvmkit/agent.jar", "-cp",
                                     "jvmkit/agent.jar:app/app.jar", "io.jvmkit.agent.Launcher", "p.Main"],
                            "agent_flags": ["-Djvmkit.seed=/dev/vblk1", "-javaagent:/jvmkit/agent.jar"], "args": [],
                            "env": {"JAVA_HOME": "/jvm"}, "options": ["--power-off-on-abort", "--verbose"],
                            "rootfs": "rofs"},
                "exit_marker": "program exited with status ", "acpi_shutdown": True, "machine": "pc",
                "libraries": ["libz.so.1"]}}
SEEDS = {"linux": LINUX, "osv": OSV}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)
HOSTILE_TEXT = st.sampled_from(["", "..", "../../etc/passwd", "/etc/shadow", "a,b", "x,file=/etc/shadow",
                                "opt/a,file=/etc/shadow", "-device e1000", "pc,accel=kvm", "\n", "q35\0",
                                "é", "a" * 70000, "${x}", "; reboot", "GG" * 32])


def _paths(data, prefix=()):
    """Every path (tuple of keys/indices) into JSON-shaped data."""
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_manifest(draw):
    target = draw(st.sampled_from(sorted(SEEDS)))
    data = copy.deepcopy(SEEDS[target])
    paths = [p for p in _paths(data) if p]
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(paths))
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(json_values | HOSTILE_TEXT)
        except (KeyError, IndexError, TypeError):
            pass
    return data


def load_or_refuse(data):
    """Manifest.from_json must give a Manifest or a ManifestError, nothing else."""
    try:
        return Manifest.from_json(data)
    except ManifestError:
        return None


def test_the_seeds_are_valid_manifests():
    for name, data in SEEDS.items():
        assert Manifest.from_json(copy.deepcopy(data)).target == name


@fuzz(1000)
@given(mutated_manifest())
def test_mutated_manifests_load_or_are_refused_and_render(data):
    manifest = load_or_refuse(data)
    if manifest is None:
        return
    describe_manifest(bundles.Bundle(Path("/images/x.jvmkit"), manifest))  # what inspect prints
    json.dumps(manifest.to_json())                                         # inspect --json
    for role in manifest.files:                                            # cache keys
        assert re.fullmatch(r"[a-z][a-z0-9_-]*", role)


@fuzz(400)
@given(json_values)
def test_random_json_is_refused(data):
    assert load_or_refuse(data) is None or isinstance(data, dict)


@fuzz(300)
@given(st.one_of(st.binary(max_size=300),
                 mutated_manifest().map(lambda d: json.dumps(d).encode()),
                 st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                 st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)))
def test_bundle_load_of_any_manifest_bytes(raw):
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "x.jvmkit"
        image.mkdir()
        (image / "manifest.json").write_bytes(raw)
        try:
            bundles.load(image, verify=False)
        except UsageError:
            pass


def test_a_huge_manifest_is_refused_before_it_is_read(tmp_path):
    image = tmp_path / "x.jvmkit"
    image.mkdir()
    with open(image / "manifest.json", "wb") as out:
        out.truncate(64 << 20)
    with pytest.raises(UsageError, match="more than 4 MiB"):
        bundles.load(image)


# ---- the argv: nothing of a manifest or of run's arguments becomes a QEMU option -----------------

VALUE_OPTS = {"-name", "-machine", "-accel", "-cpu", "-smp", "-m", "-kernel", "-append", "-initrd", "-drive",
              "-device", "-chardev", "-serial", "-qmp", "-netdev", "-fw_cfg", "-sandbox", "-runas", "-chroot",
              "-display"}
FLAG_OPTS = {"-nodefaults", "-no-user-config", "-no-reboot"}


def options_of(argv: list[str]) -> list[tuple[str, str | None]]:
    """QEMU's reading of an argv: (option, value) pairs; fails on anything that is not an option."""
    out, i = [], 1
    while i < len(argv):
        opt = argv[i]
        assert opt in VALUE_OPTS | FLAG_OPTS, f"argv word {opt!r} would be read as an option"
        if opt in FLAG_OPTS:
            out.append((opt, None))
            i += 1
        else:
            out.append((opt, argv[i + 1]))
            i += 2
    return out


def split_opts(value: str) -> list[str]:
    """QEMU's QemuOpts split: on single commas; a doubled comma is a literal one."""
    return [part.replace("\0", ",") for part in value.replace(",,", "\0").split(",")]


printable = st.text(alphabet=st.sampled_from(list("a-=,; \"'/\\x$%0:.")), max_size=40)


@st.composite
def hostile_valid_manifest(draw):
    """A manifest that loads but whose free-text fields are hostile: the kernel command line, the
    guest's java words and OSv's command-line parts full of commas, dashes, quotes and spaces."""
    target = draw(st.sampled_from(sorted(SEEDS)))
    data = copy.deepcopy(SEEDS[target])
    data["name"] = draw(printable | st.just("x,y"))
    data["boot"]["kernel_cmdline"] = draw(printable)
    data["command"]["java"] = ["/jvm/bin/java", *draw(st.lists(printable, max_size=4))]
    if target == "osv":
        c = data["boot"]["cmdline"]
        c["argv"] = [*c["argv"], *draw(st.lists(printable, max_size=4))]
        c["args"] = draw(st.lists(printable, max_size=3))
        c["options"] = [*c["options"], *draw(st.lists(printable.map(lambda t: "--" + t), max_size=2))]
        c["env"] = draw(st.dictionaries(st.sampled_from(["A", "B_1"]), printable, max_size=2))
    return data


args_text = st.lists(st.text(alphabet=st.sampled_from(list("a-=,; \"'/\\x$%0")), max_size=12) | HOSTILE_TEXT,
                     max_size=5)
cache_dirs = st.sampled_from(["/cache/boot", "/tmp/a,b/boot", "/tmp/x,file=/etc/shadow/boot", "/c,,d"])


@fuzz(800)
@given(hostile_valid_manifest() | mutated_manifest(), st.none() | args_text, cache_dirs, st.booleans())
def test_argv_has_the_same_options_whatever_the_manifest_and_args(data, args, cache_dir, seed):
    manifest = load_or_refuse(data)
    if manifest is None:
        return
    target = targets.get(manifest.target)
    try:
        from jvmkit.packager import manifest_limits

        manifest_limits.check_bootable(manifest, target)
    except UsageError:
        return
    files = {role: Path(cache_dir) / role / "file" for role in manifest.files}
    run_dir = Path(cache_dir).parent / "run" / "vm-1"
    request = BootRequest(args=tuple(args) if args is not None else None, seed=b"jmx.password=s3cret\n" if seed else None)
    try:
        plan = target.boot_plan(manifest, files, request, lambda name, data: run_dir / name)
    except UsageError:
        return  # e.g. a non-ASCII argument for OSv: refused in one line
    config = VmConfig(name="vm-1", kernel=plan.kernel, initrd=plan.initrd, disk=plan.disk, append=plan.append,
                      memory_mib=256, cpus=1, accel="tcg", qmp_socket=run_dir / "qmp.sock",
                      console_log=run_dir / "console.log", fw_cfg=plan.fw_cfg, data_disks=plan.data_disks,
                      machine=plan.machine, app_serial=plan.app_serial, console_stdio=plan.console_stdio,
                      ports=(PortForward("127.0.0.1", 8080, 80),), netdev=NetDev("user"),
                      confinement=Confinement(seccomp=True, runas=(2046820352, 2046820352), chroot=run_dir / "root"))
    argv = qemu_argv(config)
    opts = options_of(argv)
    names = [o for o, _ in opts]
    assert names.count("-append") == 1 and names.count("-kernel") == 1 and names.count("-netdev") == 1
    assert set(names) <= VALUE_OPTS | FLAG_OPTS
    for opt, value in opts:
        if opt in ("-drive", "-fw_cfg", "-chardev", "-netdev", "-qmp", "-sandbox"):
            keys = [part.split("=", 1)[0] for part in split_opts(value)[1 if opt in ("-chardev", "-netdev", "-qmp", "-sandbox") else 0:]]
            allowed = {"-drive": {"file", "if", "id", "format", "readonly", "cache", "aio"},
                       "-fw_cfg": {"name", "file"}, "-chardev": {"id", "path", "signal", "logfile"},
                       "-netdev": {"id", "ipv6", "hostfwd", "restrict"}, "-qmp": {"server", "wait"},
                       "-sandbox": {"obsolete", "elevateprivileges", "spawn", "resourcecontrol"}}[opt]
            assert set(keys) <= allowed, f"{opt} {value!r} has options {keys}"
        if opt == "-drive":
            assert "readonly=on" in split_opts(value)
    for word in request.args or ():
        if len(word) >= 4 and word not in cache_dir:  # short words may appear by chance (e.g. "/jvm")
            assert not any(word in value for opt, value in opts if opt not in ("-append", "-name") and value), word
    assert not any("s3cret" in word for word in argv)


# ---- zstd: the boot files run unpacks --------------------------------------------------------------

PAYLOAD = b"kernel image " * 300
GOOD = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(PAYLOAD)


@st.composite
def hostile_stream(draw):
    kind = draw(st.sampled_from(["mutated", "random", "bomb", "honest", "lying-size", "lying-digest"]))
    raw_size, raw_sha = len(PAYLOAD), fileio.sha256_bytes(PAYLOAD)
    data = GOOD
    if kind == "mutated":
        buf = bytearray(GOOD)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(0, 255)), min_size=1,
                                        max_size=6)):
            buf[pos] = value
        data = bytes(buf[:draw(st.integers(0, len(buf)))])
    elif kind == "random":
        data = draw(st.binary(max_size=500))
    elif kind == "bomb":  # decompresses far beyond what the manifest says
        data = zstandard.ZstdCompressor(level=1).compress(bytes(draw(st.integers(1 << 20, 8 << 20))))
    elif kind == "lying-size":
        raw_size = draw(st.integers(0, 1 << 20))
    elif kind == "lying-digest":
        raw_sha = draw(st.sampled_from(["0" * 64, H]))
    return kind, data, raw_size, raw_sha


@contextlib.contextmanager
def _cache(path: Path):
    old = os.environ.get("JVMKIT_CACHE")
    os.environ["JVMKIT_CACHE"] = str(path)
    try:
        yield
    finally:
        os.environ["JVMKIT_CACHE"] = old if old is not None else ""


@settings(max_examples=200, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_stream())
def test_zstd_unpacking_of_hostile_streams(stream):
    kind, data, raw_size, raw_sha = stream
    with tempfile.TemporaryDirectory() as tmp, _cache(Path(tmp) / "cache"):
        root = Path(tmp)
        image = root / "x.jvmkit"
        image.mkdir()
        (image / "vmlinux.zst").write_bytes(data)
        record = {"path": "vmlinux.zst", "sha256": fileio.sha256_bytes(data), "size": len(data),
                  "compression": "zstd", "raw_sha256": raw_sha, "raw_size": raw_size}
        manifest = Manifest.from_json({**LINUX, "files": {"kernel": record, "initramfs": {**record}}})
        b = bundles.Bundle(image, manifest)
        try:
            files = runner.prepare_boot_files(b)
        except UsageError:
            assert kind != "honest"
            files = {}
        else:
            assert kind in ("honest", "mutated")
            for path in files.values():
                assert path.read_bytes() == PAYLOAD and (path.stat().st_mode & 0o777) == 0o444
        outside = {p for p in root.rglob("*")} - {image, image / "vmlinux.zst"}
        assert all(str(p).startswith(str(root / "cache")) for p in outside)
        boot = root / "cache" / "boot"
        entries = [p.name for p in boot.iterdir() if not p.name.startswith(".")] if boot.exists() else []
        assert all(re.fullmatch(r"(kernel|initramfs)-[0-9a-f]{24}", e) for e in entries)
        if kind != "honest":
            assert all(fileio.sha256_file(boot / e / "file") == fileio.sha256_bytes(PAYLOAD) for e in entries)
