"""`jvmkit pack` and Class-Path entries the JVM would skip, through the real CLI.

`jvmkit pack --strict-class-path` and the jvmkit.toml key `strict_class_path` (both passed on as
`jar.analyze(..., strict_class_path=True)`) make such an entry an error; by default it is skipped
with one warning.

The app is tests/classpath_apps.py's chain: two entries are missing (c.jar's `gone.jar`, the app
jar's /abs/missing.jar). Packs aim at an OSv kernel that does not exist: the class path is
analysed before the kernel is looked for, so a strict failure is the class path's, and a lenient
pack gets as far as the kernel (no QEMU, no network, no runtime to build).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import classpath_apps

JVMKIT = [sys.executable, "-m", "jvmkit"]


def jvmkit(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=cwd)



@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> classpath_apps.ChainApp:
    return classpath_apps.build_chain(tmp_path_factory.mktemp("chain"))


def class_path_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("jvmkit: warning: skipping")]


def test_lenient_by_default_one_warning_per_entry(chain, tmp_path):
    out = tmp_path / "app.jvmkit"
    proc = jvmkit("pack", chain.app, "--target", "osv", "--kernel", tmp_path / "no-kernel.elf", "-o", out)
    warned = class_path_warnings(proc.stderr)
    assert len(warned) == 2, proc.stderr
    assert f"'gone.jar' of {chain.abs / 'c.jar'}" in warned[0]
    assert f"'{chain.abs}/missing.jar' of {chain.app}" in warned[1]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jvmkit: error:")]
    assert len(errors) == 1 and "no-kernel.elf" in errors[0], proc.stderr  # got past the class path
    assert not out.exists()


def _one_line_class_path_error(proc, chain, out) -> None:
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jvmkit: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Class-Path entry 'gone.jar' of {chain.abs / 'c.jar'} is missing" in errors[0]
    assert not class_path_warnings(proc.stderr)
    assert not out.exists()


def test_strict_class_path_flag_makes_a_missing_entry_an_error(chain, tmp_path):
    out = tmp_path / "app.jvmkit"
    proc = jvmkit("pack", chain.app, "--strict-class-path", "--target", "osv",
                  "--kernel", tmp_path / "no-kernel.elf", "-o", out)
    _one_line_class_path_error(proc, chain, out)


def test_strict_class_path_in_jvmkit_toml(chain, tmp_path):
    out = tmp_path / "app.jvmkit"
    (tmp_path / "jvmkit.toml").write_text(f'jar = "{chain.app}"\nstrict_class_path = true\ntarget = "osv"\n'
                                          f'kernel = "{tmp_path / "no-kernel.elf"}"\noutput = "{out}"\n')
    _one_line_class_path_error(jvmkit("pack", cwd=tmp_path), chain, out)
