"""The linux target end to end: real pack, real QEMU (TCG here), real kernel, real JVM in the guest.

Every test here boots a guest (marked `vm`). Images are packed once per session through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support.images import pack_image
from support.servers import free_port, http_body_when_up

pytestmark = pytest.mark.vm

JVMKIT = [sys.executable, "-m", "jvmkit"]
BOOT_TIMEOUT = 180


def jvmkit(*args, timeout=BOOT_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


@pytest.fixture(scope="session")
def images(samples, tmp_path_factory) -> dict[str, Path]:
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    out = tmp_path_factory.mktemp("images")
    result = {}
    for name in ("hello", "httpd"):
        result[name] = pack_image(samples[name], out / f"{name}.jvmkit", "linux", "--memory", "384M")
    return result


def qemu_pids(name: str) -> set[int]:
    """QEMU processes of the VM called `name` (other guests may be running on this machine)."""
    out = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 -name {name} "], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 100000}"



def test_hello_output_only_and_status_zero(images):
    proc = jvmkit("run", images["hello"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello from jvmkit\n"
    assert "Linux version" not in proc.stderr and "jvmkit-init" not in proc.stderr  # the guest's own lines: --verbose


def test_the_accelerator_is_named_when_the_verdict_is_new_or_verbose(images, tmp_path):
    """The KVM verdict is cached per host kernel and QEMU: the first run in a cache says which
    accelerator it uses and why, later runs stay quiet unless --verbose."""
    env = {**os.environ, "JVMKIT_CACHE": str(tmp_path / "fresh-cache")}
    first = jvmkit("run", images["hello"], env=env)
    assert first.returncode == 0, first.stderr
    assert "using TCG" in first.stderr or "using KVM" in first.stderr
    again = jvmkit("run", images["hello"], env=env)
    assert again.returncode == 0 and again.stdout == "Hello from jvmkit\n"
    assert "using TCG" not in again.stderr and "using KVM" not in again.stderr
    verbose = jvmkit("run", "--verbose", images["hello"], env=env)
    assert "using TCG" in verbose.stderr or "using KVM" in verbose.stderr


def test_args_reach_main_and_exit_status(images):
    proc = jvmkit("run", images["hello"], "--", "3", "two words")
    assert proc.returncode == 3, proc.stderr
    assert "args: 3 two words" in proc.stdout


def test_uncaught_exception_exits_1(images):
    proc = jvmkit("run", images["hello"], "--", "throw")
    assert proc.returncode == 1
    assert 'Exception in thread "main"' in proc.stdout


def test_verbose_shows_kernel_messages_on_stderr(images):
    proc = jvmkit("run", "--verbose", images["hello"])
    assert proc.returncode == 0
    assert "Linux version" in proc.stderr and "jvmkit-init: starting java" in proc.stderr
    assert "Linux version" not in proc.stdout


def test_kvm_probe_verdict_is_honest(images):
    """On this machine /dev/kvm exists but cannot run guests: the probe must say so and use TCG.
    On a machine where KVM works, the same probe must choose it."""
    proc = jvmkit("doctor", "--json")
    import json

    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    verdict = checks["kvm"]["detail"]
    assert "aio=io_uring" in checks["io_uring"]["detail"]  # the OSv root disk's probe, usable or not
    run = jvmkit("run", "--verbose", images["hello"])  # a cached verdict is named with --verbose
    if os.path.exists("/dev/kvm") and "not usable" in verdict:
        assert "KVM is not usable" in run.stderr and "using TCG" in run.stderr
    elif "usable:" in verdict:
        assert "using KVM" in run.stderr


def test_publish_serves_http_from_the_host(images):
    port = free_port()
    proc = subprocess.Popen([*JVMKIT, "run", "--publish", f"{port}:8080", str(images["httpd"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        body = http_body_when_up(f"http://127.0.0.1:{port}/", BOOT_TIMEOUT)
        assert body == "hello from jvmkit httpd\n" or body.startswith("hello from jvmkit httpd")
        urllib.request.urlopen(f"http://127.0.0.1:{port}/exit?code=7", timeout=10).read()
        assert proc.wait(timeout=60) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_timeout_stops_a_guest_that_never_ends(images):
    name = unique("timeout")
    proc = jvmkit("run", "--name", name, "--timeout", "20", images["httpd"])
    assert proc.returncode == 124
    assert "--timeout" in proc.stderr
    assert not qemu_pids(name)


def test_ctrl_c_leaves_no_qemu_behind(images):
    name = unique("ctrlc")
    proc = subprocess.Popen([*JVMKIT, "run", "--name", name, str(images["httpd"])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline()  # the app is up
    assert "listening" in line
    assert qemu_pids(name), "a QEMU process should be running"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert not qemu_pids(name)


def test_sigkill_of_jvmkit_takes_qemu_down(images):
    name = unique("sigkill")
    proc = subprocess.Popen([*JVMKIT, "run", "--name", name, str(images["httpd"])], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, stdin=subprocess.DEVNULL)
    assert "listening" in proc.stdout.readline()
    assert qemu_pids(name)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and qemu_pids(name):
        time.sleep(0.2)
    assert not qemu_pids(name)


def test_ps_and_stop(images):
    name = f"stoptest-{os.getpid()}"
    proc = subprocess.Popen([*JVMKIT, "run", "--name", name, str(images["httpd"])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert "listening" in proc.stdout.readline()
        ps = jvmkit("ps")
        assert name in ps.stdout
        dup = jvmkit("run", "--name", name, images["hello"])
        assert dup.returncode == 2 and "already running" in dup.stderr
        assert jvmkit("stop", name).returncode == 0
        assert proc.wait(timeout=30) == 130
        assert name not in jvmkit("ps").stdout
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- bad input: one clear line, non-zero, no traceback -------------------------------------------

def one_line_error(proc):
    errors = [l for l in proc.stderr.splitlines() if l.startswith("jvmkit: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_truncated_image_is_refused(images, tmp_path):
    broken = tmp_path / "broken.jvmkit"
    shutil.copytree(images["hello"], broken)
    initrd = broken / "initramfs.cpio.zst"
    with open(initrd, "r+b") as handle:
        handle.truncate(initrd.stat().st_size // 2)
    proc = jvmkit("run", broken)
    assert proc.returncode != 0
    assert "truncated" in one_line_error(proc)


def test_corrupt_image_is_refused(images, tmp_path):
    broken = tmp_path / "corrupt.jvmkit"
    shutil.copytree(images["hello"], broken)
    kernel = broken / "vmlinux.zst"
    data = bytearray(kernel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    kernel.write_bytes(bytes(data))
    proc = jvmkit("run", broken)
    assert proc.returncode != 0 and "corrupt" in one_line_error(proc)


def test_missing_kernel_file_is_refused(images, tmp_path):
    broken = tmp_path / "nokernel.jvmkit"
    shutil.copytree(images["hello"], broken)
    (broken / "vmlinux.zst").unlink()
    proc = jvmkit("run", broken)
    assert proc.returncode != 0 and "vmlinux.zst is missing" in one_line_error(proc)


def test_unknown_machine_type_is_refused(images, tmp_path):
    odd = tmp_path / "odd.jvmkit"
    shutil.copytree(images["hello"], odd)
    manifest = json.loads((odd / "manifest.json").read_text())
    assert manifest["boot"]["machine"] == "q35"
    manifest["boot"]["machine"] = "virt,accel=kvm"
    (odd / "manifest.json").write_text(json.dumps(manifest))
    proc = jvmkit("run", odd)
    assert proc.returncode == 2 and "machine type 'virt,accel=kvm'" in one_line_error(proc)


def test_guest_too_small_for_the_initramfs_is_refused(images, tmp_path):
    small = tmp_path / "small.jvmkit"
    shutil.copytree(images["hello"], small)
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["defaults"]["memory_mib"] = 128
    (small / "manifest.json").write_text(json.dumps(manifest))
    proc = jvmkit("run", small)
    assert proc.returncode == 2 and "the image's default memory (128M) is too small" in one_line_error(proc)
    proc = jvmkit("run", "--memory", "192M", images["hello"])
    assert proc.returncode == 2 and "use --memory 256M" in one_line_error(proc)


def test_not_an_image(tmp_path):
    proc = jvmkit("run", tmp_path)
    assert proc.returncode == 2 and "not a jvmkit image" in one_line_error(proc)


def test_port_in_use_is_refused(images):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = jvmkit("run", "--publish", f"{port}:8080", images["httpd"])
    assert proc.returncode == 2 and f"127.0.0.1:{port}" in one_line_error(proc)


def test_unknown_accel_is_refused(images):
    proc = jvmkit("run", "--accel", "hvf", images["hello"])
    assert proc.returncode == 2 and "hvf" in proc.stderr and "Traceback" not in proc.stderr


def test_appcds_archive_is_used_in_the_guest(samples, tmp_path):
    image = tmp_path / "appcds.jvmkit"
    packed = jvmkit("pack", samples["hello"], "--target", "linux", "-o", image, "--appcds", "--train-timeout", "60",
                    "--jvm-arg=-Xshare:on", "--jvm-arg=-Xlog:class+load=info", timeout=900)
    assert packed.returncode == 0, packed.stderr
    proc = jvmkit("run", image)
    assert proc.returncode == 0, proc.stderr
    # -Xshare:on refuses to start with an unusable archive; the app's own class comes from it
    assert "hello.Hello source: shared objects file (top)" in proc.stdout
