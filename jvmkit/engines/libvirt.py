"""`jvmkit run --engine libvirt`: the image as a transient libvirt domain, and its balloon device.

The domain is made from the same boot plan and the same XML generator as `jvmkit export --format
libvirt` (engines/libvirt_xml.py), started with VIR_DOMAIN_START_AUTODESTROY: libvirt destroys it
when this process's connection closes, so no domain is left behind even if jvmkit is killed. Its
serial ports go to files in the run directory; those are tailed into the target's console pump (the
app's output on stdout, with --verbose the guest's own on stderr), and the app's exit status is
read from the console log with `Target.parse_exit`, as the QEMU runner does. `ps`, `stop` and
`balloon` find it through the run directory (state.json names the engine, the URI and the domain).

libvirt-python is an optional dependency (`pip install 'jvmkit[libvirt]'`; it builds against
libvirt-dev + pkg-config), imported only here and only when this engine is used.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jvmkit import cache, ui
from jvmkit.balloon.host import BalloonDevice, DeviceLost
from jvmkit.engines import libvirt_xml
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import bundle as bundles
from jvmkit.packager import targets
from jvmkit.units import mib_text
from jvmkit.vm import iouring, kvm, rundir, runner
from jvmkit.vm.qemu import PortForward, find_qemu

POLL_S = 0.2
STOP_GRACE = runner.STOP_GRACE
DOMAIN_PREFIX = "jvmkit-"


def libvirt_module():
    """libvirt-python, or one line saying how to get it. Its default error handler prints every
    error to stderr as well; jvmkit reports errors itself, so that handler is silenced."""
    try:
        import libvirt
    except ImportError:
        raise JvmkitError("--engine libvirt needs the libvirt Python bindings, which are not installed",
                          hint="pip install 'jvmkit[libvirt]' (builds with libvirt-dev and pkg-config: "
                               "apt-get install libvirt-dev pkg-config)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def error_text(exc: BaseException) -> str:
    message = getattr(exc, "get_error_message", lambda: None)() or str(exc)
    return " ".join(message.split())


def connect(uri: str):
    lv = libvirt_module()
    try:
        return lv.open(uri)
    except lv.libvirtError as exc:
        raise JvmkitError(f"--connect {uri}: cannot connect to libvirt ({error_text(exc)})",
                          hint="is libvirtd running? check with `virsh -c URI version`") from None


def is_local(uri: str) -> bool:
    """A URI without a host part (qemu:///system, qemu:///session): the domain runs on this host."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    return rest.startswith("/")


def qemu_pid_of(domain_name: str) -> int | None:
    """The QEMU pid of a local qemu:///system domain, from libvirt's pid file (None if unreadable)."""
    try:
        return int(Path(f"/run/libvirt/qemu/{domain_name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


class LibvirtBalloon(BalloonDevice):
    """A libvirt domain's virtio-balloon: memoryStats() and setMemoryFlags(AFFECT_LIVE).

    libvirt's names for QEMU's guest stats: `available` is stat-total-memory, `usable`
    stat-available-memory, `unused` stat-free-memory, `last_update` their time; all in KiB. An OSv
    guest reports only `actual`. Any libvirt error (the domain is gone, the connection is lost) is a
    DeviceLost, which the controller meets with deflate and back-off."""

    def __init__(self, domain):
        self.domain = domain
        self._lv = libvirt_module()

    def read(self) -> dict:
        try:
            stats = self.domain.memoryStats()
        except self._lv.libvirtError as exc:
            raise DeviceLost(f"libvirt: {error_text(exc)}") from None
        if "actual" not in stats:
            raise DeviceLost("libvirt: the domain reports no balloon")
        updated = int(stats.get("last_update", 0) or 0)

        def kib(name):
            value = stats.get(name)
            return None if not updated or value is None else int(value) * 1024

        return {"actual": int(stats["actual"]) * 1024, "updated": updated, "total": kib("available"),
                "available": kib("usable"), "free": kib("unused")}

    def set(self, target_bytes: int) -> None:
        try:
            self.domain.setMemoryFlags(int(target_bytes) // 1024, self._lv.VIR_DOMAIN_AFFECT_LIVE)
        except self._lv.libvirtError as exc:
            raise DeviceLost(f"libvirt: {error_text(exc)}") from None
        self.changed_at = time.time()


def attach(state: dict) -> LibvirtBalloon:
    """The balloon of a running `--engine libvirt` VM, from its run directory's state (`balloon
    status` from another process). A domain that is gone or an unreachable libvirt is a DeviceLost."""
    lv = libvirt_module()
    try:
        domain = lv.open(state["connect"]).lookupByName(state["domain"])
    except lv.libvirtError as exc:
        raise DeviceLost(f"libvirt: {error_text(exc)}") from None
    return LibvirtBalloon(domain)


@dataclass
class LibvirtVm:
    """A started domain as the balloon controller sees it (balloon.host.VmHandle)."""

    name: str
    run: rundir.RunDir
    domain: Any
    memory_mib: int
    jmx: dict | None = None
    pid: int | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def qemu_pid(self) -> int | None:
        return self.pid

    def balloon_device(self) -> LibvirtBalloon:
        return LibvirtBalloon(self.domain)


# ---- the console: files tailed into the target's pump ----------------------------------------------

class FileFeed:
    """Copies a growing file into a pipe until `finish()`: the read end goes to `Target.console_pump`,
    which reads a pipe as it reads QEMU's stdout under the QEMU runner."""

    def __init__(self, path: Path):
        self.path = path
        self.read_fd, self.write_fd = os.pipe()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._copy, daemon=True)

    def _copy(self) -> None:
        pos = 0
        try:
            while True:
                finishing = self.done.is_set()
                try:
                    with open(self.path, "rb") as handle:
                        handle.seek(pos)
                        data = handle.read()
                except FileNotFoundError:
                    data = b""
                if data:
                    pos += len(data)
                    os.write(self.write_fd, data)
                elif finishing:
                    return
                else:
                    time.sleep(0.05)
        except OSError:
            pass
        finally:
            os.close(self.write_fd)

    def start(self) -> "FileFeed":
        self.thread.start()
        return self

    def finish(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


# ---- run --------------------------------------------------------------------------------------------

def domain_spec(name: str, plan, *, memory_mib: int, cpus: int, accel: str, run: rundir.RunDir,
                ports: tuple[PortForward, ...], disk_aio: str | None, free_page_reporting: bool,
                image: str, target: str, tcg_tb_mib: int | None = None) -> libvirt_xml.DomainSpec:
    return libvirt_xml.DomainSpec(
        name=name, plan=plan, memory_mib=memory_mib, cpus=cpus, accel=accel, console_log=run.console_log,
        app_log=run.path / "app.log" if libvirt_xml.app_log_needed(plan) else None, ports=ports,
        disk_aio=disk_aio, free_page_reporting=free_page_reporting, image=image, target=target,
        **({"tb_cache_mib": tcg_tb_mib} if tcg_tb_mib else {}))


def _accel(requested: str, uri: str, kernel: Path) -> tuple[str, str]:
    if not is_local(uri):  # jvmkit cannot probe another host's KVM: ask for it unless told otherwise
        return ("tcg", "using TCG, as asked") if requested == "tcg" else ("kvm", f"using KVM on {uri}")
    qemu = find_qemu()
    return runner.choose_accel(requested, lambda: kvm.kvm_verdict(qemu, kernel=kernel))


def run(image_path: Path, options, on_started: Callable[[LibvirtVm], None] | None = None,
        on_stopping: Callable[[LibvirtVm], None] | None = None) -> int:
    """`jvmkit run --engine libvirt IMAGE`: the same checks, boot plan and exit statuses as the QEMU
    runner (vm/runner.py), with libvirt starting QEMU."""
    console = ui.current()
    lv = libvirt_module()
    image = bundles.load(image_path)
    manifest = image.manifest
    target = targets.get(manifest.target, "image target")
    forwards = [runner.parse_publish(p) for p in options.publish]
    runner.check_publish(forwards)
    local = is_local(options.connect)
    if local:
        for fwd in forwards:
            runner.check_port_free(fwd)
    memory = options.memory_mib or manifest.defaults.memory_mib
    cpus = options.cpus or manifest.defaults.cpus
    asked = f"--memory {mib_text(memory)}" if options.memory_mib else f"the image's default memory ({mib_text(memory)})"
    target.memory_floor(manifest.files).check(memory, asked, str(image_path), explicit=bool(options.memory_mib))
    if local:
        runner.check_memory(memory, asked, runner.host_memory_mib())
    if not 1 <= cpus <= 64:
        raise UsageError(f"--cpus {cpus} is out of range (1-64)")
    if manifest.boot.machine not in libvirt_xml.ROOT_BUS:
        raise UsageError(f"image {image_path} asks for machine type {manifest.boot.machine!r}, which the libvirt "
                         f"engine does not know (known: {', '.join(libvirt_xml.ROOT_BUS)})",
                         hint="re-pack the image with this jvmkit")
    files = runner.prepare_boot_files(image)
    accel, accel_note = _accel(options.accel, options.connect, files["kernel"])
    if options.verbose:
        console.info(f"jvmkit: libvirt {options.connect}: {accel_note}")
    conn = connect(options.connect)
    run_dir = rundir.create(options.name or image.name, explicit=options.name is not None)
    domain = None
    try:
        jmx, request = runner.boot_request(manifest, options, forwards)
        plan = target.boot_plan(manifest, files, request, run_dir.write_secret)
        qemu = find_qemu() if local else None
        spec = domain_spec(DOMAIN_PREFIX + run_dir.name, plan, memory_mib=memory, cpus=cpus, accel=accel,
                           run=run_dir, ports=tuple(forwards),
                           disk_aio=iouring.disk_aio(qemu) if plan.disk and qemu else None,
                           free_page_reporting=options.free_page_reporting, image=str(image.path),
                           target=target.name, tcg_tb_mib=options.tcg_cache_mib)
        xml = libvirt_xml.domain_xml(spec)
        (run_dir.path / "domain.xml").write_text(xml)
        try:
            domain = conn.createXML(xml, lv.VIR_DOMAIN_START_AUTODESTROY)
        except lv.libvirtError as exc:
            kept = cache.cache_dir("logs") / f"{run_dir.name}.domain.xml"
            kept.write_text(xml)
            raise JvmkitError(f"libvirt could not start the domain: {error_text(exc)}",
                              hint=f"the domain XML is kept in {kept}") from None
        pid = qemu_pid_of(spec.name) if local else None
        vm = LibvirtVm(run_dir.name, run_dir, domain, memory, jmx, pid)
        run_dir.write_state({"name": run_dir.name, "engine": "libvirt", "connect": options.connect,
                             "domain": spec.name, "uuid": domain.UUIDString(),
                             # `ps`/`stop` look for a live pid here: QEMU's when libvirt is local, else ours
                             "qemu_pid": pid or os.getpid(), "jvmkit_pid": os.getpid(),
                             "image": str(image.path), "target": target.name, "memory_mib": memory, "cpus": cpus,
                             "accel": accel, "qmp": None,
                             "tcg_tb_mib": spec.tb_cache_mib if accel == "tcg" else None,
                             "ports": [f"{p.host_addr}:{p.host_port}->{p.guest_port}" for p in forwards],
                             "jmx": {k: v for k, v in (jmx or {}).items() if k != "password"} or None,
                             "started": time.time()})
        return _watch(lv, target, manifest, plan, spec, vm, options, on_started, on_stopping)
    finally:
        if domain is not None:
            _destroy(lv, domain)
        try:
            conn.close()
        except lv.libvirtError:
            pass
        run_dir.remove()


def _alive(lv, domain) -> bool | None:
    """True while the domain runs, False once it ended (a transient domain disappears), None when
    libvirt cannot be asked (the connection is lost)."""
    try:
        return bool(domain.isActive())
    except lv.libvirtError as exc:
        return False if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN else None


def _destroy(lv, domain) -> None:
    try:
        domain.destroy()
    except lv.libvirtError:
        pass


def stop_domain(lv, domain, graceful: bool, grace: float = STOP_GRACE) -> None:
    """ACPI power-down (if the guest handles it) for up to `grace` seconds, then destroy."""
    if graceful:
        try:
            domain.shutdown()
        except lv.libvirtError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(lv, domain):
            time.sleep(POLL_S)
    if _alive(lv, domain):
        _destroy(lv, domain)


def _watch(lv, target, manifest, plan, spec: libvirt_xml.DomainSpec, vm: LibvirtVm, options,
           on_started, on_stopping) -> int:
    console = ui.current()
    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda _s, _f: stop.set())
        except ValueError:  # not the main thread
            pass
    app_file = spec.app_log if spec.app_log is not None else spec.console_log
    feed = FileFeed(app_file).start()
    pump_console = target.console_pump(sys.stdout.buffer, sys.stderr.buffer if options.verbose else None)
    pump = threading.Thread(target=pump_console, args=(os.fdopen(feed.read_fd, "rb", buffering=0),), daemon=True)
    pump.start()
    tail_stop = threading.Event()
    tail = None
    if options.verbose and spec.app_log is not None:
        tail = threading.Thread(target=runner._tail, args=(spec.console_log, tail_stop, sys.stderr), daemon=True)
        tail.start()
    try:
        started = time.monotonic()
        if on_started:
            on_started(vm)
        outcome = None
        while True:
            alive = _alive(lv, vm.domain)
            if alive is None:
                outcome = "lost"
                break
            if not alive:
                break
            if stop.is_set():
                outcome = "interrupted"
                break
            if options.timeout and time.monotonic() - started > options.timeout:
                outcome = "timeout"
                break
            stop.wait(POLL_S)
        if on_stopping:
            on_stopping(vm)
        if outcome in ("interrupted", "timeout"):
            stop_domain(lv, vm.domain, graceful=plan.acpi_shutdown and outcome == "interrupted")
        feed.finish()
        pump.join(timeout=5)
        tail_stop.set()
        if tail is not None:
            tail.join(timeout=2)
        console_text = spec.console_log.read_text(errors="replace") if spec.console_log.exists() else ""
        status = target.parse_exit(manifest, console_text)
        if outcome == "timeout":
            console.notice(f"jvmkit: the VM hit --timeout {options.timeout:g}s and was stopped")
            return runner.EXIT_TIMEOUT
        if outcome == "interrupted":
            console.notice("jvmkit: interrupted; the VM was stopped")
            return runner.EXIT_INTERRUPTED
        if status is not None:
            return status
        if outcome == "lost":
            reason = f"lost the connection to libvirt ({options.connect}); the domain is destroyed with it"
        else:
            reason = runner.diagnose(console_text, "", None, target).replace(
                "the VM stopped without reporting the app's exit status (QEMU exit None)",
                "the domain ended without reporting the app's exit status")
        log = runner.keep_log(vm.run)
        console.notice(f"jvmkit: error: {reason} (console log: {log})")
        return runner.EXIT_VM_FAILED
    finally:
        feed.finish()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
