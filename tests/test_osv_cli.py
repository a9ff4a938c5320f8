"""The OSv target through the CLI, as a user runs it: `jvmkit pack --target osv` of the samples and
`jvmkit run` under real QEMU (TCG here) with a real OSv kernel and a real JVM in the guest.

Runs only when an OSv kernel is available (JVMKIT_OSV_KERNEL=path, or one in the user's jvmkit
cache); images are packed with `--kernel PATH`, so the tests' own cache needs none.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from support.images import pack_image
from support.servers import free_port, http_body_when_up
from support.vms import require_osv_kernel

pytestmark = [pytest.mark.vm, pytest.mark.osv]

JVMKIT = [sys.executable, "-m", "jvmkit"]
BOOT_TIMEOUT = 180


KERNEL = require_osv_kernel("OSv CLI tests")  # the user's cache, read before the tests switch caches


def jvmkit(*args, timeout=BOOT_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)



@pytest.fixture(scope="module")
def osv_images(samples, jvmkit_cache, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("osv-images")
    images = {}
    for name, jar, extra in (("hello", samples["hello"], ()), ("httpd", samples["httpd"], ()),
                             ("multijar", samples["multijar"], ()),
                             ("hello-classlog", samples["hello"], ("--jvm-arg=-Xlog:class+load=info",))):
        images[name] = pack_image(jar, out / f"{name}.jvmkit", "osv", "--kernel", KERNEL, "--json", *extra)
    return images


def test_hello_runs_through_the_launcher_with_its_cds_archive(osv_images):
    manifest = json.loads((osv_images["hello"] / "manifest.json").read_text())
    argv = manifest["boot"]["cmdline"]["argv"]
    for gone in ("app_console", "quiet_append", "verbose_append", "seed_device", "console_filter"):
        assert gone not in manifest["boot"]  # keys no code read: no longer written
    # the command section shows the seed device the guest really reads
    assert manifest["command"]["agent_flags"] == ["-Djvmkit.seed=/dev/vblk1", "-javaagent:/jvmkit/agent.jar"]
    assert manifest["jdk"]["launcher_cds"] == "/jvmkit/launcher.jsa"
    assert "-XX:SharedArchiveFile=/jvmkit/launcher.jsa" in argv
    assert argv[argv.index("-cp") + 1] == "jvmkit/agent.jar:app/app.jar"   # as the archive was written
    proc = jvmkit("run", osv_images["hello"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello from jvmkit\n"
    assert jvmkit("run", osv_images["hello"], "--", "3", "two words").returncode == 3
    thrown = jvmkit("run", osv_images["hello"], "--", "throw")
    assert thrown.returncode == 1 and 'Exception in thread "main"' in thrown.stdout + thrown.stderr


def test_the_launcher_archive_is_mapped_in_the_guest(osv_images):
    """The guest JVM takes the Launcher from the archive (-Xlog:class+load says `(top)`), so the
    relative class path and the files' times in the ROFS match what the host training wrote."""
    proc = jvmkit("run", osv_images["hello-classlog"])
    assert proc.returncode == 0, proc.stderr
    launcher = [l for l in proc.stdout.splitlines() if "io.jvmkit.agent.Launcher " in l]
    assert launcher and "shared objects file (top)" in launcher[0], proc.stdout[-2000:]
    assert "Hello from jvmkit" in proc.stdout


def test_multijar_sample(osv_images):
    proc = jvmkit("run", osv_images["multijar"])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cities"] == 20 and report["northernmost"] == "Reykjavík"


def test_publish_serves_http_from_the_host(osv_images):
    port = free_port()
    proc = subprocess.Popen([*JVMKIT, "run", "--publish", f"{port}:8080", str(osv_images["httpd"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        body = http_body_when_up(f"http://127.0.0.1:{port}/", BOOT_TIMEOUT)
        assert body is not None and body.startswith("hello from jvmkit httpd")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/exit?code=7", timeout=10).read()
        except (OSError, http.client.HTTPException):
            pass  # OSv powers off at System.exit at once: the reply's last bytes may not leave the guest
        assert proc.wait(timeout=60) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
