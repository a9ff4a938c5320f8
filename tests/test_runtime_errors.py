"""jlink's failures as one line: a missing objcopy (binutils) is named with the package to install.

The jlink here is a stand-in script printing what the JDK's jlink prints when `--strip-debug` cannot
start objcopy (seen on a minimal Debian 12 without binutils); the real jlink is exercised by every
pack test."""

from __future__ import annotations

from pathlib import Path

import pytest

from jvmkit.errors import JvmkitError
from jvmkit.packager import runtime

pytestmark = pytest.mark.usefixtures("isolated_cache")  # a fresh cache and a console of its own

OBJCOPY_MISSING = ('Error: java.io.IOException: Cannot run program "objcopy": error=2, '
                   'No such file or directory\n')


def fake_jlink(tmp_path: Path, output: str, status: int) -> Path:
    script = tmp_path / "jlink"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {status}\n")
    script.chmod(0o755)
    return script


def spec() -> runtime.RuntimeSpec:
    return runtime.RuntimeSpec(jdk_home="/nonexistent", jdk_version="17.0.0", jdk_release=17,
                               modules=("java.base",), compress="zip", strip_debug=True)


def test_missing_objcopy_says_install_binutils(tmp_path):
    jlink = fake_jlink(tmp_path, OBJCOPY_MISSING, 1)
    with pytest.raises(JvmkitError) as err:
        runtime._build(spec(), jlink, tmp_path, tmp_path / "out")
    assert "objcopy" in err.value.message and err.value.hint == "apt-get install -y binutils"


def test_other_jlink_errors_keep_jlinks_own_line(tmp_path):
    jlink = fake_jlink(tmp_path, "Error: Module foo not found\n", 1)
    with pytest.raises(JvmkitError, match="jlink failed: Module foo not found"):
        runtime._build(spec(), jlink, tmp_path, tmp_path / "out")
