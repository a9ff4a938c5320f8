"""`jvmkit pack` through the real CLI: reproducibility, JSON output, and bad input.

Packs use the real JDK (jdeps, jlink, CDS) and the real Linux kernel from the test cache; no guest
is booted here, but the kernel pull needs the Debian mirror once per test cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JVMKIT = [sys.executable, "-m", "jvmkit"]
TEMURIN_25 = Path("/usr/lib/jvm/temurin-25-jdk-amd64")


def jvmkit(*args, env=None, timeout=900):
    return subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def one_line_error(proc) -> str:
    errors = [l for l in proc.stderr.splitlines() if l.startswith("jvmkit: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_same_inputs_same_bytes(samples, tmp_path):
    first, second = tmp_path / "a.jvmkit", tmp_path / "b" / "a.jvmkit"
    for out in (first, second):
        proc = jvmkit("pack", samples["multijar"], "--target", "linux", "-o", out, "--json")
        assert proc.returncode == 0, proc.stderr
    assert tree_digest(first) == tree_digest(second)


@pytest.mark.skipif(not (TEMURIN_25 / "bin" / "jlink").exists(), reason="needs Temurin 25 at " + str(TEMURIN_25))
def test_cold_caches_give_the_same_bytes_with_a_deterministic_cds_dump(samples, tmp_path, jvmkit_cache):
    """From an empty runtime cache, twice: JDK 25's CDS dump is deterministic, so the images are
    identical byte for byte. (JDK 17's -Xshare:dump is not; see README, Reproducibility.)"""
    images = []
    for name in ("one", "two"):
        cache = tmp_path / f"cache-{name}"
        cache.mkdir()
        if (jvmkit_cache / "kernels").exists():
            shutil.copytree(jvmkit_cache / "kernels", cache / "kernels")
        env = {**os.environ, "JVMKIT_CACHE": str(cache)}
        out = tmp_path / name / "hello.jvmkit"
        proc = jvmkit("pack", samples["hello"], "--target", "linux", "--jdk", TEMURIN_25, "-o", out, env=env)
        assert proc.returncode == 0, proc.stderr
        images.append(out)
    assert tree_digest(images[0]) == tree_digest(images[1])


def test_json_summary_and_quiet(samples, tmp_path):
    out = tmp_path / "hello.jvmkit"
    proc = jvmkit("pack", samples["hello"], "--target", "linux", "-o", out, "--json")
    data = json.loads(proc.stdout)
    assert data["image"] == str(out) and data["target"] == "linux" and "java.base" in data["modules"]
    assert data["manifest"]["app"]["main_class"] == "hello.Hello"
    written = json.loads((out / "manifest.json").read_text())
    assert written == data["manifest"]
    for gone in ("app_console", "quiet_append", "verbose_append", "seed_device", "console_filter"):
        assert gone not in written["boot"]  # keys no code read: no longer written
    quiet = jvmkit("pack", samples["hello"], "--target", "linux", "-o", out, "--force", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.startswith(str(out))
    inspect = jvmkit("inspect", out, "--json")
    assert json.loads(inspect.stdout)["target"] == "linux"


@pytest.mark.parametrize("jdk", [None, TEMURIN_25], ids=["build-jdk", "temurin-25"])
def test_guest_java_maps_the_cds_archive_at_its_base(samples, tmp_path, jvmkit_cache, jdk):
    """The image's java flags make the trimmed runtime map its CDS archive at the address it was
    dumped for, instead of at a random one with every pointer patched (see runtime.cds_mapping_flags);
    checked with the real runtime on the host, and against the JDK's default mapping."""
    if jdk is not None and not (jdk / "bin" / "jlink").exists():
        pytest.skip(f"needs a JDK at {jdk}")
    out = tmp_path / "hello.jvmkit"
    proc = jvmkit("pack", samples["hello"], "--target", "linux", "-o", out, "--json",
                  *(["--jdk", jdk] if jdk else []))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)["manifest"]
    argv = manifest["command"]["java"]
    assert "-XX:ArchiveRelocationMode=0" in argv
    flags = [a for a in argv[1:argv.index("-cp")] if a.startswith("-XX:")]
    java = jvmkit_cache / "runtimes" / manifest["jdk"]["runtime_key"] / "runtime" / "bin" / "java"

    def mapped_base(*extra):
        run = subprocess.run([java, *flags, *extra, "-Xshare:on", "-Xlog:cds=info", "-version"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        line = next(l for l in run.stdout.splitlines() if "Mapped static  region #0" in l)
        return int(line.split(" at base ")[1].split()[0], 16)

    assert mapped_base() & ~0xFFFF == 0x800000000                                  # SharedBaseAddress
    assert mapped_base("-XX:ArchiveRelocationMode=1") & ~0xFFFF != 0x800000000     # the JDK's default


def test_list_profiles():
    proc = jvmkit("pack", "--list-profiles")
    assert proc.returncode == 0
    for name in ("auto", "minimal", "server", "full", "jdk"):
        assert name in proc.stdout


def test_existing_output_needs_force(samples, tmp_path):
    out = tmp_path / "exists.jvmkit"
    out.mkdir()
    (out / "keep").write_text("mine")
    proc = jvmkit("pack", samples["hello"], "--target", "linux", "-o", out)
    assert proc.returncode == 2 and "--force" in one_line_error(proc)
    assert (out / "keep").read_text() == "mine"


def test_unknown_profile(samples, tmp_path):
    proc = jvmkit("pack", samples["hello"], "--target", "linux", "-o", tmp_path / "x.jvmkit", "--profile", "tiny")
    assert proc.returncode == 2 and "unknown profile 'tiny'" in one_line_error(proc)


def test_jlink_failure_is_translated(samples, tmp_path):
    profile = tmp_path / "broken.toml"
    profile.write_text('modules = ["java.base", "no.such.module"]\nadd_jdeps_modules = false\n')
    out = tmp_path / "x.jvmkit"
    proc = jvmkit("pack", samples["hello"], "--target", "linux", "-o", out, "--profile", profile)
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "jlink failed" in line and "no.such.module" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.jvmkit")]


def test_not_a_jar(tmp_path):
    bogus = tmp_path / "app.jar"
    bogus.write_text("not a zip")
    proc = jvmkit("pack", bogus, "--target", "linux", "-o", tmp_path / "x.jvmkit")
    assert proc.returncode == 2 and str(bogus) in one_line_error(proc)
    missing = jvmkit("pack", tmp_path / "nope.jar", "--target", "linux")
    assert missing.returncode == 2 and "nope.jar" in one_line_error(missing)


def test_full_disk_leaves_nothing_behind(samples, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs for a full disk")
    try:
        proc = jvmkit("pack", samples["hello"], "--target", "linux", "-o", mnt / "hello.jvmkit")
        assert proc.returncode == 1
        assert "no space left" in one_line_error(proc)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_linux_guest_memory_must_hold_the_initramfs(samples, tmp_path):
    """A guest too small to unpack its initramfs would fail later with missing files: pack refuses
    an explicit --memory below the minimum and raises the default one (with a notice)."""
    from jvmkit.errors import UsageError
    from jvmkit.packager import targets
    from jvmkit.packager.manifest import FileRecord
    from jvmkit.packager.pack import PackRequest, default_memory
    from jvmkit.packager.targets.linux.initramfs import min_memory_mib

    assert min_memory_mib(57 << 20) == 256     # hello: boots at 256M
    assert min_memory_mib(276 << 20) == 960    # the whole JDK: 832M failed, 896M booted
    raw = 276 << 20
    initramfs = FileRecord(path="initramfs.cpio.zst", sha256="0" * 64, size=1 << 20, compression="zstd",
                           raw_sha256="1" * 64, raw_size=raw)
    floor = targets.get("linux").memory_floor({"initramfs": initramfs})
    assert floor.mib == 960 and "276 MiB" in floor.reason
    image = Path("a.jvmkit")
    assert default_memory(PackRequest(jar=Path("a.jar"), memory_mib=512), floor, image) == 960
    assert default_memory(PackRequest(jar=Path("a.jar"), memory_mib=1024, memory_given=True), floor, image) == 1024
    with pytest.raises(UsageError) as err:
        default_memory(PackRequest(jar=Path("a.jar"), memory_mib=512, memory_given=True), floor, image)
    assert "--memory 512M is too small" in err.value.message and "960M" in err.value.hint
    out = tmp_path / "small.jvmkit"
    proc = jvmkit("pack", samples["hello"], "--target", "linux", "-o", out, "--memory", "128M")
    assert proc.returncode == 2 and "use --memory 256M or more" in one_line_error(proc)
    assert not out.exists() and not list(tmp_path.glob(".small.jvmkit.*"))


def test_untrimmed_profile_needs_no_jmods(samples, tmp_path):
    """`--profile jdk` copies the JDK as installed, so a JDK without jmods will do; the trimmed
    profiles still say what to install. The JDK here is the build JDK without its jmods/ (links)."""
    real = Path(os.path.realpath(shutil.which("javac"))).parents[1]
    home = tmp_path / "jdk-without-jmods"
    home.mkdir()
    for entry in sorted(real.iterdir()):
        if entry.name != "jmods" and os.path.exists(entry):
            (home / entry.name).symlink_to(entry)
    trimmed = jvmkit("pack", samples["hello"], "--target", "linux", "--jdk", home, "-o", tmp_path / "t.jvmkit")
    assert trimmed.returncode != 0 and "has no jmods" in one_line_error(trimmed)
    proc = jvmkit("pack", samples["hello"], "--target", "linux", "--jdk", home, "--profile", "jdk", "-q",
                  "-o", tmp_path / "u.jvmkit")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "u.jvmkit" / "manifest.json").read_text())
    assert manifest["jdk"]["profile"]["runtime"] == "copy" and "jdk.compiler" in manifest["jdk"]["modules"]
    from jvmkit.packager.targets.linux.initramfs import min_memory_mib

    raw = manifest["files"]["initramfs"]["raw_size"]
    assert manifest["defaults"]["memory_mib"] == min_memory_mib(raw) > 512  # raised for the large initramfs


def test_jlink_progress_counts_roots_and_the_runtime(tmp_path, monkeypatch, capsys):
    """jlink's line says how many root modules it was given and how many the runtime got (the
    count the pack summary shows as runtime_modules=); a real jlink of java.logging (+ java.base)."""
    from jvmkit import jdk as jdks, ui
    from jvmkit.packager.runtime import RuntimeSpec, ensure_runtime

    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "cache"))
    jdk = jdks.find_jdk(None)
    spec = RuntimeSpec(jdk_home=str(jdk.home), jdk_version=jdk.version, jdk_release=jdk.release,
                       modules=("java.logging",), compress="zip", strip_debug=True, cds=False)
    monkeypatch.setattr(ui, "_current", ui.Console())  # not ui.configure(): that would outlive the test
    runtime = ensure_runtime(spec, jdk.jlink, jdk.jmods)
    assert runtime.modules == ("java.base", "java.logging")
    err = capsys.readouterr().err
    assert f"jlink: 1 root module from JDK {jdk.version}" in err
    assert "jlink: 1 root module -> 2 in the runtime, done in" in err
    assert "module(s)" not in err


def test_run_takes_memory_from_jvmkit_toml(samples, tmp_path):
    """`jvmkit run` reads ./jvmkit.toml's [run] table: a too small `memory` there is refused before
    QEMU starts, as --memory is (no guest boots); a flag overrides the file."""
    image = tmp_path / "hello.jvmkit"
    packed = jvmkit("pack", samples["hello"], "--target", "linux", "-o", image, "-q")
    assert packed.returncode == 0, packed.stderr
    work = tmp_path / "project"
    work.mkdir()
    (work / "jvmkit.toml").write_text('memory = "1G"\n[run]\nmemory = "32M"\n')
    proc = subprocess.run([*JVMKIT, "run", str(image)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, cwd=work)
    assert proc.returncode == 2 and "32M is too small" in one_line_error(proc)
    proc = subprocess.run([*JVMKIT, "run", "--config", str(work / "jvmkit.toml"), "--memory", "16M", str(image)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 2 and "16M is too small" in one_line_error(proc)
