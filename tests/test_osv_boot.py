"""Boots real OSv under QEMU (TCG): a jlink'd runtime with CDS, the guest agent's launcher and a small
app, in a bundle written by the osv target's writer; the classic disk from `export`; the seed disk.

Runs only when an OSv kernel is available: JVMKIT_OSV_KERNEL=/path/to/loader-stripped.elf, or one
in jvmkit's kernel cache (`jvmkit kernel import osv PATH` / `jvmkit kernel pull osv`). The tests
boot with QEMU directly (argv from jvmkit.vm.qemu, console through the osv target's ConsoleFilter), to check
the bundle writer on its own; tests/test_osv_cli.py does the same through `jvmkit pack` and
`jvmkit run`, as a user would. They print boot-to-main times.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from jvmkit.packager.kernels import osv as osv_kernels  # `osv` is this file's fixture

pytestmark = [pytest.mark.vm, pytest.mark.osv]


def _kernel_source() -> tuple[str | None, str]:
    env = os.environ.get(osv_kernels.KERNEL_ENV)
    if env:
        return env, f"{osv_kernels.KERNEL_ENV}={env}"
    try:
        cached = osv_kernels.cached_osv_kernel()  # the user's cache, before the tests switch caches
    except Exception:  # noqa: BLE001 - an unreadable cache just means no kernel
        cached = None
    if cached is not None:
        return str(cached.path), f"cached kernel {cached.id}"
    return None, ""


KERNEL, KERNEL_ORIGIN = _kernel_source()
if KERNEL is None:
    pytest.skip("no OSv kernel: set JVMKIT_OSV_KERNEL=/path/to/osv/build/last/loader-stripped.elf or run "
                "`jvmkit kernel import osv PATH` (OSv boot tests skipped)", allow_module_level=True)
if shutil.which("qemu-system-x86_64") is None:
    pytest.skip("qemu-system-x86_64 is not installed (OSv boot tests skipped)", allow_module_level=True)

BOOT_TIMEOUT = 240.0
APP_SOURCE = r"""
import java.io.FileInputStream;

public class Hello {
    public static void main(String[] args) throws Exception {
        System.out.println("Hello from jvmkit on OSv, java " + System.getProperty("java.version"));
        if (args.length == 0) {
            return;
        }
        switch (args[0]) {
            case "exit" -> System.exit(Integer.parseInt(args[1]));
            case "throw" -> throw new IllegalStateException("thrown on request");
            case "thread" -> {
                Thread t = new Thread(() -> {
                    try { Thread.sleep(300); } catch (InterruptedException e) { return; }
                    System.out.println("thread done");
                });
                t.start();
            }
            case "utf8" -> System.out.println("utf8: h\u00e9llo \u2713 " + System.getProperty("file.encoding"));
            case "seed" -> {
                try (var in = new FileInputStream(args[1])) {
                    String text = new String(in.readNBytes(4096), "UTF-8");
                    text.lines().filter(l -> !l.isBlank()).forEach(l -> System.out.println("seed: " + l));
                }
            }
            case "sleep" -> Thread.sleep(Long.parseLong(args[1]));
            case "args" -> {
                for (String a : args) System.out.println("arg[" + a + "]");
            }
            default -> System.out.println("unknown mode " + args[0]);
        }
    }
}
"""


@dataclass
class Booted:
    output: str
    status: int | None
    to_main: float | None  # seconds from QEMU's start to the app's first output line
    total: float
    console: str


@pytest.fixture(scope="module")
def osv(tmp_path_factory):
    """A tmp cache, the kernel imported into it, a runtime, the agent, the app, the bundle."""
    from jvmkit import guest
    from jvmkit import jdk as jdks
    from jvmkit.balloon import agent_build
    from jvmkit.packager import bundle as bundles
    from jvmkit.packager import pack
    from jvmkit.packager.runtime import RuntimeSpec, ensure_runtime
    from jvmkit.packager.targets.base import PackInputs
    from jvmkit.packager.targets.osv import OsvTarget
    from jvmkit.vm.runner import prepare_boot_files
    from support.images import manifest_for

    work = tmp_path_factory.mktemp("osv-boot")
    mp = pytest.MonkeyPatch()
    mp.setenv("JVMKIT_CACHE", str(work / "cache"))
    try:
        try:
            jdk = jdks.find_jdk(None)
            jdk.require_jmods()
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"no usable build JDK ({exc})")
        kernel = osv_kernels.resolve_osv_kernel(KERNEL)
        modules = tuple(sorted(set(agent_build.AGENT_MODULES)))
        spec = RuntimeSpec(jdk_home=str(jdk.home), jdk_version=jdk.version, jdk_release=jdk.release,
                           modules=modules, compress="zip", strip_debug=True)
        runtime = ensure_runtime(spec, jdk.jlink, jdk.jmods)
        agent = agent_build.build_agent(jdk.javac, jdk.release)
        src = work / "src"
        src.mkdir()
        (src / "Hello.java").write_text(APP_SOURCE, encoding="utf-8")
        subprocess.run([str(jdk.javac), "--release", "17", "-encoding", "UTF-8", "-d", str(work / "classes"),
                        str(src / "Hello.java")], check=True, capture_output=True)
        app_jar = work / "app.jar"
        with zipfile.ZipFile(app_jar, "w") as jar:
            jar.write(work / "classes" / "Hello.class", "Hello.class")
        target = OsvTarget()
        agent_flags = guest.agent_flags(target.agent_seed_path())  # as pack passes them for osv
        argv = pack.guest_java_argv(main_class="Hello", guest_class_path=["/app/app.jar"],
                                    profile_flags=["-XX:+UseSerialGC", "-XX:MaxRAMPercentage=75"],
                                    manifest_flags=[], user_jvm_args=[], launcher=True, agent_flags=agent_flags)
        out = work / "hello.jvmkit"
        out.mkdir()
        written = target.write_bundle(out, PackInputs(
            kernel=kernel, java_argv=tuple(argv), app_args=(), runtime=runtime.path,
            app_files=(("/app/app.jar", app_jar),), agent_jar=Path(agent.agent_jar), mtime=0,
            agent_flags=agent_flags))
        bundles.write_manifest(out, manifest_for("osv", written, name="hello", kernel=target.kernel_info(kernel)))
        image = bundles.load(out)
        files = prepare_boot_files(image)
        yield type("Osv", (), {"image": image, "files": files, "kernel": kernel, "work": work,
                               "boot": image.manifest.boot})
    finally:
        mp.undo()


def _run(argv: list[str], console_log: Path, timeout: float = BOOT_TIMEOUT) -> Booted:
    from jvmkit.packager.targets.osv.console import ConsoleFilter

    app, osv = io.BytesIO(), io.BytesIO()
    filt = ConsoleFilter(app, osv)
    started = time.monotonic()
    to_main = None
    pos = 0
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while True:
            done = proc.poll() is not None
            if console_log.exists():
                with open(console_log, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                pos += len(data)
                filt.feed(data)
                if to_main is None and app.getvalue():
                    to_main = time.monotonic() - started
            if done:
                break
            if time.monotonic() - started > timeout:
                proc.kill()
                proc.wait()
                pytest.fail(f"OSv did not power off within {timeout:g}s; console:\n"
                            + console_log.read_text(errors="replace")[-3000:])
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    total = time.monotonic() - started
    filt.close()
    stderr = proc.stderr.read().decode(errors="replace")
    assert proc.returncode == 0, f"QEMU failed ({proc.returncode}): {stderr}"
    console = console_log.read_text(errors="replace")
    return Booted(app.getvalue().decode("utf-8", "replace"), filt.status, to_main, total, console)


def seed_disk(osv, seed: bytes, name: str) -> Path:
    """The per-run seed disk, written as the runner writes it (0600, through RunDir.write_secret)."""
    from jvmkit.packager.targets.osv.image import seed_disk_image
    from jvmkit.vm.rundir import RunDir

    run = RunDir(name, osv.work / f"secrets-{name}")
    run.path.mkdir(mode=0o700)
    return run.write_secret("seed.img", seed_disk_image(seed))


def boot(osv, args: list[str] | None = None, data_disks: tuple[Path, ...] = (), name: str = "boot",
         agent: bool = False) -> Booted:
    from jvmkit.packager.targets.osv.image import runtime_cmdline
    from jvmkit.vm.qemu import VmConfig, qemu_argv
    from jvmkit.vm.runner import parse_exit

    run = osv.work / f"run-{name}-{time.monotonic_ns()}"
    run.mkdir()
    config = VmConfig(name=f"osv-{name}", kernel=osv.files["kernel"], append=runtime_cmdline(osv.boot, args, agent),
                      memory_mib=512, cpus=1, accel="tcg", qmp_socket=run / "qmp.sock",
                      console_log=run / "console.log", disk=osv.files["disk"], app_serial=False,
                      data_disks=data_disks)
    result = _run(qemu_argv(config), config.console_log)
    # the runner's own exit-status parser reads the same status from the raw console
    assert parse_exit(result.console, osv.boot.exit_marker) == result.status
    report(name, result)
    return result


_TIMES: list[str] = []


def report(name: str, result: Booted) -> None:
    line = (f"OSv boot [{name}] ({KERNEL_ORIGIN}, TCG): main after "
            f"{result.to_main:.2f}s, powered off after {result.total:.2f}s, status {result.status}"
            if result.to_main is not None else f"OSv boot [{name}]: no app output, status {result.status}")
    _TIMES.append(line)
    print(line, file=sys.stderr)


def test_hello(osv):
    result = boot(osv, name="hello")
    assert result.output.startswith("Hello from jvmkit on OSv, java ")
    assert result.output.count("\n") == 1, result.output
    assert result.status == 0
    assert "Cmdline: " in result.console and "ignoring missing symbol" not in result.output


@pytest.mark.parametrize("args,status", [(["exit", "3"], 3), (["throw"], 1), (["exit", "-1"], 255)])
def test_exit_statuses(osv, args, status):
    result = boot(osv, args, name=" ".join(args))
    assert result.status == status
    if args == ["throw"]:
        assert 'Exception in thread "main" java.lang.IllegalStateException: thrown on request' in result.output


def test_non_daemon_thread_finishes_before_exit(osv):
    result = boot(osv, ["thread"], name="thread")
    assert result.output.splitlines()[-1] == "thread done" and result.status == 0


def test_utf8_output_and_run_time_args(osv):
    result = boot(osv, ["utf8"], name="utf8")
    assert "utf8: h\u00e9llo \u2713 UTF-8" in result.output
    args = ["args", "with space", "$HOME", 'q"uote']
    result = boot(osv, args, name="args")
    assert [line for line in result.output.splitlines() if line.startswith("arg[")] == [f"arg[{a}]" for a in args]


def test_seed_disk_reaches_the_guest(osv):
    from jvmkit.packager.targets.osv.image import SEED_DEVICE

    seed = seed_disk(osv, b"jmx.port=7091\njmx.user=jvmkit\njmx.password=s3cret\n", "seed")
    result = boot(osv, ["seed", SEED_DEVICE], data_disks=(seed,), name="seed")
    assert [line for line in result.output.splitlines() if line.startswith("seed: ")] == [
        "seed: jmx.port=7091", "seed: jmx.user=jvmkit", "seed: jmx.password=s3cret"]
    assert result.status == 0


def test_agent_starts_when_a_seed_disk_is_attached(osv):
    """A `--balloon` run: the agent's flags go back on the command line and the seed disk is vblk1."""
    seed = seed_disk(osv, b"jmx.port=7091\njmx.user=jvmkit\njmx.password=s3cret\n", "seed-agent")
    result = boot(osv, ["sleep", "15000"], data_disks=(seed,), name="agent", agent=True)
    assert "jvmkit-agent: JMX ready on port 7091" in result.output  # the agent read the seed disk
    assert result.status == 0


def test_classic_disk_export_boots(osv):
    from jvmkit.packager.targets.osv.export import export_classic
    from jvmkit.vm.qemu import find_qemu

    if osv.kernel.loader_image is None:
        pytest.skip("the OSv kernel under test came without a classic loader image (loader.img)")
    disk = export_classic(osv.image, None, osv.work / "hello-classic.img", "raw")
    run = osv.work / "run-classic"
    run.mkdir()
    log = run / "console.log"
    argv = [find_qemu(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-machine", "pc",
            "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "512M",
            "-drive", f"file={disk},if=none,id=hd0,format=raw,cache=unsafe", "-device", "virtio-blk-pci,drive=hd0",
            "-chardev", f"file,id=console,path={log}", "-serial", "chardev:console",
            "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile="]
    result = _run(argv, log)
    report("classic disk", result)
    assert result.output.startswith("Hello from jvmkit on OSv") and result.status == 0
