"""Apps whose jars name each other by absolute path, packed with `python -m jvmkit pack` and run in
real guests (QEMU, TCG here) on both targets: each dependency must load in the guest from where
jvmkit placed it, and the trimmed runtime must hold the modules only the dependencies use.

The app (tests/classpath_apps.py): app.jar -> lib/r.jar, /abs/b.jar (-> c.jar -> gone.jar;
-> file:sub/e.jar), /abs/missing.jar, /abs/classes/, file:/abs/with%20space/u.jar. It is built
under a short /tmp directory, because the guest class path carries the host paths and OSv's boot
command line holds 1023 bytes.

The `full` variant has the class directory entry too, which pack puts into the image file by file
(`AppSpec.files`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import classpath_apps
from support.vms import osv_kernel_path

pytestmark = pytest.mark.vm

JVMKIT = [sys.executable, "-m", "jvmkit"]
BOOT_TIMEOUT = 240


def jvmkit(*args, timeout=BOOT_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


OSV_KERNEL = osv_kernel_path()


@pytest.fixture(scope="module")
def chain():
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    root = Path(tempfile.mkdtemp(prefix="jcp", dir="/tmp"))
    try:
        yield classpath_apps.build_chain(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


TARGETS = [
    pytest.param("linux", id="linux"),
    pytest.param("osv", id="osv", marks=[pytest.mark.osv, pytest.mark.skipif(
        OSV_KERNEL is None, reason="no OSv kernel: set JVMKIT_OSV_KERNEL=/path/to/loader-stripped.elf")]),
]
VARIANTS = [
    pytest.param("jars", id="jars"),
    pytest.param("full", id="full"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target", TARGETS)
def test_absolute_class_path_app_runs_in_the_guest(chain, tmp_path, target, variant):
    jar = chain.app if variant == "full" else chain.app_jars_only
    image = tmp_path / f"chain-{target}.jvmkit"
    extra = ["--kernel", OSV_KERNEL] if target == "osv" else ["--memory", "384M"]
    packed = jvmkit("pack", jar, "--target", target, "-o", image, "--json", *extra, timeout=900)
    assert packed.returncode == 0, packed.stderr
    # the entries the JVM skips were named, once each
    warned = [line for line in packed.stderr.splitlines() if line.startswith("jvmkit: warning: skipping")]
    assert len(warned) == 2 and "'gone.jar'" in warned[0] and "missing.jar'" in warned[1], packed.stderr
    modules = json.loads(packed.stdout)["modules"]
    needed = set(classpath_apps.MODULES) - ({"java.xml"} if variant == "jars" else set())
    assert needed <= set(modules), modules

    run = jvmkit("run", image)
    assert run.returncode == 0, run.stderr + run.stdout
    out = classpath_apps.parse_output(run.stdout)
    names = set(classpath_apps.EXPECTED) - ({"d"} if variant == "jars" else set())
    for name in names:
        text, where = out[name]
        assert text == classpath_apps.EXPECTED[name], run.stdout
        # loaded from the image's copy, placed at /app/lib/host + the host path (r.jar: relative, /app/lib/)
        if name != "r":
            assert where.startswith("file:/app/lib/host/tmp/jcp"), run.stdout
    assert out["r"][1] == "file:/app/lib/r.jar"
    if variant == "jars":
        assert out["d"][0].startswith("failed java.lang.NoClassDefFoundError"), run.stdout
