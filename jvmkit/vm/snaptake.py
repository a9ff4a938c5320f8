"""`jvmkit snapshot IMAGE` (and `pack --snapshot`): boot, wait until the app is ready, trim,
pause, save the VM into the bundle's `snapshot/` and record it in the manifest.

The VM boots as `jvmkit run` would boot it (the same boot plan, devices and argv, vm/snapshot.py's
`vm_for`), with a seed that starts the guest agent's snapshot control. Readiness (one of):
`io.jvmkit.Ready.signal()` from the app (the default), a guest port accepting a connection
(`--ready-port`, checked inside the guest, so QEMU's user network's early accept cannot fool it),
a line of the app's output matching `--ready-line`, or `--ready-after` seconds after the VM
started. Then the agent runs the app's beforeSnapshot hooks and trims the heap, the guest gets
`RestoreTraits.settle_s` to hand its free pages to the balloon, and the VM is paused and saved.

The bundle is updated in place and atomically for readers: the state, output and token files
(0600, in `snapshot/`, 0700) are written under names carrying the state's digest, then the
manifest is replaced by rename, then the previous snapshot's files are removed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jvmkit import __version__, fileio, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import bundle as bundles
from jvmkit.packager import targets
from jvmkit.packager.manifest import FileRecord, SnapshotInfo
from jvmkit.units import human, mib_text
from jvmkit.vm import kvm, launch, network, rundir, snapctl, snapstate
from jvmkit.vm.qemu import PortForward, find_qemu, qemu_version
from jvmkit.vm.qmp import QmpError
from jvmkit.vm.snapshot import (PREPARE_TIMEOUT_S, SAVE_TIMEOUT_S, SNAPSHOT_DIR, FdQmp, RestoreFailed, boot_files,
                                effective_args, identity_of, readiness, snapshot_seed, vm_for, wait_migration)


@dataclass(frozen=True)
class SnapshotResult:
    image: Path
    info: SnapshotInfo
    seconds: float
    save_seconds: float

    def summary(self) -> str:
        i = self.info
        used = f", guest used {i.guest_used_mib} MiB" if i.guest_used_mib is not None else ""
        return (f"{self.image}  snapshot {human(i.state.size)}{used}  {mib_text(i.memory_mib)} {i.cpus} vCPU "
                f"{i.accel}  ready by {i.ready}  {self.seconds:.1f}s (save {self.save_seconds:.1f}s)")

    def to_dict(self) -> dict:
        return {"image": str(self.image), "seconds": round(self.seconds, 3), "save_seconds": round(self.save_seconds, 3),
                "snapshot": dataclasses.asdict(self.info)}


class Capture:
    """The app's output during the snapshot boot: kept (a restore replays it), matched against
    `--ready-line`, and echoed to stderr with --verbose."""

    def __init__(self, pattern=None, echo=None):
        self.data = bytearray()
        self.pattern, self.echo = pattern, echo
        self.matched = threading.Event()
        self._partial = b""
        self._lock = threading.Lock()

    def write(self, data: bytes) -> int:
        with self._lock:
            self.data += data
            if self.pattern is not None and not self.matched.is_set():
                *lines, self._partial = (self._partial + bytes(data)).split(b"\n")
                if any(self.pattern.search(line.decode(errors="replace")) for line in lines):
                    self.matched.set()
        if self.echo is not None:
            self.echo.write(data)
        return len(data)

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()


def take(image_path: Path, options) -> SnapshotResult:
    from jvmkit.vm import runner

    console = ui.current()
    began = time.monotonic()
    image = bundles.load(image_path)
    manifest = image.manifest
    target = targets.get(manifest.target, "image target")
    ready = readiness(options.ready_port, options.ready_line, options.ready_after, options.ready_url)
    qemu = find_qemu()
    memory = options.memory_mib or manifest.defaults.memory_mib
    cpus = options.cpus or manifest.defaults.cpus
    asked = f"--memory {mib_text(memory)}" if options.memory_mib else f"the image's default memory ({mib_text(memory)})"
    target.memory_floor(manifest.files).check(memory, asked, str(image_path), explicit=bool(options.memory_mib))
    runner.check_memory(memory, asked, runner.host_memory_mib())
    if manifest.boot.machine not in target.machines:
        raise UsageError(f"image {image_path} asks for QEMU machine type {manifest.boot.machine!r}, which this jvmkit "
                         f"does not use for {target.name} images", hint="re-pack the image with this jvmkit")
    files = runner.prepare_boot_files(image)
    accel, accel_note = runner.choose_accel(options.accel, lambda: kvm.kvm_verdict(qemu, kernel=files["kernel"]))
    if options.verbose:
        console.info(f"jvmkit: {accel_note}")
    args = effective_args(manifest, options.args)
    token = secrets.token_urlsafe(24)
    traits = target.restore_traits(manifest)
    run = rundir.create(f"{image.name}-snapshot", explicit=False)
    try:
        control = PortForward("127.0.0.1", runner.free_port(), snapctl.CONTROL_GUEST_PORT)
        plan, config = vm_for(image, target, files, run, memory=memory, cpus=cpus, accel=accel, qemu=qemu, args=args,
                              seed=snapshot_seed(token), control=control,
                              free_page_reporting=options.free_page_reporting, tcg_tb_mib=options.tcg_cache_mib)
        capture = Capture(ready.line, sys.stderr.buffer if options.verbose else None)
        console.info(f"jvmkit: booting {image.name} for a snapshot ({target.name}, {mib_text(memory)}, {cpus} vCPU, "
                     f"{accel}); ready by {ready.describe()}")
        started = time.monotonic()
        # Through launch like a run: the same network wall (the host filter or passt), sandbox and
        # console cap, so the app that is saved ran as confined as the restores that resume it.
        policy = network.Policy()
        launched = launch.start(config, run, policy, launch.plan_network(policy), verbose=options.verbose,
                                stderr=sys.stderr.buffer)
        qemu_proc, config = launched.process, launched.config
        run.write_state({"name": run.name, "qemu_pid": qemu_proc.pid, "jvmkit_pid": os.getpid(), "image": str(image.path),
                         "target": target.name, "memory_mib": memory, "cpus": cpus, "accel": accel,
                         "qmp": str(config.qmp_socket), "ports": [], "snapshot": True, "started": time.time(),
                         "network": launched.network.choice.backend,
                         "qemu_uid": config.confinement.runas[0] if config.confinement.runas else None})
        stderr: list[bytes] = []
        app_pipe = os.fdopen(launched.app_fd, "rb", buffering=0)
        threads = [threading.Thread(target=target.console_pump(capture, sys.stderr.buffer if options.verbose else None),
                                    args=(app_pipe,), daemon=True),
                   threading.Thread(target=lambda: stderr.append(qemu_proc.stderr.read()), daemon=True)]
        for t in threads:
            t.start()
        try:
            prepared = _until_prepared(control, token, ready, lambda: qemu_proc.poll() is None, started,
                                       options.ready_timeout, capture.matched.is_set, traits.clock)
            if traits.settle_s:
                time.sleep(traits.settle_s)
            state_dir = image.path / SNAPSHOT_DIR
            state_dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(state_dir, 0o700)
            tmp = state_dir / f".state-{secrets.token_hex(4)}.tmp"
            saving = time.monotonic()
            try:
                saved, stats = _save(config.qmp_socket, tmp, qemu_proc)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            save_s = time.monotonic() - saving
        except (snapctl.ControlError, RestoreFailed) as exc:
            runner.stop_vm(runner.RunningVm(run.name, run, config, qemu_proc, memory), graceful=False)
            for t in threads:
                t.join(timeout=5)
            why = _why_not(exc, target, manifest, run, b"".join(stderr), qemu_proc.returncode, ready)
            kept = runner.keep_log(run, launched.log)  # the run directory goes: keep what the guest printed
            raise JvmkitError(f"{why} (console log: {kept})", hint=_hint(exc, ready)) from None
        finally:
            if qemu_proc.poll() is None:
                runner.stop_vm(runner.RunningVm(run.name, run, config, qemu_proc, memory), graceful=False)
            for t in threads:
                t.join(timeout=5)
            launched.finish()  # no passt or host-filter cgroup left behind, whatever happened
        identity = identity_of(config, qemu_version(qemu) or "unknown", args, boot_files(manifest),
                               network=launched.network.choice.backend)
        info = _publish(image, tmp, saved, bytes(capture.data), token, identity, ready, traits, prepared)
    finally:
        run.remove()
    if options.verbose:
        console.info(f"jvmkit: migration stream {human(saved.raw_size)} ({stats.get('normal', '?')} non-zero pages), "
                     f"state file {human(saved.size)}")
    return SnapshotResult(image.path, info, time.monotonic() - began, save_s)


def _until_prepared(control: PortForward, token: str, ready, alive, started: float, timeout: float, line_seen,
                    clock: str):
    """The snapshot session: the agent's hello, readiness, prepare; returns what prepare reported."""
    deadline = started + timeout
    client, _ = snapctl.open_session(control.host_addr, control.host_port, snapctl.snapshot_request(token),
                                     deadline=deadline, alive=alive)
    try:
        if ready.kind in ("signal", "port", "url"):
            command = {"signal": "wait signal", "port": f"wait port {ready.port}", "url": f"wait url {ready.url}"}
            client.send(command[ready.kind].encode() + b"\n")
            answer = client.wait_line(deadline, alive, "the app to be ready")
            if answer != "ready":
                raise snapctl.ControlError(f"the guest agent answered {answer!r} while waiting for the app")
        else:
            until = started + ready.after_s if ready.kind == "after" else deadline
            while not (ready.kind == "line" and line_seen()):
                if not alive():
                    raise snapctl.ControlError("the VM stopped before the app was ready")
                if time.monotonic() >= until:
                    if ready.kind == "line":
                        raise snapctl.ControlTimeout("timed out waiting for the app to be ready")
                    break
                time.sleep(0.05)
        client.send(f"prepare clock={clock}\n".encode())
        answer = client.wait_line(time.monotonic() + PREPARE_TIMEOUT_S, alive, "the trim")
        if answer.startswith("error"):
            raise snapctl.ControlError(f"the guest agent could not prepare the snapshot: {answer[6:]}")
        prepared = snapctl.parse_prepared(answer)
        client.line(timeout=10.0)  # EOF: the agent closed first, its side is quiet now
        return prepared
    finally:
        client.close()


def _save(qmp_socket: Path, dest: Path, qemu_proc) -> tuple[snapstate.Saved, dict]:
    """Pause the VM and write its migration stream, compressed, to `dest` (0600)."""
    alive = lambda: qemu_proc.poll() is None  # noqa: E731
    read_fd, write_fd = os.pipe()
    saver = snapstate.Saver(read_fd, dest)
    saver.start()
    try:
        with FdQmp.connect(qmp_socket, timeout=10.0) as qmp:
            qmp.execute("stop")
            try:
                qmp.getfd("jvmkit-snapshot", write_fd)
            finally:
                os.close(write_fd)
                write_fd = -1
            qmp.execute("migrate", uri="fd:jvmkit-snapshot")
            info = wait_migration(qmp, time.monotonic() + SAVE_TIMEOUT_S, alive, "saving the VM")
            saver.join(timeout=SAVE_TIMEOUT_S)
            if saver.error or saver.result is None:
                raise JvmkitError(saver.error or "the state file was not finished in time")
            try:
                qmp.execute("quit")
            except QmpError:
                pass
    finally:
        if write_fd >= 0:
            os.close(write_fd)
    return saver.result, dict(info.get("ram") or {})


def _why_not(exc, target, manifest, run, stderr: bytes, qemu_rc, ready) -> str:
    """One line on why no snapshot was taken: the app ended, the VM failed, or the wait timed out."""
    from jvmkit.vm import runner

    console_text = run.console_log.read_text(errors="replace") if run.console_log.exists() else ""
    status = target.parse_exit(manifest, console_text)
    if status is not None:
        return f"no snapshot taken: the app ended (exit status {status}) before it was ready by {ready.describe()}"
    if qemu_rc is not None and qemu_rc != 0 or "stopped" in str(exc):
        reason = runner.diagnose(console_text, stderr.decode(errors="replace"), qemu_rc, target)
        return f"no snapshot taken: {reason}"
    return f"no snapshot taken: {exc}"


def _hint(exc, ready) -> str | None:
    text = str(exc)
    if "control port" in text:
        return "an image packed by a jvmkit without snapshots has no snapshot control in its guest agent: re-pack it"
    if isinstance(exc, snapctl.ControlTimeout) and ready.kind == "signal":
        return ("the app never called io.jvmkit.Ready.signal(); give --ready-port, --ready-line or --ready-after, "
                "or a longer --ready-timeout")
    if isinstance(exc, snapctl.ControlTimeout):
        return "give a longer --ready-timeout"
    return None


def _publish(image: bundles.Bundle, tmp: Path, saved: snapstate.Saved, output: bytes, token: str, identity, ready,
             traits, prepared) -> SnapshotInfo:
    """Move the files into `snapshot/`, point the manifest at them, drop the previous snapshot's."""
    state_dir = image.path / SNAPSHOT_DIR
    tag = saved.sha256[:16]
    state_rel, output_rel, token_rel = (f"{SNAPSHOT_DIR}/state-{tag}.zst", f"{SNAPSHOT_DIR}/output-{tag}.txt",
                                        f"{SNAPSHOT_DIR}/token-{tag}")
    os.chmod(tmp, 0o600)  # the guest's memory, secrets included
    os.replace(tmp, image.path / state_rel)
    fileio.write_private(image.path / output_rel, output)
    fileio.write_private(image.path / token_rel, token.encode() + b"\n")
    mib = lambda n: None if n is None or n < 0 else round(n / (1 << 20))  # noqa: E731
    info = SnapshotInfo(
        state=FileRecord(state_rel, saved.sha256, saved.size, compression="zstd", raw_size=saved.raw_size),
        output=FileRecord(output_rel, fileio.sha256_bytes(output), len(output)),
        token=token_rel, boot_files=identity.boot_files, qemu_version=identity.qemu_version, accel=identity.accel,
        cpu_model=identity.cpu_model, machine=identity.machine, memory_mib=identity.memory_mib, cpus=identity.cpus,
        devices=identity.devices, args=identity.args, network=identity.network, ready=ready.describe(), control_port=snapctl.CONTROL_GUEST_PORT,
        clock=traits.clock, guest_used_mib=mib(prepared.guest_used), heap_committed_mib=mib(prepared.heap_committed),
        taken=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        created_by=f"jvmkit {__version__}")
    manifest = dataclasses.replace(image.manifest, snapshot=info)
    fileio.atomic_write_bytes(image.path / bundles.MANIFEST, bundles.manifest_text(manifest).encode(), mode=0o644)
    keep = {Path(p).name for p in (state_rel, output_rel, token_rel)}
    for old in state_dir.iterdir():
        if old.name not in keep and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    return info


def remove(image_path: Path) -> bool:
    """Drop an image's snapshot (manifest section first, then the files); False when it had none."""
    image = bundles.load(image_path, verify=False)
    if image.manifest.snapshot is None:
        return False
    manifest = dataclasses.replace(image.manifest, snapshot=None)
    fileio.atomic_write_bytes(image.path / bundles.MANIFEST, bundles.manifest_text(manifest).encode(), mode=0o644)
    state_dir = image.path / SNAPSHOT_DIR
    if state_dir.is_dir():
        for old in state_dir.iterdir():
            old.unlink(missing_ok=True)
        state_dir.rmdir()
    return True
