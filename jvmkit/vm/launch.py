"""Starting QEMU for `jvmkit run`: confined, on the network its policy allows, its console capped.

`plan_network(policy)` decides the network backend before any run state exists (a missing passt
is one line, exit status 1). `start(config, run, choice)` then, in order: puts up the host filter
(hostfilter.py) when the choice needs it, decides QEMU's confinement (sandbox.py), starts passt
when it is the backend, opens the console pipe, starts QEMU (in the filter's cgroup, its own
process group, umask 077, parent-death signal; on pasta inside `unshare` and the namespace's
shell, which `exec`s it), then pasta once QEMU's namespace exists, and, when QEMU drops to a
dynamic user, the lifeline that stands in for the parent-death signal that drop clears. `Launched.finish()` undoes
it all once QEMU has ended.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from jvmkit import cache, fileio, proc, ui
from jvmkit.vm import consolelog, hostfilter, network, rundir, sandbox
from jvmkit.vm.qemu import VmConfig, qemu_argv


def plan_network(policy: network.Policy, filter_reason: str | None = "") -> network.Choice:
    """The backend for `policy` on this host (raises a one-line error where none is safe).
    `filter_reason`: why the host filter is not available, when already known ("": find out).
    The namespace is probed only where it would be chosen."""
    filter_reason = filter_unavailable() if filter_reason == "" else filter_reason
    forced = os.environ.get(network.BACKEND_ENV)
    wants_namespace = policy.mode == "outbound" and not policy.allow_host_loopback and (
        forced == network.PASTA or (filter_reason is not None and forced not in ("slirp", "passt")))
    return network.choose(policy, filter_reason=filter_reason, passt=network.find_passt(), forced=forced,
                          namespace_reason=namespace_unavailable() if wants_namespace else "it was not needed")


def namespace_unavailable() -> str | None:
    """Why QEMU cannot run in pasta's network namespace here (None: it can); probes only what it
    must (a user namespace: one `unshare -Urn true`, a few ms)."""
    root = os.geteuid() == 0
    tools = {name: shutil.which(name) for name in (network.PASTA, "unshare", "ip", "nsenter")}
    tun = os.access("/dev/net/tun", os.R_OK | os.W_OK)
    userns = None
    if not root and tun and all(tools.values()):
        done = proc.run([tools["unshare"], "--user", "--map-root-user", "--net", "true"], what="unshare",
                        check=False, timeout=10)
        userns = done.returncode == 0
    return network.namespace_problem(root=root, tools=tools, tun_usable=tun, userns_works=userns)


def _host_addresses() -> tuple[str, ...]:
    """This host's IPv4 addresses but loopback, as the host filter reads them."""
    return hostfilter.new_addresses((), hostfilter.read_or_empty("/proc/net/fib_trie"))


def filter_unavailable() -> str | None:
    """Why the host filter cannot be set up here, from what is cheap to know (None: try it)."""
    if os.geteuid() != 0:
        return "it needs root"
    if hostfilter.cgroup2_mount(hostfilter.read_or_empty("/proc/self/mountinfo")) is None:
        return "no cgroup v2 hierarchy is mounted"
    return None


def _set_pdeathsig() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_setup(host_filter: hostfilter.HostFilter | None) -> Callable[[], None]:
    """What a child (QEMU, passt) does before exec: die with jvmkit, its own process group (Ctrl-C
    at the terminal reaches jvmkit only; jvmkit stops QEMU itself), files it creates private,
    and into the host filter's cgroup."""

    def setup() -> None:
        _set_pdeathsig()
        os.setpgrp()
        os.umask(0o077)
        if host_filter is not None:
            host_filter.join()

    return setup


def say_once(key: str, text: str, verbose: bool) -> None:
    """A notice shown when it is new on this host (or with --verbose), like the KVM verdict's."""
    path = cache.cache_root() / "notes.json"
    try:
        notes = json.loads(path.read_text())
        if not isinstance(notes, dict):
            notes = {}
    except (OSError, ValueError):
        notes = {}
    if verbose or notes.get(key) != text:
        ui.current().notice(f"jvmkit: {text}")
    if notes.get(key) != text:
        notes[key] = text
        try:
            fileio.atomic_write_bytes(path, json.dumps(notes, indent=2, sort_keys=True).encode())
        except OSError:
            pass


@dataclass
class Launched:
    process: subprocess.Popen
    config: VmConfig                             # as started: network, console pipe, confinement
    log: consolelog.BoundedLog
    app_fd: int                                  # what the target's console pump reads
    network: network.Network
    host_filter: hostfilter.HostFilter | None = None
    lifeline: sandbox.Lifeline | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    finished: bool = False
    filter_checked: float = 0.0

    def keep_filter_current(self, verbose: bool = False) -> None:
        """Deny host addresses gained since the VM started (every hostfilter.REFRESH_S; cheap: one
        read of /proc/net/fib_trie): one more filter program, or on pasta one more `prohibit`
        route in QEMU's namespace. A filter that cannot take more programs is said once."""
        now = time.monotonic()
        pasta = self.network.choice.backend == network.PASTA
        if (self.host_filter is None and not pasta) or now - self.filter_checked < hostfilter.REFRESH_S:
            return
        self.filter_checked = now
        try:
            if pasta:
                added = self.network.refresh(hostfilter.read_or_empty("/proc/net/fib_trie"))
            else:
                added = self.host_filter.refresh()
        except (hostfilter.FilterUnavailable, OSError) as exc:
            say_once("filter-refresh", f"warning: the host gained an address that the guest may reach ({exc})", True)
            self.filter_checked = float("inf")  # the kernel takes no more programs: stop trying
            return
        if added and verbose:
            ui.current().info(f"jvmkit: the host gained {', '.join(added)}: blocked for the guest too")

    def backend_failed(self) -> str | None:
        """Why the network backend process died while QEMU runs (None: it did not)."""
        return self.network.helper_error()

    def finish(self) -> None:
        """After QEMU has ended: drain the console, stop passt, remove the filter, drop the lifeline
        (once; later calls do nothing)."""
        if self.finished:
            return
        self.finished = True
        for t in self.threads:
            t.join(timeout=5)
        self.network.stop()
        if self.lifeline is not None:
            self.lifeline.release()
        if self.host_filter is not None:
            self.host_filter.close()
        self.log.close()


def _to_stream(stream):
    """A console pump's forward: the guest's own lines to `stream` (--verbose), carriage returns dropped."""
    def forward(chunk: bytes) -> None:
        stream.write(chunk.replace(b"\r", b""))
        stream.flush()
    return forward


def start(config: VmConfig, run: rundir.RunDir, policy: network.Policy, choice: network.Choice, *, verbose: bool,
          stderr=None, console_cap: int = consolelog.CAP, extra_pass_fds: tuple[int, ...] = ()) -> Launched:
    """Start QEMU for `config` (see the module docstring); the caller waits for it."""
    host_filter = None
    if choice.host_filter:
        try:
            # a cgroup is another VM's while its run directory exists (made before the cgroup, removed after)
            host_filter = hostfilter.open_filter(run.name, alive=lambda name: (run.path.parent / name).is_dir())
        except hostfilter.FilterUnavailable as exc:
            choice = plan_network(policy, filter_reason=str(exc))
    if choice.exposure:
        say_once("network", f"note: the guest can reach {choice.exposure}", verbose)
    host_addresses = _host_addresses() if choice.backend == network.PASTA else ()
    resolv_conf = relay_conf = None
    if choice.backend == network.PASTA and network.resolver_on_host(
            hostfilter.resolvers(hostfilter.read_or_empty("/etc/resolv.conf")), host_addresses):
        # slirp in the namespace cannot reach a resolver on the host: it gets pasta's relay instead
        relay_conf = f"nameserver {network.DNS_RELAY}\n"
        resolv_conf = run.path / "resolv.conf"
        fileio.atomic_write_bytes(resolv_conf, relay_conf.encode())
        os.chmod(resolv_conf, 0o644)  # read through the bind mount by QEMU, whatever its user
    decision = sandbox.decide(config.qemu, run.path, rundir.uids_in_use(), resolv_conf=relay_conf)
    if decision.note:
        say_once("sandbox", f"note: {decision.note}", verbose)
    confinement = decision.confinement
    setup = child_setup(host_filter)
    net = None
    log = consolelog.BoundedLog(run.console_log, console_cap)
    console_r = console_w = None
    try:
        passt_ids = (confinement.runas[0] + 1,) * 2 if confinement.runas else None
        net = network.start(choice, config.ports, passt=network.find_passt(), preexec=setup, runas=passt_ids,
                            host_addresses=host_addresses, resolv_conf=resolv_conf)
        pass_fds = list(net.pass_fds) + list(extra_pass_fds)  # + a restore's `-incoming fd:N` (vm/snapshot.py)
        if not config.console_stdio:
            console_r, console_w = os.pipe()
            pass_fds.append(console_w)
        config = dataclasses.replace(config, netdev=net.netdev, confinement=confinement, console_fd=console_w,
                                     qemu_console_log=False)
        # the config as started keeps the ports as published (`ps`, the run's state); QEMU's own
        # command line has them as the backend needs them (inside pasta's namespace)
        argv = net.qemu_argv(qemu_argv(dataclasses.replace(config, ports=net.qemu_ports(config.ports))))
        process = proc.start(argv, what="QEMU", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             pass_fds=tuple(pass_fds), preexec_fn=setup)
        try:
            net.attach(process.pid, preexec=setup)  # pasta joins QEMU's namespace, which waits for it
        except BaseException:
            process.kill()
            process.wait()
            raise
    except BaseException:
        for fd in (console_r, console_w):
            if fd is not None:
                os.close(fd)
        if net is not None:
            net.stop()
        if host_filter is not None:
            host_filter.close()
        log.close()
        raise
    net.started()
    threads = []
    if console_w is not None:
        os.close(console_w)
        forward = _to_stream(stderr) if verbose and stderr is not None else None
        threads.append(threading.Thread(target=consolelog.pump, args=(console_r, log, forward), daemon=True,
                                        name="console"))
        app_fd = os.dup(process.stdout.fileno())
        for t in threads:
            t.start()
    else:
        app_fd, tee = consolelog.tee(os.dup(process.stdout.fileno()), log)
        threads.append(tee)
    process.stdout.close()
    lifeline = None
    if confinement.runas is not None:
        pids = [process.pid] + ([net.helper.pid] if net.helper is not None else [])
        try:
            lifeline = sandbox.Lifeline(pids)
        except BaseException:  # without it a killed jvmkit would leave the unprivileged QEMU running
            process.kill()
            process.wait()
            net.stop()
            raise
    return Launched(process, config, log, app_fd, net, host_filter, lifeline, threads)
