"""Sizes, jvmkit.toml validation, profiles, the untrimmed runtime copy and the cache's atomic entries
(no VM, no JDK)."""

import hashlib
import json
import os
import time

from pathlib import Path

import pytest

from jvmkit import cache, config, profiles
from jvmkit.errors import UsageError
from jvmkit.units import parse_mib, parse_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,expected", [("512M", 512 * 2**20), ("1G", 2**30), ("2048", 2048 * 2**20),
                                           ("1.5GiB", 3 * 2**29), ("300MB", 300 * 2**20), ("4k", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "12Q"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text, "--memory")


def test_parse_mib():
    assert parse_mib("1G") == 1024


def write(tmp_path, text):
    path = tmp_path / "jvmkit.toml"
    path.write_text(text)
    return path


def test_config_unknown_key_names_file_and_line(tmp_path):
    path = write(tmp_path, 'main = "a.B"\n\nmemroy = "1G"\n')
    with pytest.raises(UsageError) as err:
        config.load_config(path)
    assert f"{path}:3" in err.value.message and "memroy" in err.value.message


def test_config_wrong_type_and_balloon_table(tmp_path):
    with pytest.raises(UsageError) as err:
        config.load_config(write(tmp_path, 'cpus = "two"\n'))
    assert ":1" in err.value.message and "whole number" in err.value.message
    with pytest.raises(UsageError) as err:
        config.load_config(write(tmp_path, 'cpus = 1\n[balloon]\nfloor = "1G"\n'))
    assert ":3" in err.value.message and "balloon.floor" in err.value.message
    with pytest.raises(UsageError) as err:
        config.load_config(write(tmp_path, 'ports = [8080, "x"]\n'))
    assert "ports" in err.value.message


def test_config_merge_flags_override(tmp_path, monkeypatch):
    write(tmp_path, 'jar = "build/app.jar"\nmain = "a.Main"\nmemory = "1G"\ntarget = "linux"\nargs = ["x"]\n')
    monkeypatch.chdir(tmp_path)
    req = config.pack_request({"memory_mib": 256})
    assert req.jar == tmp_path / "build/app.jar" and req.main == "a.Main"
    assert req.memory_mib == 256 and req.target == "linux" and req.app_args == ("x",)


def test_config_not_toml(tmp_path):
    with pytest.raises(UsageError) as err:
        config.load_config(write(tmp_path, "main = \n"))
    assert "not valid TOML" in err.value.message


def test_config_values_are_checked_where_they_are_written(tmp_path):
    """Ranges and choices as the flags have them, with the file and line (`cpus = 0` became 1)."""
    cases = {'cpus = 0\n': ":1: 'cpus' must be between 1 and 64, not 0",
             'main = "a.B"\ntarget = "windows"\n': ":2: 'target' must be one of osv, linux, not 'windows'",
             'memory = "lots"\n': ":1: 'memory' must be a size such as 512M or 2G, not 'lots'",
             'ports = [8080, 0]\n': ":1: every item of 'ports' must be between 1 and 65535, not 0",
             '[run]\ncpus = 2\ntimeout = 0\n': ":3: 'run.timeout' must be more than 0, not 0",
             '[balloon]\ninterval = 0.1\n': ":2: 'balloon.interval' must be at least 0.5, not 0.1",
             'run.memory = true\n': ":1: 'run.memory' must be a size such as 512M or 2G"}
    for text, message in cases.items():
        with pytest.raises(UsageError) as err:
            config.load_config(write(tmp_path, text))
        assert err.value.message == f"{tmp_path / 'jvmkit.toml'}{message}", text


def test_config_unknown_key_says_where_it_belongs(tmp_path):
    with pytest.raises(UsageError) as err:
        config.load_config(write(tmp_path, 'jar = "a.jar"\npublish = ["8080:8080"]\n'))
    assert ":2: unknown key 'publish'; `publish` belongs under [run]" in err.value.message
    with pytest.raises(UsageError) as err:
        config.load_config(write(tmp_path, '[run]\ncpu = 2\n'))
    assert ":2: unknown key 'run.cpu'; did you mean 'cpus'?" in err.value.message
    with pytest.raises(UsageError) as err:
        config.load_config(write(tmp_path, 'balloon = true\n'))
    assert "'balloon' must be a table ([balloon]); `balloon = ...` belongs under [run]" in err.value.message


def test_run_reads_its_tables_and_flags_win(tmp_path, monkeypatch):
    write(tmp_path, 'memory = "2G"\n[run]\nmemory = "768M"\npublish = ["8080:8080"]\naccel = "tcg"\n'
                    'balloon = true\n[balloon]\nmin_memory = 300\ninterval = 5\nlog = "logs/b.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    opts = config.run_options({}, None, args=("x",))
    assert (opts.memory_mib, opts.cpus, opts.publish, opts.accel) == (768, None, ("8080:8080",), "tcg")
    assert (opts.balloon, opts.min_memory_mib, opts.balloon_interval) == (True, 300, 5.0)
    assert opts.balloon_log == tmp_path / "logs" / "b.jsonl" and opts.args == ("x",) and not opts.jmx
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # --config FILE: paths stay relative to the file
    flagged = config.run_options({"memory_mib": 1024, "publish": ("9090:80",), "balloon_interval": 1.0},
                                 tmp_path / "jvmkit.toml")
    assert (flagged.memory_mib, flagged.publish, flagged.balloon_interval) == (1024, ("9090:80",), 1.0)
    assert flagged.balloon_log == tmp_path / "logs" / "b.jsonl" and flagged.args is None
    assert config.run_options({}).memory_mib is None  # no ./jvmkit.toml here: the image's defaults
    with pytest.raises(Exception):
        flagged.memory_mib = 1  # frozen


def test_pack_request_records_whether_memory_was_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not config.pack_request({"jar": tmp_path / "a.jar"}).memory_given
    write(tmp_path, 'jar = "a.jar"\nmemory = 1024\nadd_modules = ["java.sql,java.xml"]\nports = [8080]\n')
    req = config.pack_request({"add_modules": ()})
    assert (req.memory_mib, req.memory_given, req.add_modules, req.ports) == (1024, True, ("java.sql", "java.xml"),
                                                                               (8080,))
    assert config.pack_request({"add_modules": ("jdk.httpserver, java.sql",)}).add_modules == ("jdk.httpserver",
                                                                                                "java.sql")
    (tmp_path / "jvmkit.toml").unlink()
    with pytest.raises(UsageError) as err:
        config.pack_request({})
    assert err.value.message == "no JAR given" and "`jar = ...` in jvmkit.toml" in err.value.hint


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    return text[start:text.index("\n#", start + len(title))]


def test_readme_and_sample_toml_files_are_valid():
    block = _readme_section("## Build tools").split("```toml\n", 1)[1].split("```", 1)[0]
    assert "[run]" in block and "[balloon]" in block
    config.validate(__import__("tomllib").loads(block), block, Path("README.md"))
    for sample in sorted((ROOT / "samples").glob("*/jvmkit.toml")):
        config.load_config(sample)


def test_readme_cli_tables_name_every_option_and_its_toml_key():
    """The README's pack and run tables list each option with its jvmkit.toml key, as SETTINGS has them."""
    import re

    from jvmkit.settings import settings_for

    for command, title in (("pack", "### `jvmkit pack"), ("run", "### `jvmkit run")):
        rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in _readme_section(title).splitlines()
                if line.startswith("| ") and not line.startswith("| option")]
        table = [(set(re.findall(r"--[a-z][a-z-]*", row[0])), set(re.findall(r"`([a-z_.]+)`", row[1])))
                 for row in rows]
        listed_keys = set().union(*(keys for _, keys in table))
        for s in settings_for(command):
            if s.internal or s.argument:
                continue
            if not s.flags:
                assert s.key in listed_keys, (command, s.key)
                continue
            row = next((keys for flags, keys in table if s.option_name() in flags), None)
            assert row is not None, (command, s.option_name())
            assert (s.key in row) if s.key else True, (command, s.option_name(), s.key, row)
        known = {s.key for s in settings_for(command) if s.key}
        assert listed_keys <= known, listed_keys - known


def test_options_and_their_help_come_from_the_table():
    import click

    from jvmkit.cli import cli
    from jvmkit.settings import help_text, settings_for

    for command in ("pack", "run"):
        cmd = cli.commands[command]
        ctx = click.Context(cmd, info_name=command)
        options = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
        for s in settings_for(command):
            if s.flags:
                opts, text = options[s.dest].get_help_record(ctx)
                assert s.option_name() in opts and text.startswith(help_text(s)), (command, s.dest)
                assert f"[jvmkit.toml: {s.key}]" in text if s.key else "jvmkit.toml" not in text
        assert "JAR" in cmd.get_usage(ctx) if command == "pack" else "IMAGE" in cmd.get_usage(ctx)


def test_run_hands_the_balloon_settings_over(tmp_path, monkeypatch):
    """[balloon] and --balloon-* reach the host agent. The agent itself is replaced here: a balloon
    run boots a guest (tests/test_balloon_vm.py does); only the hand-over is checked."""
    from click.testing import CliRunner

    from jvmkit.balloon import host
    from jvmkit.cli import cli

    seen = {}

    class Handed(Exception):
        pass

    def fake(image, options, **kwargs):
        seen.update(image=image, options=options, **kwargs)
        raise Handed  # before run() leaves with os._exit

    monkeypatch.setattr(host, "run_with_balloon", fake)
    write(tmp_path, '[run]\nballoon = true\n[balloon]\nmin_memory = "300M"\nlog = "b.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", "--balloon-interval", "3", "app.jvmkit", "--", "a1"])
    assert isinstance(result.exception, Handed), result.output
    assert seen["min_memory_mib"] == 300 and seen["interval"] == 3.0 and seen["log_path"] == tmp_path / "b.jsonl"
    assert seen["options"].jmx and str(seen["image"]) == "app.jvmkit"


def test_pack_summary_says_which_modules_it_counts():
    from jvmkit.packager.pack import PackResult

    from types import SimpleNamespace

    manifest = SimpleNamespace(target="linux", jdk=SimpleNamespace(release=17, modules=("a",) * 9))
    result = PackResult(output=Path("a.jvmkit"), manifest=manifest, size=2**20, seconds=1.0, runtime_built=True)
    assert "java=17 runtime_modules=9" in result.summary()


def test_doctor_says_how_to_fix_kvm_not_that_tcg_is_used():
    from jvmkit.doctor import kvm_fix
    from jvmkit.vm import kvm

    reasons = [kvm.interpret(1, "Could not access KVM kernel module: Permission denied")[1],
               kvm.interpret(1, "Could not access KVM kernel module: No such file or directory")[1],
               kvm.interpret(1, "KVM internal error. Suberror: 1 emulation failure")[1],
               kvm.interpret_kernel("", "", ended=False)[1],
               "/dev/kvm does not exist"]
    fixes = [kvm_fix(r) for r in reasons]
    assert "kvm group" in fixes[0] and "/dev/kvm" in fixes[0]
    assert "modprobe kvm_intel" in fixes[1] and "kvm_amd" in fixes[4]
    assert all("nested virtualisation" in f for f in fixes[1:])
    assert not any("TCG" in f for f in fixes)
    assert kvm_fix("could not start qemu-system-x86_64: No such file or directory") is None  # nothing to suggest


def test_profiles_bundled_and_valid():
    names = set(profiles.available_profiles())
    assert {"minimal", "server", "full", "auto"} <= names
    for name in names:
        p = profiles.load_profile(name)
        assert p.jvm_flags()[0].startswith("-XX:+Use")
    assert profiles.load_profile("full").all_modules
    assert profiles.load_profile("minimal").modules == ("java.base",)
    assert profiles.load_profile("jdk").runtime == "copy"
    assert {profiles.load_profile(n).runtime for n in names - {"jdk"}} == {"jlink"}


def test_profile_errors(tmp_path):
    with pytest.raises(UsageError) as err:
        profiles.load_profile("tiny")
    assert "unknown profile 'tiny'" in err.value.message and "minimal" in err.value.message
    bad = tmp_path / "p.toml"
    bad.write_text('modules = ["java.base"]\n[jvm]\ngc = "epsilon"\n')
    with pytest.raises(UsageError) as err:
        profiles.load_profile(str(bad))
    assert "epsilon" in err.value.message
    bad.write_text('runtime = "docker"\n')
    with pytest.raises(UsageError) as err:
        profiles.load_profile(str(bad))
    assert "runtime 'docker' is not one of jlink, copy" in err.value.message


def test_untrimmed_runtime_is_the_jdk_copied_with_links_followed(tmp_path, monkeypatch):
    """The `jdk` profile's runtime: the JDK home as installed, links resolved, dangling ones left out
    (a fake JDK home here; the real one is copied by benchmarks/boot.py)."""
    from jvmkit.packager.runtime import RUNTIME_FORMAT, RuntimeSpec, ensure_runtime

    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "cache"))
    outside = tmp_path / "etc-java"
    outside.mkdir()
    (outside / "cacerts").write_bytes(b"certs")
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    (home / "lib" / "security").mkdir(parents=True)
    (home / "bin" / "java").write_text("#!/bin/sh\n")
    (home / "bin" / "java").chmod(0o755)
    (home / "release").write_text('JAVA_VERSION="17"\nMODULES="java.base java.xml"\n')
    (home / "lib" / "security" / "cacerts").symlink_to(outside / "cacerts")
    (home / "lib" / "src.zip").symlink_to(tmp_path / "missing.zip")
    (home / "conf").symlink_to(outside, target_is_directory=True)
    spec = RuntimeSpec(jdk_home=str(home), jdk_version="17.0.99", jdk_release=17, modules=("ALL-MODULE-PATH",),
                       compress="zip", strip_debug=True, cds=False, copy=True)
    runtime = ensure_runtime(spec, jlink=tmp_path / "no-jlink", jmods=tmp_path / "no-jmods")
    copied = runtime.path
    assert runtime.built_now and runtime.modules == ("java.base", "java.xml") and runtime.cds_archive is None
    assert not (copied / "lib" / "security" / "cacerts").is_symlink()
    assert (copied / "lib" / "security" / "cacerts").read_bytes() == b"certs"
    assert (copied / "conf").is_dir() and not (copied / "conf").is_symlink()
    assert not (copied / "lib" / "src.zip").exists() and not (copied / "lib" / "src.zip").is_symlink()
    assert os.access(copied / "bin" / "java", os.X_OK)
    trimmed = RuntimeSpec(**{**spec.__dict__, "copy": False})
    assert spec.key() != trimmed.key()
    # runtimes cached before the `copy` field existed keep their keys
    fields = {k: v for k, v in trimmed.__dict__.items() if k != "copy"}
    before = hashlib.sha256(json.dumps({"format": RUNTIME_FORMAT, **fields}, sort_keys=True).encode()).hexdigest()
    assert trimmed.key() == "jdk17-" + before[:16]


def test_cache_entry_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "c"))

    def failing(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.ensure_entry("runtimes", "k1", failing)
    assert not (tmp_path / "c" / "runtimes" / "k1").exists()
    assert [p.name for p in (tmp_path / "c" / "runtimes").iterdir() if not p.name.startswith(".k1.lock")] == []
    calls = []
    path, built = cache.ensure_entry("runtimes", "k1", lambda tmp: calls.append((tmp / "f").write_text("y")))
    assert built and (path / "f").read_text() == "y"
    path2, built2 = cache.ensure_entry("runtimes", "k1", lambda tmp: calls.append(1))
    assert path2 == path and not built2 and len(calls) == 1
    entries = cache.list_entries()
    assert [e.key for e in entries] == ["k1"]
    assert cache.prune(30) == []
    removed = cache.prune(0, now=time.time() + 1)
    assert [e.key for e in removed] == ["k1"] and not path.exists()


def test_bundle_check_hashes_a_file_once_until_it_changes(tmp_path, monkeypatch):
    """`run` verifies every image file; a file that matched once is not hashed again, but any write
    to it (a new ctime) brings the hash, and the refusal, back."""
    from jvmkit import fileio
    from jvmkit.errors import JvmkitError
    from jvmkit.packager import bundle
    from jvmkit.packager.manifest import FileRecord
    from jvmkit.packager.targets.base import BundleFiles
    from jvmkit.packager.targets.linux.target import LinuxBoot
    from support.images import manifest_for

    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "x.jvmkit"
    image.mkdir()
    (image / "disk.img").write_bytes(b"rofs" * 1000)
    record = FileRecord(path="disk.img", sha256=fileio.sha256_file(image / "disk.img"), size=4000)
    written = BundleFiles(files={"disk": record}, boot=LinuxBoot(kernel_cmdline="console=ttyS0"))
    bundle.write_manifest(image, manifest_for("linux", written))
    hashed = []
    real = bundle.sha256_file
    monkeypatch.setattr(bundle, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    bundle.load(image)
    bundle.load(image)
    assert hashed == ["disk.img"]
    time.sleep(0.01)
    (image / "disk.img").write_bytes(b"ROFS" * 1000)  # same size, other bytes
    with pytest.raises(JvmkitError) as err:
        bundle.load(image)
    assert "does not match its SHA-256" in err.value.message and hashed == ["disk.img", "disk.img"]
    assert [e.key for e in cache.list_entries() if e.kind == "verified"] == ["image checks"]


def test_cds_archive_is_mapped_at_its_base_only_where_the_flag_is_known():
    from jvmkit.packager.runtime import cds_mapping_flags

    fixed = ["-XX:+UnlockDiagnosticVMOptions", "-XX:ArchiveRelocationMode=0"]
    assert cds_mapping_flags(17, True) == fixed
    assert cds_mapping_flags(25, True) == fixed
    assert cds_mapping_flags(17, False) == []      # no archive (e.g. a copied JDK without one)
    assert cds_mapping_flags(11, True) == []       # before the flag existed
    assert cds_mapping_flags(99, True) == []       # not known to take it


def test_guest_class_path_puts_the_agent_first_for_a_launcher_archive():
    from jvmkit.packager.pack import guest_java_argv

    common = dict(main_class="app.Main", profile_flags=["-XX:+UseG1GC"], manifest_flags=[], user_jvm_args=[])
    plain = guest_java_argv(guest_class_path=["/app/app.jar"], launcher=True, **common)
    assert plain[plain.index("-cp") + 1] == "/app/app.jar:/jvmkit/agent.jar"
    assert plain[-2:] == ["io.jvmkit.agent.Launcher", "app.Main"]
    first = guest_java_argv(guest_class_path=["app/app.jar", "app/lib/x.jar"], launcher=True,
                            appcds_archive="/jvmkit/launcher.jsa", agent_first=True, **common)
    assert first[first.index("-cp") + 1] == "jvmkit/agent.jar:app/app.jar:app/lib/x.jar"
    assert "-XX:SharedArchiveFile=/jvmkit/launcher.jsa" in first


def test_launcher_archive_key_follows_what_the_jvm_checks():
    from jvmkit.packager.appcds import launcher_key

    base = dict(runtime_key="jdk17-aa", agent_key="agent-17-bb", jvm_flags=["-XX:+UseG1GC"], mtime=0)
    key = launcher_key(**base)
    assert key.startswith("launcher-") and key == launcher_key(**base)
    for change in ({"runtime_key": "jdk17-cc"}, {"agent_key": "agent-17-dd"}, {"jvm_flags": ["-XX:+UseSerialGC"]},
                   {"mtime": 1}):
        assert launcher_key(**{**base, **change}) != key


def test_profiles_raise_the_jit_thresholds_and_a_user_flag_comes_after():
    from jvmkit.packager.pack import guest_java_argv
    from jvmkit.profiles import load_profile

    for name in ("auto", "minimal", "server", "full"):
        assert "-XX:CompileThresholdScaling=5" in load_profile(name).jvm_flags()
    assert not any("CompileThresholdScaling" in f for f in load_profile("jdk").jvm_flags())  # as installed
    argv = guest_java_argv(main_class="Hello", guest_class_path=["/app/app.jar"],
                           profile_flags=load_profile("auto").jvm_flags(), manifest_flags=[],
                           user_jvm_args=["-XX:CompileThresholdScaling=1"], launcher=False)
    scaling = [a for a in argv if a.startswith("-XX:CompileThresholdScaling=")]
    assert scaling == ["-XX:CompileThresholdScaling=5", "-XX:CompileThresholdScaling=1"]  # HotSpot: the last wins


def test_profiles_start_the_heap_small_unless_the_user_sizes_it():
    from jvmkit.packager.pack import defer_heap_sizing
    from jvmkit.profiles import load_profile, parse_profile

    for name in ("auto", "minimal", "server", "full"):
        assert "-XX:InitialHeapSize=16m" in load_profile(name).jvm_flags()
    assert not any(f.startswith("-XX:InitialHeapSize") for f in load_profile("jdk").jvm_flags())  # as installed
    flags = ["-XX:+UseG1GC", "-XX:MaxRAMPercentage=75", "-XX:InitialHeapSize=16m"]
    assert defer_heap_sizing(flags, ["-Dx=1"]) == flags
    for user in (["-Xmx8m"], ["-Xms1g"], ["-XX:MaxHeapSize=12m"], ["-XX:InitialHeapSize=64m"]):
        assert defer_heap_sizing(flags, user) == flags[:2]
    with pytest.raises(UsageError, match="initial_heap_mib"):
        parse_profile("x", {"jvm": {"initial_heap_mib": 0}}, "x.toml")
    with pytest.raises(UsageError, match="initial_heap_mib"):
        parse_profile("x", {"jvm": {"initial_heap_mib": "16m"}}, "x.toml")
