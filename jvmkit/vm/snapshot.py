"""Warm starts: save a VM once its app is ready (`jvmkit snapshot`), restore it on `jvmkit run`.

Taking a snapshot (vm/snaptake.py, `take`): boot the image cold the way `jvmkit run` would (its default or the
given memory, vCPUs and app arguments), with the guest agent started by a seed that opens its
snapshot control (vm/snapctl.py); wait until the app is ready (`io.jvmkit.Ready.signal()`, a guest
port accepting, a line of its output, or a delay); `prepare` (the app's beforeSnapshot hooks, a
full collection and heap shrink, free pages handed to the balloon); pause; save QEMU's migration
stream zstd-compressed into the bundle (vm/snapstate.py); record what it was taken from as the
manifest's `snapshot` section. The VM is then thrown away.

Restoring (`run_restored`, called by vm/runner.py unless `--cold`): when the snapshot matches this
host's QEMU and the run's memory, vCPUs, app arguments and devices (`mismatch`, pure), start QEMU
with the same machine and devices and `-incoming fd:N`, feed it the state (digest-checked as it
streams), `cont`, renew the guest's identity through the agent (fresh entropy, the host's wall
clock, new JMX credentials for `--balloon`; the app's afterRestore hooks), and only then publish
the run's ports. The runner's loop then handles exit status, `--timeout`, Ctrl-C, `stop` and the
balloon as for a cold boot. Anything that does not match, or fails before `cont` or in the
identity step, means one notice and a cold boot; every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from jvmkit import fileio, guest, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import bundle as bundles
from jvmkit.packager.manifest import Manifest, SnapshotInfo
from jvmkit.packager.targets.base import BootRequest
from jvmkit.units import mib_text
from jvmkit.vm import rundir, snapctl, snapstate
from jvmkit.vm.qemu import PortForward, VmConfig, device_signature, hostfwd_add_command, qemu_version
from jvmkit.vm.qmp import QmpClient, QmpError

SNAPSHOT_DIR = "snapshot"
LOAD_TIMEOUT_S = 60.0          # QEMU loading the state (a 4G guest's stream took ~1 s here)
RESTORE_ANSWER_S = 30.0        # the agent renewing the guest's identity, afterRestore hooks included
PREPARE_TIMEOUT_S = 120.0      # beforeSnapshot hooks and the trim's collections
SAVE_TIMEOUT_S = 600.0
# Only a VM's own seed reached it at boot; a restored VM gets this in its place so that its boot
# plan has the same devices (OSv's seed disk, linux's fw_cfg entry). The agent never reads it again.
PLACEHOLDER_SEED = b"# restored from a snapshot: the guest agent read its seed at boot\n"


class RestoreFailed(JvmkitError):
    """The snapshot could not be restored; the run boots cold instead."""


# ---- what a restore must match (pure) -----------------------------------------------------------

@dataclass(frozen=True)
class VmIdentity:
    """What this host and run would give a restored guest."""

    qemu_version: str
    accel: str
    cpu_model: str
    machine: str
    memory_mib: int
    cpus: int
    devices: tuple[str, ...]
    args: tuple[str, ...]
    boot_files: dict[str, str]
    network: str = ""        # the network backend (vm/network.py): "slirp" (root), "pasta" or "passt"


def identity_of(config: VmConfig, qemu_version_text: str, args: tuple[str, ...], boot_files: dict[str, str],
                network: str = "") -> VmIdentity:
    signature = device_signature(config)
    value = lambda flag: next((s.split(" ", 1)[1] for s in signature if s.startswith(flag + " ")), "")  # noqa: E731
    return VmIdentity(qemu_version=qemu_version_text, accel=config.accel, cpu_model=value("-cpu"),
                      machine=value("-machine"), memory_mib=config.memory_mib, cpus=config.cpus, devices=signature,
                      args=tuple(args), boot_files=dict(boot_files), network=network)


def mismatch(info: SnapshotInfo, wanted: VmIdentity) -> str | None:
    """Why the snapshot cannot be restored for this run (pure), or None when it can."""
    if info.boot_files != wanted.boot_files:
        return "it was taken from other boot files than the image's (the image was re-packed?)"
    if info.qemu_version != wanted.qemu_version:
        return f"it was taken with QEMU {info.qemu_version}, this host has QEMU {wanted.qemu_version}"
    if info.accel != wanted.accel:
        return f"it was taken under {info.accel.upper()}, this run uses {wanted.accel.upper()}"
    if info.memory_mib != wanted.memory_mib:
        return f"it was taken with {mib_text(info.memory_mib)} of memory, this run asks for {mib_text(wanted.memory_mib)}"
    if info.cpus != wanted.cpus:
        return f"it was taken with {info.cpus} vCPU(s), this run asks for {wanted.cpus}"
    if tuple(info.args) != wanted.args:
        return f"it was taken with the app arguments {_words(info.args)}, this run passes {_words(wanted.args)}"
    if info.cpu_model != wanted.cpu_model or info.machine != wanted.machine:
        return (f"it was taken on machine {info.machine} with CPU model {info.cpu_model}, this run would use "
                f"{wanted.machine} with {wanted.cpu_model}")
    if tuple(info.devices) != wanted.devices:
        theirs, ours = set(info.devices), set(wanted.devices)
        diff = sorted(theirs ^ ours) or ["their order"]
        return f"its devices differ from this run's ({diff[0]})"
    if info.network and wanted.network and info.network != wanted.network:
        # The guest keeps the gateway's MAC address it saw: saved on slirp it did not answer
        # passt's connections after a restore (measured: the restore session was reset).
        return (f"it was taken on the {info.network} network (jvmkit {'as root' if info.network == 'slirp' else 'without root'}), "
                f"this run uses {wanted.network}")
    return None


def _words(args) -> str:
    return "(none)" if not args else " ".join(args)


def effective_args(manifest: Manifest, args: tuple[str, ...] | None) -> tuple[str, ...]:
    return tuple(manifest.command.args) if args is None else tuple(args)


def boot_files(manifest: Manifest) -> dict[str, str]:
    return {role: record.raw_sha256 or record.sha256 for role, record in sorted(manifest.files.items())}


# ---- the VM a snapshot is taken in, and restored into --------------------------------------------

def vm_for(image: bundles.Bundle, target, files: dict[str, Path], run: rundir.RunDir, *, memory: int, cpus: int,
           accel: str, qemu: str, args: tuple[str, ...], seed: bytes, control: PortForward,
           free_page_reporting: bool = True, ports: tuple[PortForward, ...] = (), tcg_tb_mib: int | None = None):
    """(boot plan, VmConfig) of a snapshot VM: a cold boot's, with the agent's seed, the control
    forward (and `ports`) as its ports and the target's snapshot devices. The same for saving and
    restoring (the ports are not part of what a restore must match)."""
    from jvmkit.vm import runner

    manifest = image.manifest
    request_args = None if args == tuple(manifest.command.args) else args
    plan = target.boot_plan(manifest, files, BootRequest(args=request_args, seed=seed), run.write_secret)
    config = runner.vm_config(plan, name=run.name, memory_mib=memory, cpus=cpus, accel=accel, qemu=qemu, run=run,
                              ports=(control, *ports), free_page_reporting=free_page_reporting,
                              **({"tcg_tb_mib": tcg_tb_mib} if tcg_tb_mib else {}))
    return plan, dataclasses.replace(config, vmgenid=target.restore_traits(manifest).vmgenid)


def snapshot_seed(token: str, port: int = snapctl.CONTROL_GUEST_PORT) -> bytes:
    return f"snapshot.port={port}\nsnapshot.token={token}\n".encode()


class FdQmp(QmpClient):
    """QmpClient plus `getfd` (a file descriptor passed with SCM_RIGHTS)."""

    def getfd(self, name: str, fd: int) -> object:
        if self._sock is None:
            raise QmpError("QMP connection is closed")
        snapstate.send_fd(self._sock, name, fd)
        return self.await_reply("getfd")


def wait_migration(qmp: QmpClient, deadline: float, alive, what: str) -> dict:
    """Poll `query-migrate` until the migration completed; RestoreFailed/JvmkitError otherwise."""
    while True:
        if not alive():
            raise RestoreFailed(f"QEMU stopped while {what}")
        info = qmp.execute("query-migrate") or {}
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise RestoreFailed(f"QEMU failed {what}: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise RestoreFailed(f"QEMU did not finish {what} in time")
        time.sleep(0.005)


# ---- restore (the runner's hook) ------------------------------------------------------------------

@dataclass
class Resume:
    """What the runner's boot loop needs to start a VM from a snapshot instead of booting it."""

    info: SnapshotInfo
    token: str
    feeder: snapstate.Feeder
    read_fd: int
    control: PortForward
    ports: tuple[PortForward, ...]       # forwards to add once the identity is renewed (slirp)
    replay: bytes                        # the app's output up to the snapshot
    jmx_seed: str | None = None
    verbose: bool = False
    loaded_s: float | None = None
    started: bool = False                # attach() ran: the pipe's ends belong to QEMU and the feeder
    renewed_s: float | None = None
    published: tuple[PortForward, ...] = ()  # all the run's forwards (for its state: `ps`)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.read_fd,)

    def attach(self, vm) -> None:
        """Load the state, `cont`, renew the guest's identity, publish the ports (bounded)."""
        started = time.monotonic()
        self.started = True
        os.close(self.read_fd)
        self.feeder.start()
        alive = lambda: vm.process.poll() is None  # noqa: E731
        try:
            with QmpClient.connect(vm.config.qmp_socket, timeout=5.0, wait=10.0) as qmp:
                wait_migration(qmp, started + LOAD_TIMEOUT_S, alive, "loading the snapshot")
                self.feeder.join(timeout=max(0.1, started + LOAD_TIMEOUT_S - time.monotonic()))
                if not self.feeder.ok:
                    raise RestoreFailed(self.feeder.error or "the state file was not read to its end in time")
                self.loaded_s = time.monotonic() - started
                qmp.execute("cont")
                try:  # the NIC announces itself (the guest's gratuitous ARP, else QEMU's RARP) so that a
                    # network backend new to this guest (passt) learns where it is before the session
                    qmp.execute("announce-self", initial=1, max=50, rounds=2, step=50)
                except QmpError:
                    pass
                self.renew(alive)
                self.renewed_s = time.monotonic() - started
                for fwd in self.ports:
                    answer = qmp.execute("human-monitor-command", **{"command-line": hostfwd_add_command(fwd)})
                    if str(answer or "").strip():
                        raise RestoreFailed(f"--publish {fwd.spec()}: {str(answer).strip()}")
        except (QmpError, snapctl.ControlError, OSError, RestoreFailed) as exc:
            detail = str(exc)
            if vm.process.poll() is not None and vm.process.stderr is not None:
                from jvmkit.proc import last_line

                detail += f": {last_line(vm.process.stderr.read())}"
            raise RestoreFailed(detail) from None
        finally:
            if self.feeder.is_alive():
                self.feeder.join(timeout=1.0)

    def renew(self, alive) -> dict[str, str]:
        """The restore session, once the VM runs: the agent renews entropy, clock and credentials,
        runs the app's afterRestore hooks, and answers. (Sending it before `cont`, for the user
        network to hold, saved nothing measurable: 0.12-0.23 s either way.)"""
        t0 = time.monotonic()
        request = (snapctl.restore_head(self.token, entropy=secrets.token_bytes(32), clock=self.info.clock,
                                        seed=self.jmx_seed) + snapctl.restore_tail(int(time.time() * 1000)))
        client, answer = snapctl.open_session(self.control.host_addr, self.control.host_port, request,
                                              deadline=t0 + RESTORE_ANSWER_S, alive=alive,
                                              answer_timeout=RESTORE_ANSWER_S)
        client.close()
        if answer.startswith("error"):
            raise snapctl.ControlError(f"the guest agent refused the restore: {answer[6:]}")
        result = snapctl.parse_restored(answer)
        if self.verbose or ui.current().debug:
            lag = int(result.get("lag", "0") or 0)
            clock = f"wall clock {result.get('clock', '?')}" + (f", {lag / 1000:.1f} s behind the host's" if lag else "")
            ui.current().info(f"jvmkit: restored from the image's snapshot: state loaded in {self.loaded_s:.2f} s, "
                              f"identity renewed in {time.monotonic() - t0:.2f} s ({clock})")
        return result


def snapshot_problem(image: bundles.Bundle, info: SnapshotInfo) -> str | None:
    """Why the snapshot's files cannot be used (missing, wrong size, the small ones' digests)."""
    for what, record in (("state file", info.state), ("output file", info.output)):
        path = image.path / record.path
        if not bundles._inside(image.path, record.path) or not path.is_file():
            return f"its {what} {record.path} is missing"
        if path.stat().st_size != record.size:
            return f"its {what} {record.path} has {path.stat().st_size} bytes, the manifest says {record.size}"
    if fileio.sha256_file(image.path / info.output.path) != info.output.sha256:
        return f"its output file {info.output.path} does not match its SHA-256"
    if not bundles._inside(image.path, info.token) or not (image.path / info.token).is_file():
        return f"its token file {info.token} is missing"
    return None


def run_restored(image: bundles.Bundle, target, files: dict[str, Path], run: rundir.RunDir, options, *,
                 memory: int, cpus: int, accel: str, qemu: str, forwards: tuple[PortForward, ...],
                 jmx: dict | None, on_started=None, on_stopping=None, net=None) -> int | None:
    """Run IMAGE from its snapshot: the app's exit status, or None (after one notice) when the
    snapshot does not match this run or could not be restored, and the run should boot cold."""
    from jvmkit.vm import runner

    console = ui.current()
    manifest = image.manifest
    info = manifest.snapshot
    args = effective_args(manifest, options.args)
    control = PortForward("127.0.0.1", runner.free_port(), info.control_port)
    # QEMU's user network (slirp) takes forwards over QMP, so the run's ports open only once the
    # guest's identity is renewed; passt and pasta (runs without root) have their forwards from their
    # start (pasta's on the host need them before QEMU's in its namespace are asked for): a
    # connection in the fraction of a second before the renewal reaches the app as it was saved.
    late = net is None or net[1].backend == "slirp"
    plan, config = vm_for(image, target, files, run, memory=memory, cpus=cpus, accel=accel, qemu=qemu, args=args,
                          seed=PLACEHOLDER_SEED, control=control, free_page_reporting=options.free_page_reporting,
                          ports=() if late else forwards, tcg_tb_mib=options.tcg_cache_mib)
    wanted = identity_of(config, qemu_version(qemu) or "unknown", args, boot_files(manifest),
                         network=net[1].backend if net else "")
    reason = mismatch(info, wanted) or snapshot_problem(image, info)
    if reason:
        console.notice(f"jvmkit: not restoring the image's snapshot: {reason}; booting cold "
                       f"(`jvmkit snapshot` with this run's options takes one for it; `--cold` skips the snapshot)")
        return None
    token = (image.path / info.token).read_text().strip()
    replay = (image.path / info.output.path).read_bytes()
    read_fd, write_fd = os.pipe()
    feeder = snapstate.Feeder(image.path / info.state.path, write_fd, info.state.sha256)
    jmx_seed = None
    if jmx is not None:
        jmx_seed = guest.seed_text(jmx_host_port=jmx["port"], user=jmx["user"], password=jmx["password"],
                                   jmx_guest_port=manifest.guest.jmx_port)
    resume = Resume(info, token, feeder, read_fd, control, forwards if late else (), replay, jmx_seed,
                    verbose=options.verbose, published=forwards)
    config = dataclasses.replace(config, incoming=f"fd:{read_fd}")
    try:
        status = runner._boot(image, target, plan, run, config, options, jmx, on_started, on_stopping, net,
                              resume=resume)
    finally:
        if not resume.started:  # QEMU did not start: the pipe is still all ours
            os.close(read_fd)
            os.close(write_fd)
    if status is None:
        for leftover in (run.console_log, run.qmp_socket):
            leftover.unlink(missing_ok=True)
    return status


# ---- take --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Readiness:
    """When `jvmkit snapshot` considers the app ready (one of the four)."""

    kind: str                  # signal, port, url, line, after
    port: int | None = None
    url: str | None = None
    line: re.Pattern | None = None
    after_s: float | None = None

    def describe(self) -> str:
        if self.kind == "port":
            return f"port {self.port}"
        if self.kind == "url":
            return f"url {self.url}"
        if self.kind == "line":
            return f"line {self.line.pattern}"
        if self.kind == "after":
            return f"after {self.after_s:g}s"
        return "signal"


URL = re.compile(r"^http://[A-Za-z0-9.\-\[\]:]+(/[!-~]*)?$")  # no spaces: it is one word of the protocol


def readiness(ready_port: int | None, ready_line: str | None, ready_after: float | None,
              ready_url: str | None = None) -> Readiness:
    """The readiness condition from the options (pure): at most one; none means Ready.signal()."""
    given = [name for name, value in (("--ready-port", ready_port), ("--ready-url", ready_url),
                                      ("--ready-line", ready_line), ("--ready-after", ready_after)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} were both given; a snapshot waits for one of them",
                         hint="choose one of --ready-port, --ready-url, --ready-line, --ready-after")
    if ready_port is not None:
        return Readiness("port", port=ready_port)
    if ready_url is not None:
        if not URL.match(ready_url):
            raise UsageError(f"--ready-url {ready_url!r} is not an http:// URL without spaces",
                             hint="e.g. --ready-url http://127.0.0.1:8080/health (as the guest reaches the app)")
        return Readiness("url", url=ready_url)
    if ready_line is not None:
        try:
            return Readiness("line", line=re.compile(ready_line))
        except re.error as exc:
            raise UsageError(f"--ready-line {ready_line!r} is not a regular expression: {exc}") from None
    if ready_after is not None:
        return Readiness("after", after_s=ready_after)
    return Readiness("signal")

