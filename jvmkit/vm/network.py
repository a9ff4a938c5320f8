"""A guest's network: what it may reach, and which backend gives it that.

`--network outbound` (the default): the guest reaches the internet and the LAN, not this host.
`--network isolated`: the guest reaches nothing; only published ports (and the balloon's JMX
port) reach it. `--allow-host-loopback` (with `outbound`) gives the guest the host as QEMU's user
network always did: its gateway 10.0.2.2 is the host's 127.0.0.1, and the host's addresses answer.

Backends, chosen by `choose()` (pure):
- QEMU's user network (slirp, `-netdev user`), in-process. It maps 10.0.2.2 to the host's
  loopback and cannot be told not to in QEMU 7.2, so for `outbound` it is used only together
  with the host filter (hostfilter.py: a cgroup BPF program refusing QEMU's connects to 127.0.0.0/8
  and to the host's own addresses; root only). `isolated` is slirp with `restrict=on` (no
  guest-initiated traffic leaves at all; host forwards still work), with the filter as well when
  it is available.
- passt (Debian's `passt`, a user-space network stack in its own process, connected to QEMU 7.2's
  `-netdev stream` through a socket pair), with `--no-map-gw`: its gateway is not the host. It
  needs no privileges, so it is `outbound`'s backend where the host filter is not available (not
  root); the filter, which only root has, is what keeps such a guest off the host's other
  addresses.

Measured through `jvmkit run` (this machine: 2 busy cores, TCG, the httpd sample, a published
port, medians of 3 interleaved rounds; the table is in docs/security.md): slirp behind the filter
reached the first answer in 4.8 s (linux) / 3.0 s (OSv) and served 102 / 204 sequential GETs per
second; passt behind the same filter 6.5 s / 3.5 s and 63 / 188 per second (passt is a second
process on the path of every packet). The filter itself costs nothing measurable. So where the
filter makes slirp safe, slirp it is; passt is the backend that needs no privilege.

Both backends serve the fixed addresses the images are built for: the guest 10.0.2.15/24, gateway
10.0.2.2, DNS 10.0.2.3 (targets/osv/image.py BOOT_OPTIONS, the linux /init), so the boot plan
needs no address of its own. IPv6 is off in both (`ipv6=off`, passt `-4`): the images configure
only IPv4, and the host filter covers IPv4.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass

from jvmkit import proc
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.vm.qemu import NetDev, PortForward

MODES = ("outbound", "isolated")
GUEST_ADDRESS, GUEST_PREFIX, GATEWAY, DNS = "10.0.2.15", 24, "10.0.2.2", "10.0.2.3"
PASST = "passt"
# For diagnosis and for the tests of the backend a non-root user gets: JVMKIT_NETWORK_BACKEND=passt
# makes `outbound` use passt even where the host filter makes slirp safe (the filter still applies).
BACKEND_ENV = "JVMKIT_NETWORK_BACKEND"


@dataclass(frozen=True)
class Policy:
    """What the guest may reach (from `--network` and `--allow-host-loopback`)."""

    mode: str = "outbound"
    allow_host_loopback: bool = False

    def check(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--network {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "isolated" and self.allow_host_loopback:
            raise UsageError("--allow-host-loopback does not go with --network isolated (an isolated guest reaches "
                             "nothing)", hint="use --network outbound --allow-host-loopback to let the guest reach the host")


@dataclass(frozen=True)
class Choice:
    """The backend for one run: `backend` "slirp" or "passt", whether the slirp network is
    restricted, whether the host filter must be set up, and what the guest can still reach on
    the host (None: nothing)."""

    backend: str
    restrict: bool = False
    host_filter: bool = False
    exposure: str | None = None


def choose(policy: Policy, *, filter_reason: str | None, passt: str | None, forced: str | None = None) -> Choice:
    """The backend for `policy` (pure). `filter_reason` is None when the host filter can be set
    up here, else why not; `passt` is passt's path or None; `forced` is BACKEND_ENV's value."""
    policy.check()
    filtered = filter_reason is None
    if forced not in (None, "", "auto", "slirp", "passt"):
        raise UsageError(f"{BACKEND_ENV}={forced!r} is not one of auto, slirp, passt")
    if policy.mode == "isolated":
        return Choice("slirp", restrict=True, host_filter=filtered)
    if policy.allow_host_loopback:
        return Choice("slirp", exposure="the host's loopback (as 10.0.2.2) and its own addresses, as asked "
                                        "(--allow-host-loopback)")
    if forced == "passt" or (not filtered and forced != "slirp"):
        if passt is None:
            why = f"the host filter is not available ({filter_reason}) and " if not filtered else ""
            raise JvmkitError(f"--network outbound: {why}passt is not installed, so the guest would reach this "
                              "host's loopback services",
                              hint="apt-get install passt; or run with --network isolated, or --allow-host-loopback "
                                   "to accept that")
        exposure = None if filtered else (f"services listening on this host's own non-loopback addresses "
                                          f"(the host filter that blocks those is not available: {filter_reason})")
        return Choice("passt", host_filter=filtered, exposure=exposure)
    if not filtered:
        raise JvmkitError(f"{BACKEND_ENV}=slirp needs the host filter, which is not available here ({filter_reason})")
    return Choice("slirp", host_filter=True)


def find_passt() -> str | None:
    return shutil.which(PASST)


# ---- passt ----------------------------------------------------------------------------------------

def passt_argv(passt: str, fd: int, ports: tuple[PortForward, ...], *, map_gateway: bool = False,
               runas: tuple[int, int] | None = None) -> list[str]:
    """passt serving one QEMU on the connected socket `fd` (pure): the images' fixed addresses,
    DNS queries to 10.0.2.3 forwarded to the host's resolvers, IPv4 only, the published ports,
    the gateway not mapped to the host unless `map_gateway`; as `runas` (uid, gid) when given
    (passt drops to `nobody` by itself when started as root)."""
    argv = [passt, "--foreground", "--quiet", "--fd", str(fd), "--ipv4-only",
            "--address", GUEST_ADDRESS, "--netmask", str(GUEST_PREFIX), "--gateway", GATEWAY,
            "--dns-forward", DNS, "--no-dhcpv6", "--no-ndp", "--no-ra"]
    if not map_gateway:
        argv.append("--no-map-gw")
    if runas is not None:
        argv += ["--runas", f"{runas[0]}:{runas[1]}"]
    for fwd in ports:
        bind = "" if fwd.host_addr in ("0.0.0.0", "") else f"{fwd.host_addr}/"
        argv += ["--tcp-ports", f"{bind}{fwd.host_port}:{fwd.guest_port}"]
    return argv


@dataclass
class Network:
    """A started network for one VM: QEMU's netdev, the fds QEMU inherits, the passt process."""

    choice: Choice
    netdev: NetDev
    pass_fds: tuple[int, ...] = ()
    passt: proc.Popen | None = None
    _error: str | None = None

    def started(self) -> None:
        """QEMU has its copy of the socket: close jvmkit's."""
        for fd in self.pass_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.pass_fds = ()

    def stop(self) -> None:
        self.started()
        if self.passt is not None and self.passt.poll() is None:
            self.passt.terminate()
            try:
                self.passt.wait(timeout=5)
            except proc.TimeoutExpired:
                self.passt.kill()
                self.passt.wait()

    def passt_error(self) -> str | None:
        """Why passt ended while QEMU runs (its last line of error output), or None."""
        if self._error is None and self.passt is not None and self.passt.poll() not in (None, 0):
            err = self.passt.stderr.read().decode(errors="replace") if self.passt.stderr else ""
            self._error = f"exit status {self.passt.returncode}: {proc.last_line(err)}"
        return self._error


def start(choice: Choice, ports: tuple[PortForward, ...], *, passt: str | None, preexec=None,
          runas: tuple[int, int] | None = None) -> Network:
    """Start what `choice` needs before QEMU: nothing for slirp, passt for passt."""
    if choice.backend == "slirp":
        return Network(choice, NetDev("user", restrict=choice.restrict))
    ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        child = proc.start(passt_argv(passt, ours.fileno(), ports, runas=runas), what="passt",
                           pass_fds=(ours.fileno(),), stdout=proc.DEVNULL, stderr=proc.PIPE, preexec_fn=preexec)
    finally:
        ours.close()
    fd = qemus.detach()
    return Network(choice, NetDev("stream", fd=fd), pass_fds=(fd,), passt=child)
