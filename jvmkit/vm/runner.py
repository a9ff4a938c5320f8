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
import secrets
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

from jvmkit import cache, guest, proc, ui
from jvmkit.config import RunOptions
from jvmkit.errors import UsageError
from jvmkit.units import mib_text
from jvmkit.packager import bundle as bundles
from jvmkit.packager import targets
from jvmkit.packager.targets.base import BootPlan, BootRequest, parse_marker
from jvmkit.vm import iouring, kvm, rundir
from jvmkit.vm.qemu import PortForward, VmConfig, find_qemu, qemu_argv

EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125
EXIT_INTERRUPTED = 130
JMX_GUEST_PORT = guest.JMX_GUEST_PORT
STOP_GRACE = 5.0


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


parse_exit = parse_marker  # the app's exit status from the guest console, or None


def diagnose(console_text: str, qemu_stderr: str, qemu_rc: int | None, target=None) -> str:
    """Why a VM ended without an app status (pure): the target's own diagnosis (a panic, OSv's
    failures), a crash, a QEMU error, or unknown."""
    candidates = [target] if target is not None else list(targets.all_targets())
    for t in candidates:
        reason = t.diagnose(console_text)
        if reason:
            return reason
    for line in console_text.splitlines():
        if "Aborted" in line or "page fault" in line.lower():
            return "the guest crashed: " + line.strip()
    errors = [l.split(": ", 1)[-1] for l in qemu_stderr.splitlines() if l.startswith("qemu-system") and "warning" not in l]
    if errors:
        return "QEMU failed: " + errors[0]
    return f"the VM stopped without reporting the app's exit status (QEMU exit {qemu_rc})"


def choose_accel(requested: str, verdict: Callable[[], kvm.KvmVerdict]) -> tuple[str, str]:
    """(accel, one line saying which and why). `--accel kvm` where the probe says KVM cannot run
    guests is bad input (exit status 2), like any other request this host cannot meet."""
    if requested == "tcg":
        return "tcg", "using TCG (software emulation), as asked"
    if requested not in ("auto", "kvm"):
        raise UsageError(f"--accel {requested!r} is not one of auto, kvm, tcg")
    v = verdict()
    if v.usable:
        return "kvm", "using KVM"
    if requested == "kvm":
        raise UsageError(f"--accel kvm: KVM is not usable here: {v.reason}", hint="use --accel tcg or auto")
    return "tcg", f"KVM is not usable ({v.reason}); using TCG (software emulation, slower)"


def check_publish(forwards: list[PortForward]) -> None:
    """Refuse a host port published twice (the same address, or any address and 0.0.0.0) and a
    guest port published twice (pure)."""
    for i, fwd in enumerate(forwards):
        for other in forwards[:i]:
            same_address = fwd.host_addr == other.host_addr or "0.0.0.0" in (fwd.host_addr, other.host_addr)
            if fwd.host_port == other.host_port and same_address:
                raise UsageError(f"--publish: host port {fwd.host_port} is published twice "
                                 f"({other.spec()} and {fwd.spec()})", hint="give each --publish its own host port")
            if fwd.guest_port == other.guest_port:
                raise UsageError(f"--publish: guest port {fwd.guest_port} is published twice "
                                 f"({other.spec()} and {fwd.spec()})", hint="publish each guest port once")


def host_memory_mib() -> int | None:
    """The host's MemTotal in MiB (None where /proc/meminfo cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(memory_mib: int, asked: str, host_mib: int | None) -> None:
    """Refuse a guest larger than this host's memory: QEMU would start and then fail or be killed."""
    if host_mib is not None and memory_mib > host_mib:
        raise UsageError(f"{asked} is more than this host has ({mib_text(host_mib)} in all)",
                         hint=f"use at most --memory {mib_text(host_mib)} (less, to leave the host room)")


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
    for role, record in sorted(image.manifest.files.items()):
        if record.compression != "zstd":
            result[role] = image.file(role)
            continue
        key = f"{role}-{record.raw_sha256[:24]}"

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

    process = vm.process
    if process.poll() is not None:
        return
    try:
        with QmpClient.connect(vm.config.qmp_socket, timeout=2.0) as qmp:
            if graceful:
                qmp.execute("system_powerdown")
                try:
                    process.wait(timeout=grace)
                    return
                except subprocess.TimeoutExpired:
                    pass
            qmp.execute("quit")
    except (QmpError, OSError):
        pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run(image_path: Path, options: RunOptions,
        on_started: Callable[[RunningVm], None] | None = None,
        on_stopping: Callable[[RunningVm], None] | None = None) -> int:
    console = ui.current()
    image = bundles.load(image_path)
    manifest = image.manifest
    target = targets.get(manifest.target, "image target")
    qemu = find_qemu()
    forwards = [parse_publish(p) for p in options.publish]
    check_publish(forwards)
    for fwd in forwards:
        check_port_free(fwd)
    memory = options.memory_mib or manifest.defaults.memory_mib
    cpus = options.cpus or manifest.defaults.cpus
    asked = f"--memory {mib_text(memory)}" if options.memory_mib else f"the image's default memory ({mib_text(memory)})"
    target.memory_floor(manifest.files).check(memory, asked, str(image_path), explicit=bool(options.memory_mib))
    check_memory(memory, asked, host_memory_mib())
    if not 1 <= cpus <= 64:
        raise UsageError(f"--cpus {cpus} is out of range (1-64)")
    if manifest.boot.machine not in target.machines:
        raise UsageError(f"image {image_path} asks for QEMU machine type {manifest.boot.machine!r}, which this jvmkit "
                         f"does not use for {target.name} images (known: {', '.join(target.machines)})",
                         hint="re-pack the image with this jvmkit")
    files = prepare_boot_files(image)
    known = kvm.cached_verdict(qemu) is not None
    accel, accel_note = choose_accel(options.accel, lambda: kvm.kvm_verdict(qemu, kernel=files["kernel"]))
    # The verdict is cached per host kernel + QEMU: say it when it is new (or with --verbose), not on every run.
    if options.verbose or not known or accel == "kvm" and options.accel == "kvm":
        console.info(f"jvmkit: {accel_note}")

    run = rundir.create(options.name or image.name, explicit=options.name is not None)
    try:
        jmx = None
        seed = None
        if options.jmx:
            jmx_port = free_port()
            forwards.append(PortForward("127.0.0.1", jmx_port, manifest.guest.jmx_port))
            jmx = {"host": "127.0.0.1", "port": jmx_port, "user": guest.JMX_USER, "password": secrets.token_urlsafe(24)}
            seed = guest.seed_text(jmx_host_port=jmx_port, user=jmx["user"], password=jmx["password"],
                                   jmx_guest_port=manifest.guest.jmx_port).encode()
        if manifest.snapshot is not None and not options.cold:  # warm start: restore the image's snapshot
            from jvmkit.vm import snapshot

            status = snapshot.run_restored(image, target, files, run, options, memory=memory, cpus=cpus, accel=accel,
                                           qemu=qemu, forwards=tuple(forwards), jmx=jmx, on_started=on_started,
                                           on_stopping=on_stopping)
            if status is not None:
                return status
        request = BootRequest(args=tuple(options.args) if options.args is not None else None, seed=seed,
                              verbose=options.verbose)
        plan = target.boot_plan(manifest, files, request, run.write_secret)
        config = vm_config(plan, name=run.name, memory_mib=memory, cpus=cpus, accel=accel, qemu=qemu, run=run,
                           ports=tuple(forwards), free_page_reporting=options.free_page_reporting)
        return _boot(image, target, plan, run, config, options, jmx, on_started, on_stopping)
    finally:
        run.remove()


def vm_config(plan: BootPlan, *, name: str, memory_mib: int, cpus: int, accel: str, qemu: str, run: rundir.RunDir,
              ports: tuple[PortForward, ...], free_page_reporting: bool = True) -> VmConfig:
    """The VM to start for a target's boot plan (pure apart from the io_uring probe's cached verdict)."""
    return VmConfig(
        name=name, kernel=plan.kernel, initrd=plan.initrd, disk=plan.disk, append=plan.append,
        memory_mib=memory_mib, cpus=cpus, accel=accel, qmp_socket=run.qmp_socket, console_log=run.console_log,
        ports=ports, fw_cfg=plan.fw_cfg, app_serial=plan.app_serial, console_stdio=plan.console_stdio,
        data_disks=plan.data_disks, qemu=qemu, machine=plan.machine,
        disk_aio=iouring.disk_aio(qemu) if plan.disk else "threads",
        low_memory_mib=plan.low_memory_mib, free_page_reporting=free_page_reporting,
    )


def _boot(image, target, plan: BootPlan, run, config, options, jmx, on_started, on_stopping,
          resume=None) -> int | None:
    """Start QEMU and see the VM to its end. With `resume` (vm/snapshot.py's Resume) the VM is
    restored from a snapshot first; None when that failed and the caller should boot cold."""
    console = ui.current()
    argv = qemu_argv(config)
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
        qemu_proc = proc.start(argv, what="QEMU", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=_pdeathsig, pass_fds=resume.pass_fds if resume else ())
        vm = RunningVm(run.name, run, config, qemu_proc, config.memory_mib, jmx)
        run.write_state({"name": run.name, "qemu_pid": qemu_proc.pid, "jvmkit_pid": os.getpid(),
                         "image": str(image.path), "target": target.name, "memory_mib": config.memory_mib,
                         "cpus": config.cpus, "accel": config.accel, "qmp": str(config.qmp_socket),
                         "ports": [f"{p.host_addr}:{p.host_port}->{p.guest_port}"
                                   for p in (resume.ports if resume else config.ports)],
                         "jmx": {k: v for k, v in (jmx or {}).items() if k != "password"} or None,
                         "started": time.time()})
        if resume is not None:
            from jvmkit.vm.snapshot import RestoreFailed

            try:
                resume.attach(vm)
            except RestoreFailed as exc:
                stop_vm(vm, graceful=False)
                console.notice(f"jvmkit: the image's snapshot could not be restored ({exc}); booting cold")
                return None
            sys.stdout.buffer.write(resume.replay)  # the app's output up to the snapshot, as a cold boot prints it
            sys.stdout.buffer.flush()
        stderr_chunks: list[bytes] = []
        pump_console = (target.resumed_console_pump if resume else target.console_pump)(
            sys.stdout.buffer, sys.stderr.buffer if options.verbose else None)
        pump = threading.Thread(target=pump_console, args=(qemu_proc.stdout,), daemon=True)
        threads = [pump, threading.Thread(target=lambda: stderr_chunks.append(qemu_proc.stderr.read()), daemon=True)]
        if options.verbose and not config.console_stdio:
            threads.append(threading.Thread(target=_tail, args=(run.console_log, tail_stop, sys.stderr), daemon=True))
        for t in threads:
            t.start()
        if on_started:
            on_started(vm)
        outcome = None
        while qemu_proc.poll() is None:
            if stop.is_set():
                outcome = "interrupted"
                break
            if options.timeout and time.monotonic() - started > options.timeout:
                outcome = "timeout"
                break
            try:
                qemu_proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        if on_stopping:
            on_stopping(vm)
        if outcome is not None:
            stop_vm(vm, graceful=plan.acpi_shutdown and outcome == "interrupted")
        qemu_proc.wait()
        for t in threads[:2]:
            t.join(timeout=5)
        tail_stop.set()
        if len(threads) > 2:
            threads[2].join(timeout=2)
        console_text = run.console_log.read_text(errors="replace") if run.console_log.exists() else ""
        status = target.parse_exit(image.manifest, console_text)
        if outcome == "timeout":
            console.notice(f"jvmkit: the VM hit --timeout {options.timeout:g}s and was stopped")
            return EXIT_TIMEOUT
        if outcome == "interrupted":
            console.notice("jvmkit: interrupted; the VM was stopped")
            return EXIT_INTERRUPTED
        if status is not None:
            return status
        reason = diagnose(console_text, b"".join(stderr_chunks).decode(errors="replace"), qemu_proc.returncode, target)
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
