"""`jvmkit run`: boot an image bundle under QEMU and return the app's exit status.

The runner verifies the bundle, unpacks what QEMU boots from into the cache once (keyed by digest),
chooses the accelerator (KVM only after the probe proved it works), writes the per-run seed and
run directory, starts QEMU with the argv from jvmkit.vm.qemu, streams the app's serial port to stdout
(and the console log to stderr with --verbose), and turns the way the guest ended into an exit
status: the app's own status, or 124 (timeout), 125 (the VM failed), 130 (interrupted).
QEMU is started with PR_SET_PDEATHSIG, so it never outlives jvmkit, even after a SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import zstandard

from jvmkit import cache, ui
from jvmkit.vm import iouring, kvm, rundir
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import bundle as bundles
from jvmkit.packager.linux_image import NO_BOUNCE_BUFFER, min_memory_mib
from jvmkit.vm.qemu import MACHINES, PortForward, VmConfig, find_qemu, q35_low_memory_mib, qemu_argv

EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125
EXIT_INTERRUPTED = 130
JMX_GUEST_PORT = 7091
STOP_GRACE = 5.0


from jvmkit.config import RunOptions


@dataclass
class RunningVm:
    """What a started VM offers to the balloon and to callers (valid while it runs)."""

    name: str
    run: rundir.RunDir
    config: VmConfig
    process: subprocess.Popen
    memory_mib: int
    jmx: dict | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)


# ---- pure helpers --------------------------------------------------------------------------------

def parse_publish(spec: str) -> PortForward:
    """`GUEST`, `HOST:GUEST` or `ADDR:HOST:GUEST` (pure). The host side binds 127.0.0.1 by default."""
    parts = spec.split(":")
    try:
        if len(parts) == 1:
            addr, host, guest = "127.0.0.1", int(parts[0]), int(parts[0])
        elif len(parts) == 2:
            addr, host, guest = "127.0.0.1", int(parts[0]), int(parts[1])
        elif len(parts) == 3:
            addr, host, guest = parts[0] or "127.0.0.1", int(parts[1]), int(parts[2])
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"--publish {spec!r} is not HOST:GUEST, ADDR:HOST:GUEST or PORT",
                         hint="e.g. --publish 8080:8080") from None
    for port in (host, guest):
        if not 1 <= port <= 65535:
            raise UsageError(f"--publish {spec!r}: port {port} is out of range (1-65535)")
    return PortForward(addr, host, guest)


def parse_exit(console_text: str, marker: str) -> int | None:
    """The app's exit status from the guest console, or None when the guest never reported one."""
    found = re.findall(re.escape(marker) + r"(\d+)", console_text)
    return int(found[-1]) % 256 if found else None


def diagnose(console_text: str, qemu_stderr: str, qemu_rc: int | None) -> str:
    """Why a VM ended without an app status (pure): panic, QEMU error, or unknown."""
    for line in console_text.splitlines():
        if "Kernel panic" in line:
            return "the guest kernel panicked: " + line.split("Kernel panic - ", 1)[-1].strip()
    for osv_failure in ("Could not mount rofs root filesystem", "Failed to parse command line",
                        "Failed to load object"):
        if osv_failure in console_text:
            line = next(l for l in console_text.splitlines() if osv_failure in l)
            return "OSv failed: " + line.strip()
    for line in console_text.splitlines():
        if "Aborted" in line or "page fault" in line.lower():
            return "the guest crashed: " + line.strip()
    errors = [l.split(": ", 1)[-1] for l in qemu_stderr.splitlines() if l.startswith("qemu-system") and "warning" not in l]
    if errors:
        return "QEMU failed: " + errors[0]
    return f"the VM stopped without reporting the app's exit status (QEMU exit {qemu_rc})"


def choose_accel(requested: str, verdict: Callable[[], kvm.KvmVerdict]) -> tuple[str, str]:
    """(accel, one line saying which and why)."""
    if requested == "tcg":
        return "tcg", "using TCG (software emulation), as asked"
    if requested not in ("auto", "kvm"):
        raise UsageError(f"--accel {requested!r} is not one of auto, kvm, tcg")
    v = verdict()
    if v.usable:
        return "kvm", "using KVM"
    if requested == "kvm":
        raise JvmkitError(f"--accel kvm: KVM is not usable here: {v.reason}", hint="use --accel tcg or auto")
    return "tcg", f"KVM is not usable ({v.reason}); using TCG (software emulation, slower)"


def kernel_cmdline(base: str, verbose: bool) -> str:
    return base + (" loglevel=7" if verbose else " quiet loglevel=1")


# ---- I/O ---------------------------------------------------------------------------------------

def check_port_free(fwd: PortForward) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((fwd.host_addr, fwd.host_port))
    except OSError as exc:
        raise UsageError(f"--publish {fwd.host_addr}:{fwd.host_port}: the host port is not available ({exc.strerror})",
                         hint="choose another host port") from None
    finally:
        sock.close()


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


def prepare_boot_files(image: bundles.Bundle) -> dict[str, Path]:
    """Decompress the bundle's compressed files into the boot cache once (keyed by digest)."""
    result = {}
    for role, record in sorted(image.manifest["files"].items()):
        if record.get("compression") != "zstd":
            result[role] = image.file(role)
            continue
        key = f"{role}-{record['raw_sha256'][:24]}"

        def build(tmp: Path, record=record, role=role) -> None:
            dctx = zstandard.ZstdDecompressor()
            with open(image.file(role), "rb") as src, open(tmp / "file", "wb") as out:
                dctx.copy_stream(src, out)

        entry, _ = cache.ensure_entry("boot", key, build, role=role, image=str(image.path))
        result[role] = entry / "file"
    return result


def _pdeathsig() -> None:  # runs in the child before exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()  # Ctrl-C at the terminal reaches jvmkit only; jvmkit stops QEMU itself


def _pump(src, dst) -> None:
    try:
        while chunk := os.read(src.fileno(), 65536):
            dst.write(chunk)
            dst.flush()
    except (OSError, ValueError):
        pass


def _pump_osv(src, filt) -> None:
    """OSv's one console: split into the app's output and OSv's messages (osv_image.ConsoleFilter);
    an unfinished app line is passed on when the console is idle for 0.2 s."""
    fd = src.fileno()
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                filt.flush_partial()
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            filt.feed(chunk)
    except (OSError, ValueError):
        pass
    finally:
        filt.close()


def _tail(path: Path, stop: threading.Event, out) -> None:
    pos = 0
    while True:
        try:
            with open(path, "rb") as handle:
                handle.seek(pos)
                data = handle.read()
                pos += len(data)
        except FileNotFoundError:
            data = b""
        if data:
            out.write(data.decode(errors="replace").replace("\r", ""))
            out.flush()
        if stop.is_set() and not data:
            return
        time.sleep(0.1)


def stop_vm(vm: RunningVm, graceful: bool, grace: float = STOP_GRACE) -> None:
    """Stop QEMU within a bounded time: ACPI power-down (if the guest handles it), QMP quit, kill."""
    from jvmkit.vm.qmp import QmpClient, QmpError

    proc = vm.process
    if proc.poll() is not None:
        return
    try:
        with QmpClient.connect(vm.config.qmp_socket, timeout=2.0) as qmp:
            if graceful:
                qmp.execute("system_powerdown")
                try:
                    proc.wait(timeout=grace)
                    return
                except subprocess.TimeoutExpired:
                    pass
            qmp.execute("quit")
    except (QmpError, OSError):
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(image_path: Path, options: RunOptions,
        on_started: Callable[[RunningVm], None] | None = None,
        on_stopping: Callable[[RunningVm], None] | None = None) -> int:
    console = ui.current()
    image = bundles.load(image_path)
    manifest = image.manifest
    boot = manifest["boot"]
    qemu = find_qemu()
    forwards = [parse_publish(p) for p in options.publish]
    for fwd in forwards:
        check_port_free(fwd)
    memory = options.memory_mib or manifest["defaults"]["memory_mib"]
    cpus = options.cpus or manifest["defaults"]["cpus"]
    if memory < 64:
        raise UsageError(f"--memory {memory}M is too small for a JVM guest (at least 64M)")
    if not 1 <= cpus <= 64:
        raise UsageError(f"--cpus {cpus} is out of range (1-64)")
    initramfs = manifest["files"].get("initramfs")
    need = min_memory_mib(initramfs["raw_size"]) if initramfs else 0
    if memory < need:
        asked = f"--memory {memory}M" if options.memory_mib else f"the image's default memory ({memory}M)"
        raise UsageError(f"{asked} is too small for image {image_path}: its initramfs unpacks to "
                         f"{initramfs['raw_size'] / (1 << 20):.0f} MiB, which needs a guest of at least {need}M",
                         hint=f"use --memory {need}M or more")
    machine = boot.get("machine", "pc")
    if machine not in MACHINES:
        raise UsageError(f"image {image_path} asks for QEMU machine type {machine!r}, which this jvmkit does not "
                         f"use (known: {', '.join(MACHINES)})", hint="re-pack the image with this jvmkit")
    files = prepare_boot_files(image)
    accel, accel_note = choose_accel(options.accel, lambda: kvm.kvm_verdict(qemu, kernel=files["kernel"]))
    console.info(f"jvmkit: {accel_note}")

    osv = image.target == "osv"
    run = rundir.create(options.name or image.name, explicit=options.name is not None)
    try:
        fw_cfg: list[tuple[str, Path]] = []
        data_disks: list[Path] = []
        jmx = None
        if options.jmx:
            jmx_port = free_port()
            forwards.append(PortForward("127.0.0.1", jmx_port, JMX_GUEST_PORT))
            jmx = {"host": "127.0.0.1", "port": jmx_port, "user": "jvmkit", "password": secrets.token_urlsafe(24)}
            seed = (f"jmx.port={JMX_GUEST_PORT}\njmx.advertise=127.0.0.1:{jmx_port}\n"
                    f"jmx.user={jmx['user']}\njmx.password={jmx['password']}\n")
            if osv:  # no fw_cfg reader in OSv: a raw disk the guest reads at boot["seed_device"] (/dev/vblk1)
                from jvmkit.packager.osv_image import seed_disk_image

                data_disks.append(run.write_secret("seed.img", seed_disk_image(seed.encode())))
            else:
                fw_cfg.append((boot["seed_fw_cfg"], run.write_secret("seed", seed.encode())))
        if options.args is not None and not osv:
            fw_cfg.append((boot["args_fw_cfg"], run.write_secret("args", shlex.join(options.args).encode())))
        if osv:  # OSv's loader options precede the program: the whole line is rebuilt for new args
            from jvmkit.packager.osv_image import runtime_cmdline

            append = runtime_cmdline(boot, list(options.args) if options.args is not None else None, agent=options.jmx)
        else:
            append = kernel_cmdline(boot["kernel_cmdline"], options.verbose)
        config = VmConfig(
            name=run.name,
            kernel=files["kernel"],
            initrd=files.get("initramfs"),
            disk=files.get("disk"),
            append=append,
            memory_mib=memory,
            cpus=cpus,
            accel=accel,
            qmp_socket=run.qmp_socket,
            console_log=run.console_log,
            ports=tuple(forwards),
            fw_cfg=tuple(fw_cfg),
            app_serial=not osv,
            console_stdio=osv,
            data_disks=tuple(data_disks),
            qemu=qemu,
            machine=machine,
            disk_aio=iouring.disk_aio(qemu) if files.get("disk") else "threads",
            low_memory_mib=q35_low_memory_mib(initramfs["raw_size"] if initramfs else 0,
                                              bounce_buffer=NO_BOUNCE_BUFFER not in append.split()),
            free_page_reporting=options.free_page_reporting,
        )
        return _boot(image, run, config, options, jmx, on_started, on_stopping)
    finally:
        run.remove()


def _boot(image, run, config, options, jmx, on_started, on_stopping) -> int:
    console = ui.current()
    boot = image.manifest["boot"]
    argv = qemu_argv(config)
    if console.debug:
        console.info("jvmkit: " + shlex.join(argv))
    stop = threading.Event()
    previous = {}

    def request_stop(signum, _frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread
            pass
    tail_stop = threading.Event()
    threads = []
    try:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_pdeathsig)
        vm = RunningVm(run.name, run, config, proc, config.memory_mib, jmx)
        run.write_state({"name": run.name, "qemu_pid": proc.pid, "jvmkit_pid": os.getpid(),
                         "image": str(image.path), "target": image.target, "memory_mib": config.memory_mib,
                         "cpus": config.cpus, "accel": config.accel, "qmp": str(config.qmp_socket),
                         "ports": [f"{p.host_addr}:{p.host_port}->{p.guest_port}" for p in config.ports],
                         "jmx": {k: v for k, v in (jmx or {}).items() if k != "password"} or None,
                         "started": time.time()})
        stderr_chunks: list[bytes] = []
        if boot.get("console_filter") == "osv":
            from jvmkit.packager.osv_image import ConsoleFilter

            filt = ConsoleFilter(sys.stdout.buffer, sys.stderr.buffer if options.verbose else None)
            pump = threading.Thread(target=_pump_osv, args=(proc.stdout, filt), daemon=True)
        else:
            pump = threading.Thread(target=_pump, args=(proc.stdout, sys.stdout.buffer), daemon=True)
        threads = [pump, threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)]
        if options.verbose and not config.console_stdio:
            threads.append(threading.Thread(target=_tail, args=(run.console_log, tail_stop, sys.stderr), daemon=True))
        for t in threads:
            t.start()
        if on_started:
            on_started(vm)
        outcome = None
        while proc.poll() is None:
            if stop.is_set():
                outcome = "interrupted"
                break
            if options.timeout and time.monotonic() - started > options.timeout:
                outcome = "timeout"
                break
            try:
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        if on_stopping:
            on_stopping(vm)
        if outcome is not None:
            stop_vm(vm, graceful=bool(boot.get("acpi_shutdown")) and outcome == "interrupted")
        proc.wait()
        for t in threads[:2]:
            t.join(timeout=5)
        tail_stop.set()
        if len(threads) > 2:
            threads[2].join(timeout=2)
        console_text = run.console_log.read_text(errors="replace") if run.console_log.exists() else ""
        status = parse_exit(console_text, boot["exit_marker"])
        if outcome == "timeout":
            console.notice(f"jvmkit: the VM hit --timeout {options.timeout:g}s and was stopped")
            return EXIT_TIMEOUT
        if outcome == "interrupted":
            console.notice("jvmkit: interrupted; the VM was stopped")
            return EXIT_INTERRUPTED
        if status is not None:
            return status
        reason = diagnose(console_text, b"".join(stderr_chunks).decode(errors="replace"), proc.returncode)
        log = _keep_log(run)
        console.notice(f"jvmkit: error: {reason} (console log: {log})")
        return EXIT_VM_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _keep_log(run: rundir.RunDir) -> Path:
    logs = cache.cache_dir("logs")
    dest = logs / f"{run.name}.console.log"
    try:
        dest.write_bytes(run.console_log.read_bytes())
    except OSError:
        return run.console_log
    return dest
