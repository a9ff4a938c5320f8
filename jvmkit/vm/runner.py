"""`jvmkit run`: boot an image bundle under QEMU and return the app's exit status.

The runner verifies the bundle, unpacks what QEMU boots from into the cache once (keyed by digest),
chooses the accelerator (KVM only after the probe proved it works), writes the per-run seed and
run directory, starts QEMU with the argv from jvmkit.vm.qemu, streams the app's serial port to stdout
(and the console log to stderr with --verbose), and turns the way the guest ended into an exit
status: the app's own status, or 124 (timeout), 125 (the VM failed), 130 (interrupted).
QEMU is started with PR_SET_PDEATHSIG, so it never outlives jvmkit, even after a SIGKILL.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from jvmkit import cache, fileio, guest, ui
from jvmkit.config import RunOptions
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.units import mib_text
from jvmkit.packager import bundle as bundles
from jvmkit.packager import manifest_limits, zstd
from jvmkit.packager import targets
from jvmkit.packager.targets.base import BootPlan, BootRequest, parse_marker
from jvmkit.vm import consolelog, iouring, kvm, launch, network, rundir
from jvmkit.vm.qemu import TCG_TB_MIB, PortForward, VmConfig, find_qemu

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
    console: consolelog.BoundedLog | None = None

    @property
    def qemu_pid(self) -> int | None:
        return self.process.pid

    def balloon_device(self):
        """The VM's virtio-balloon for the balloon controller (balloon.host.VmHandle)."""
        from jvmkit.balloon.host import QmpBalloon

        return QmpBalloon(self.config.qmp_socket)


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
    try:
        ipaddress.IPv4Address(addr)  # it goes into QEMU's option list: nothing but an address
    except ValueError:
        raise UsageError(f"--publish {spec!r}: {addr!r} is not an IPv4 address",
                         hint="e.g. --publish 0.0.0.0:8080:8080, or 127.0.0.1 (the default)") from None
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
    crash = _crash(console_text)
    if crash:
        return crash
    errors = [l.split(": ", 1)[-1] for l in qemu_stderr.splitlines() if l.startswith("qemu-system") and "warning" not in l]
    if errors:
        return "QEMU failed: " + errors[0]
    return f"the VM stopped without reporting the app's exit status (QEMU exit {qemu_rc})"


JVM_FATAL = ("A fatal error has been detected by the Java Runtime Environment",
             "There is insufficient memory for the Java Runtime Environment")


def _crash(console_text: str) -> str | None:
    """The JVM's own fatal-error report (its first detail line: the signal and pc, or the failed
    allocation), else a guest abort or page fault with the line the guest printed just before it
    (OSv prints an assertion or an out-of-memory line, then `Aborted` and its backtrace)."""
    lines = [l.strip() for l in console_text.splitlines()]
    for i, line in enumerate(lines):
        if any(m in line for m in JVM_FATAL):
            detail = next((d.lstrip("# ").strip() for d in lines[i + 1:i + 6] if d.lstrip("# ").strip()), "")
            return "the JVM crashed: " + (detail or line.lstrip("# "))
    for i, line in enumerate(lines):
        if "Aborted" in line or "page fault" in line.lower():
            before = [b for b in lines[max(0, i - 4):i] if b and not b.startswith(("[backtrace]", "0x"))]
            return "the guest crashed: " + line + (f" (after: {before[-1][:200]})" if before else "")
    return None


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
    """Refuse a host port another listener holds. With SO_REUSEADDR, as QEMU's and pasta's own
    listeners bind it: a connection of the previous run still in TIME_WAIT on that port (pasta
    closes the host side first) does not make it taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


UNPACK_HEADROOM = 64 << 20  # free space to leave in the cache beyond an unpacked boot file


def prepare_boot_files(image: bundles.Bundle) -> dict[str, Path]:
    """Decompress the bundle's compressed files into the boot cache once (keyed by digest).

    The image may be hostile: the output is bounded by the manifest's `raw_size` (a zstd bomb
    stops there), checked against its `raw_sha256` before the entry appears (so a lying image
    cannot plant a file under another image's key), checked against the free space first, and
    made read-only (0444); a corrupt stream is one line, exit status 2."""
    result = {}
    for role, record in sorted(image.manifest.files.items()):
        if record.compression != "zstd":
            result[role] = image.file(role)
            continue
        key = f"{role}-{record.raw_sha256[:24]}"

        def build(tmp: Path, record=record, role=role) -> None:
            _unpack(image, role, record, tmp / "file")

        entry, _ = cache.ensure_entry("boot", key, build, role=role, image=str(image.path))
        result[role] = entry / "file"
    return result


def _unpack(image: bundles.Bundle, role: str, record, dest: Path) -> None:
    what = f"image {image.path}: its {role} ({record.path})"
    free = shutil.disk_usage(dest.parent).free
    if record.raw_size + UNPACK_HEADROOM > free:
        raise JvmkitError(f"{what} unpacks to {mib_text(-(-record.raw_size >> 20))}, and the cache has "
                          f"{mib_text(free >> 20)} free", hint="free some space (`jvmkit cache prune`)")
    with open(dest, "wb") as out:
        zstd.unpack_checked(image.file(role), record, out, what)
    os.chmod(dest, 0o444)


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
    if options.engine != "qemu":  # another engine boots the same boot plan (jvmkit.engines)
        from jvmkit.engines import libvirt

        return libvirt.run(image_path, options, on_started, on_stopping)
    console = ui.current()
    image = bundles.load(image_path)
    manifest = image.manifest
    target = targets.get(manifest.target, "image target")
    try:
        manifest_limits.check_bootable(manifest, target)
    except UsageError as exc:
        raise UsageError(f"image {image_path}: {exc.message}", hint="this image is damaged or hostile; do not run it") from None
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
    policy = network.Policy(options.network, options.allow_host_loopback)
    choice = launch.plan_network(policy)
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
        jmx, request = boot_request(manifest, options, forwards)
        if manifest.snapshot is not None and not options.cold:  # warm start: restore the image's snapshot
            from jvmkit.vm import snapshot

            status = snapshot.run_restored(image, target, files, run, options, memory=memory, cpus=cpus, accel=accel,
                                           qemu=qemu, forwards=tuple(forwards), jmx=jmx, on_started=on_started,
                                           on_stopping=on_stopping, net=(policy, choice))
            if status is not None:
                return status
        plan = target.boot_plan(manifest, files, request, run.write_secret)
        config = vm_config(plan, name=run.name, memory_mib=memory, cpus=cpus, accel=accel, qemu=qemu, run=run,
                           ports=tuple(forwards), free_page_reporting=options.free_page_reporting,
                           tcg_tb_mib=options.tcg_cache_mib)
        return _boot(image, target, plan, run, config, options, jmx, on_started, on_stopping, (policy, choice))
    finally:
        run.remove()


def boot_request(manifest, options: RunOptions, forwards: list[PortForward]) -> tuple[dict | None, BootRequest]:
    """What one run asks of the image: its app arguments and, for --balloon (`options.jmx`), this
    run's JMX credentials and the seed carrying them, with the agent's port forwarded from a free
    loopback port (appended to `forwards`). Returns (jmx, request); jmx None without the agent."""
    jmx = seed = None
    if options.jmx:
        jmx_port = free_port()
        forwards.append(PortForward("127.0.0.1", jmx_port, manifest.guest.jmx_port))
        jmx = {"host": "127.0.0.1", "port": jmx_port, "user": guest.JMX_USER, "password": secrets.token_urlsafe(24)}
        seed = guest.seed_text(jmx_host_port=jmx_port, user=jmx["user"], password=jmx["password"],
                               jmx_guest_port=manifest.guest.jmx_port).encode()
    return jmx, BootRequest(args=tuple(options.args) if options.args is not None else None, seed=seed,
                            verbose=options.verbose)


def vm_config(plan: BootPlan, *, name: str, memory_mib: int, cpus: int, accel: str, qemu: str, run: rundir.RunDir,
              ports: tuple[PortForward, ...], free_page_reporting: bool = True,
              tcg_tb_mib: int = TCG_TB_MIB) -> VmConfig:
    """The VM to start for a target's boot plan (pure apart from the io_uring probe's cached verdict)."""
    return VmConfig(
        name=name, kernel=plan.kernel, initrd=plan.initrd, disk=plan.disk, append=plan.append,
        memory_mib=memory_mib, cpus=cpus, accel=accel, qmp_socket=run.qmp_socket, console_log=run.console_log,
        ports=ports, fw_cfg=plan.fw_cfg, app_serial=plan.app_serial, console_stdio=plan.console_stdio,
        data_disks=plan.data_disks, qemu=qemu, machine=plan.machine,
        disk_aio=iouring.disk_aio(qemu) if plan.disk else "threads",
        low_memory_mib=plan.low_memory_mib, free_page_reporting=free_page_reporting, tcg_tb_mib=tcg_tb_mib,
    )


def _exited_while_restoring(target, manifest, launched) -> bool:
    """Whether the console of a VM that ended while being restored carries the app's exit status
    (its console pump drained first; QEMU has ended, so it reaches EOF)."""
    for t in launched.threads:
        t.join(timeout=2)
    return target.parse_exit(manifest, launched.log.text()) is not None


def _restore_failed(exc, ended: bool, vm, launched, run, target) -> None:
    """A restore that failed: stop the VM, say why (with what its console said and where it is kept
    when the VM stopped by itself), and let the caller boot cold (None)."""
    stop_vm(vm, graceful=False)
    os.close(launched.app_fd)  # never read on this path: the console tee must not block on it
    detail = str(exc)
    if ended:
        launched.finish()
        text = launched.log.text()
        why = target.diagnose(text) or _crash(text)
        kept = keep_log(run, launched.log, name=f"{run.name}.restore.console.log")
        detail += (f"; {why}" if why else "") + f"; console log: {kept}"
    ui.current().notice(f"jvmkit: the image's snapshot could not be restored ({detail}); booting cold")
    return None


def _boot(image, target, plan: BootPlan, run, config, options, jmx, on_started, on_stopping, net,
          resume=None) -> int | None:
    """Start QEMU and see the VM to its end. With `resume` (vm/snapshot.py's Resume) the VM is
    restored from a snapshot first; None when that failed and the caller should boot cold."""
    console = ui.current()
    stop = threading.Event()
    previous = {}

    def request_stop(signum, _frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread
            pass
    threads = []
    launched = None
    try:
        started = time.monotonic()
        launched = launch.start(config, run, *net, verbose=options.verbose, stderr=sys.stderr.buffer,
                                console_cap=consolelog.CAP, extra_pass_fds=resume.pass_fds if resume else ())
        qemu_proc, config = launched.process, launched.config
        vm = RunningVm(run.name, run, config, qemu_proc, config.memory_mib, jmx, console=launched.log)
        run.write_state({"name": run.name, "qemu_pid": qemu_proc.pid, "jvmkit_pid": os.getpid(),
                         "image": str(image.path), "target": target.name, "memory_mib": config.memory_mib,
                         "cpus": config.cpus, "accel": config.accel, "qmp": str(config.qmp_socket),
                         "tcg_tb_mib": config.tcg_tb_mib if config.accel == "tcg" else None,
                         "ports": [f"{p.host_addr}:{p.host_port}->{p.guest_port}"
                                   for p in (resume.published if resume else config.ports)],
                         "jmx": {k: v for k, v in (jmx or {}).items() if k != "password"} or None,
                         "network": launched.network.choice.backend,
                         "qemu_uid": config.confinement.runas[0] if config.confinement.runas else None,
                         "boot": "restored" if resume is not None else "cold", "started": time.time()})
        if resume is not None:
            from jvmkit.vm.snapshot import RestoreFailed

            try:
                resume.attach(vm)
            except RestoreFailed as exc:
                ended = qemu_proc.poll() is not None
                if ended and _exited_while_restoring(target, image.manifest, launched):
                    # The restored app ran on and exited before the restore session was answered (a
                    # published port reaches it from `cont` on passt and pasta; CI saw an /exit land
                    # there under load). That is this run's end: booting cold would run it twice.
                    if options.verbose or console.debug:
                        console.info(f"jvmkit: restored from the image's snapshot: state loaded in "
                                     f"{resume.loaded_s or 0:.2f} s; the app exited before the restore session "
                                     "was answered")
                else:
                    return _restore_failed(exc, ended, vm, launched, run, target)
            sys.stdout.buffer.write(resume.replay)  # the app's output up to the snapshot, as a cold boot prints it
            sys.stdout.buffer.flush()
        stderr_chunks: list[bytes] = []
        pump_console = (target.resumed_console_pump if resume else target.console_pump)(
            sys.stdout.buffer, sys.stderr.buffer if options.verbose else None)
        app_pipe = os.fdopen(launched.app_fd, "rb", buffering=0)
        pump = threading.Thread(target=pump_console, args=(app_pipe,), daemon=True)
        threads = [pump, threading.Thread(target=lambda: stderr_chunks.append(qemu_proc.stderr.read()), daemon=True)]
        for t in threads:
            t.start()
        if on_started:
            on_started(vm)
        outcome = None
        while qemu_proc.poll() is None:
            if stop.is_set():
                outcome = "interrupted"
                break
            launched.keep_filter_current(options.verbose)
            if launched.backend_failed():
                try:  # passt also ends when a finishing QEMU closes its socket (pasta when its namespace
                    # goes): only a live QEMU lost its network
                    qemu_proc.wait(timeout=2)
                    continue
                except subprocess.TimeoutExpired:
                    outcome = "network"
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
        for t in threads:
            t.join(timeout=5)
        launched.finish()
        console_text = launched.log.text()
        status = target.parse_exit(image.manifest, console_text)
        if outcome == "timeout":
            console.notice(f"jvmkit: the VM hit --timeout {options.timeout:g}s and was stopped")
            return EXIT_TIMEOUT
        if outcome == "interrupted":
            console.notice("jvmkit: interrupted; the VM was stopped")
            return EXIT_INTERRUPTED
        if outcome == "network":
            console.notice(f"jvmkit: error: the guest's network failed ({launched.backend_failed()}); "
                           "the VM was stopped")
            return EXIT_VM_FAILED
        if status is not None:
            return status
        reason = diagnose(console_text, b"".join(stderr_chunks).decode(errors="replace"), qemu_proc.returncode, target)
        log = keep_log(run, launched.log)
        console.notice(f"jvmkit: error: {reason} (console log: {log})")
        return EXIT_VM_FAILED
    finally:
        if launched is not None:  # also after an exception in between: no QEMU, passt or cgroup left
            if launched.process.poll() is None:
                launched.process.kill()
                launched.process.wait()
            launched.finish()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


KEPT_LOGS = 32  # the console logs of failed runs kept in the cache's logs/ (each at most 2 x consolelog.CAP)


def keep_log(run: rundir.RunDir, log: consolelog.BoundedLog | None = None, name: str | None = None) -> Path:
    """Keep a failed VM's console log in the cache's logs/ (the bounded log jvmkit read the console
    into, or, for an engine that writes the console file itself (libvirt), that file's last part),
    as `name` (ending in .console.log) or NAME.console.log."""
    logs = cache.cache_dir("logs")
    dest = logs / (name or f"{run.name}.console.log")
    try:
        if log is not None:
            data = log.data()
        else:
            with open(run.console_log, "rb") as handle:
                size = handle.seek(0, 2)
                handle.seek(max(0, size - consolelog.CAP))
                data = handle.read()
        fileio.atomic_write_bytes(dest, data, mode=0o600)
        kept = sorted(logs.glob("*.console.log"), key=lambda p: p.stat().st_mtime)
        for old in kept[:-KEPT_LOGS]:
            old.unlink(missing_ok=True)
    except OSError:
        return run.console_log
    return dest
