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
- pasta (Debian's `passt` package): QEMU, still on slirp, runs in a network namespace of its own
  (`unshare -n`, and `-U` with a uid map when not root), which pasta joins to the host with
  `--no-map-gw` and no loopback forwards (`-T none -U none`). Inside it 127.0.0.1 (slirp's
  10.0.2.2) is the namespace's own loopback, the host's main address is copied onto the
  namespace's interface (so it is the namespace's own too), and a `prohibit` route for each of the
  host's other addresses makes a connect to them fail: the wall needs no privilege. Published
  ports reach slirp's forwards through pasta's `-t`. It is `outbound`'s backend where the host
  filter is not available (not root) and the namespace can be made (`namespace_problem`).
- passt (a user-space network stack in its own process, connected to QEMU 7.2's `-netdev stream`
  through a socket pair), with `--no-map-gw`: its gateway is not the host, but the host's own
  non-loopback addresses answer through it. It is the last resort of a non-root run (no usable
  `/dev/net/tun` or user namespaces), said so at the start of the run.

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
import shlex
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from jvmkit import proc
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.vm import hostfilter
from jvmkit.vm.qemu import NetDev, PortForward

MODES = ("outbound", "isolated")
GUEST_ADDRESS, GUEST_PREFIX, GATEWAY, DNS = "10.0.2.15", 24, "10.0.2.2", "10.0.2.3"
PASST, PASTA = "passt", "pasta"
# For diagnosis and for the tests of the backends a non-root user gets: JVMKIT_NETWORK_BACKEND=passt
# makes `outbound` use passt even where the host filter makes slirp safe (the filter still applies);
# =pasta puts QEMU in the namespace without the filter, so that a test of it tests the namespace alone.
BACKEND_ENV = "JVMKIT_NETWORK_BACKEND"
BACKENDS = ("auto", "slirp", "passt", "pasta")
ROUTE_WAIT_S = 10  # how long the namespace waits for pasta's default route before QEMU gives up
# The resolver that QEMU's namespace is given when the host's is on the host (resolver_on_host):
# a link-local address, routed out of the namespace to pasta, whose `--dns-forward` maps it to the
# host's first resolver (measured: a query to it from the namespace was answered).
DNS_RELAY = "169.254.0.53"


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
    """The backend for one run: `backend` "slirp", "pasta" or "passt", whether the slirp network is
    restricted, whether the host filter must be set up, and what the guest can still reach on
    the host (None: nothing)."""

    backend: str
    restrict: bool = False
    host_filter: bool = False
    exposure: str | None = None


def choose(policy: Policy, *, filter_reason: str | None, passt: str | None, forced: str | None = None,
           namespace_reason: str | None = "it was not probed") -> Choice:
    """The backend for `policy` (pure). `filter_reason` is None when the host filter can be set
    up here, else why not; `passt` is passt's path or None; `forced` is BACKEND_ENV's value;
    `namespace_reason` is None when QEMU can run in pasta's namespace here, else why not."""
    policy.check()
    filtered = filter_reason is None
    if forced not in (None, "", *BACKENDS):
        raise UsageError(f"{BACKEND_ENV}={forced!r} is not one of {', '.join(BACKENDS)}")
    if policy.mode == "isolated":
        return Choice("slirp", restrict=True, host_filter=filtered)
    if policy.allow_host_loopback:
        return Choice("slirp", exposure="the host's loopback (as 10.0.2.2) and its own addresses, as asked "
                                        "(--allow-host-loopback)")
    if forced == "pasta":
        if namespace_reason is not None:
            raise JvmkitError(f"{BACKEND_ENV}=pasta: QEMU cannot run in a network namespace here ({namespace_reason})")
        return Choice("pasta")
    if not filtered and forced not in ("slirp", "passt") and namespace_reason is None:
        return Choice("pasta")
    if forced == "passt" or (not filtered and forced != "slirp"):
        if passt is None:
            why = f"the host filter is not available ({filter_reason}) and " if not filtered else ""
            raise JvmkitError(f"--network outbound: {why}passt is not installed, so the guest would reach this "
                              "host's loopback services",
                              hint="apt-get install passt; or run with --network isolated, or --allow-host-loopback "
                                   "to accept that")
        exposure = None if filtered else (f"services listening on this host's own non-loopback addresses "
                                          f"(the host filter that blocks those is not available: {filter_reason}; "
                                          f"nor is a network namespace: {namespace_reason})")
        return Choice("passt", host_filter=filtered, exposure=exposure)
    if not filtered:
        raise JvmkitError(f"{BACKEND_ENV}=slirp needs the host filter, which is not available here ({filter_reason})")
    return Choice("slirp", host_filter=True)


def namespace_problem(*, root: bool, tools: dict[str, str | None], tun_usable: bool,
                      userns_works: bool | None) -> str | None:
    """Why QEMU cannot run in pasta's namespace here (pure; None: it can). `tools`: the paths of
    pasta, unshare, ip and nsenter (None: missing); `tun_usable`: whether this user can open
    /dev/net/tun (pasta opens it inside the namespace, where it is not root over the host's
    file); `userns_works`: whether `unshare -Urn true` succeeded (None: not tried, as root, who
    needs no user namespace)."""
    for name in (PASTA, "unshare", "ip", "nsenter"):
        if not tools.get(name):
            return f"{name} is not installed" + (" (apt-get install passt)" if name == PASTA else "")
    if not root:
        if not tun_usable:
            return "/dev/net/tun cannot be opened by this user"
        if not userns_works:
            return "this user cannot create a user namespace (unshare -Urn failed)"
    return None


def resolver_on_host(resolvers: tuple[str, ...], host_addresses: tuple[str, ...]) -> bool:
    """Whether the host's first resolver is on the host itself (pure): 127.0.0.53 (systemd-resolved),
    a dnsmasq on one of its addresses. slirp in pasta's namespace cannot reach it there (its
    loopback is the namespace's, the host's addresses are routed to `prohibit`), so the namespace
    gets a resolv.conf naming DNS_RELAY, which pasta's `--dns-forward` maps to that resolver."""
    return bool(resolvers) and (resolvers[0].startswith("127.") or resolvers[0] in host_addresses)


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


# ---- pasta: QEMU in a network namespace of its own ----------------------------------------------

def namespace_argv(qemu_argv: list[str], *, root: bool, prohibit: tuple[str, ...],
                   resolv_conf: str | None = None) -> list[str]:
    """QEMU's argv, run in a new network namespace (pure): `unshare -n` (and, when not root, a
    user namespace mapping this user to root, which is what may configure the namespace), then a
    shell that brings the namespace's loopback up, waits for pasta's default route (at most
    ROUTE_WAIT_S), adds a `prohibit` route for each of the host's addresses in `prohibit`
    (connects to them fail with EACCES inside), and `exec`s QEMU: the same process all along, so
    its parent-death signal, its pid (`ps`, the lifeline) and its command line stay QEMU's.
    With `resolv_conf` (a file's path) also a mount namespace, in which that file is
    /etc/resolv.conf (see resolver_on_host)."""
    for addr in prohibit:
        socket.inet_aton(addr)  # only addresses reach the shell
    tries = ROUTE_WAIT_S * 20
    script = ("ip link set lo up || exit 1; i=0; "
              f'until [ -n "$(ip -4 route show default)" ]; do i=$((i + 1)); if [ $i -gt {tries} ]; then '
              f'echo "jvmkit: pasta did not connect the network namespace within {ROUTE_WAIT_S} s" >&2; exit 1; fi; '
              "sleep 0.05; done; "
              + "".join(f"ip route add prohibit {addr}/32 || exit 1; " for addr in prohibit)
              + (f"mount --bind {shlex.quote(resolv_conf)} /etc/resolv.conf || exit 1; " if resolv_conf else "")
              + 'exec "$@"')
    flags = ["--net"] if root else ["--user", "--map-root-user", "--net"]
    if resolv_conf:
        flags.append("--mount")
    return ["unshare", *flags, "--", "/bin/sh", "-c", script, "jvmkit-netns", *qemu_argv]


def pasta_argv(pasta: str, pid: int, ports: tuple[PortForward, ...], *, netns_fd: int | None = None,
               dns_forward: str | None = None) -> list[str]:
    """pasta joining the network namespace of process `pid` to the host (pure): the namespace
    gets the host's address and routes (`--config-net`), IPv4 only, the gateway not mapped to the
    host, no port of the namespace's loopback leading to the host's (`-T none -U none`: their
    default, `auto`, forwards the ports bound on the host's loopback, and slirp's 10.0.2.2 is the
    namespace's loopback), no UDP forwarded in (`-u none`), and the published ports as TCP
    forwards into the namespace, where slirp's forwards listen. Not root, it joins QEMU's user
    and network namespaces by `pid`. As root (`netns_fd`: jvmkit opened the namespace) it joins
    the network namespace alone, through the inherited descriptor, and keeps root (`--runas 0:0`).
    Measured: given the pid, pasta as root also tries the user namespace, here the host's
    ("Couldn't open user namespace ... Permission denied"); given /proc/PID/ns/net, it cannot open
    it (EACCES: the ptrace check of a process whose capabilities, having dropped most, are not a
    superset of QEMU's); through its own /proc/self/fd it can. `dns_forward`: the address whose DNS queries go to the host's first
    resolver (resolver_on_host)."""
    argv = [pasta, "--foreground", "--quiet", "--config-net", "--ipv4-only", "--no-map-gw",
            "--tcp-ns", "none", "--udp-ns", "none", "--udp-ports", "none"]
    if dns_forward:
        argv += ["--dns-forward", dns_forward]
    if not ports:
        argv += ["--tcp-ports", "none"]
    for fwd in ports:
        bind = "" if fwd.host_addr in ("0.0.0.0", "") else f"{fwd.host_addr}/"
        argv += ["--tcp-ports", f"{bind}{fwd.host_port}"]
    if netns_fd is not None:  # root: the namespace, opened by jvmkit, is in the host's user namespace
        return [*argv, "--runas", "0:0", "--netns-only", "--netns", f"/proc/self/fd/{netns_fd}"]
    return [*argv, str(pid)]


def inside_namespace(ports: tuple[PortForward, ...]) -> tuple[PortForward, ...]:
    """slirp's forwards inside pasta's namespace (pure): on every address there (pasta brings a
    connection from the host's loopback to the namespace's, one from elsewhere to its interface's
    address; nothing else reaches the namespace), on the same port as on the host."""
    return tuple(PortForward("0.0.0.0", fwd.host_port, fwd.guest_port) for fwd in ports)


def prohibit_command(pid: int, addr: str, *, root: bool) -> list[str]:
    """One more `prohibit` route in the namespace of `pid`, for an address the host gained (pure)."""
    socket.inet_aton(addr)
    # not root: into the user namespace as this user (its root there) without setgroups, which an
    # unprivileged user namespace denies (measured: "nsenter: setgroups failed: Operation not permitted")
    enter = ["nsenter", "--target", str(pid), "--net"] if root else [
        "nsenter", "--target", str(pid), "--user", "--preserve-credentials", "--net"]
    return [*enter, "ip", "route", "add", "prohibit", f"{addr}/32"]


@dataclass
class Network:
    """A started network for one VM: QEMU's netdev, the fds QEMU inherits, the backend's process
    (passt, or pasta once QEMU's namespace exists)."""

    choice: Choice
    netdev: NetDev
    pass_fds: tuple[int, ...] = ()
    helper: proc.Popen | None = None
    ports: tuple[PortForward, ...] = ()     # pasta: the forwards it makes on the host
    prohibited: tuple[str, ...] = ()        # pasta: the host addresses the namespace has routes against
    root: bool = False
    pid: int | None = None                  # pasta: QEMU's, whose namespace it is
    resolv_conf: Path | None = None         # pasta: the namespace's resolv.conf (the host's resolver is on the host)
    _error: str | None = None

    def qemu_argv(self, argv: list[str]) -> list[str]:
        """QEMU's argv as this backend runs it: in the namespace for pasta."""
        if self.choice.backend != PASTA:
            return argv
        return namespace_argv(argv, root=self.root, prohibit=self.prohibited,
                              resolv_conf=str(self.resolv_conf) if self.resolv_conf else None)

    def qemu_ports(self, ports: tuple[PortForward, ...]) -> tuple[PortForward, ...]:
        """The forwards on QEMU's command line: inside the namespace for pasta."""
        return inside_namespace(ports) if self.choice.backend == PASTA else ports

    def attach(self, pid: int, preexec=None) -> None:
        """QEMU (in its namespace) is process `pid`: join the namespace to the host (pasta)."""
        if self.choice.backend != PASTA:
            return
        self.pid = pid
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + ROUTE_WAIT_S
        while True:  # pasta must never join (and configure) jvmkit's own namespace, the host's
            try:
                if os.readlink(f"/proc/{pid}/ns/net") != own:
                    break
            except OSError:
                raise JvmkitError("QEMU ended before its network namespace was made") from None
            if time.monotonic() > deadline:
                raise JvmkitError(f"QEMU's network namespace was not made within {ROUTE_WAIT_S} s (unshare)")
            time.sleep(0.005)
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC) if self.root else None
        try:
            self.helper = proc.start(pasta_argv(find_pasta() or PASTA, pid, self.ports, netns_fd=fd,
                                                dns_forward=DNS_RELAY if self.resolv_conf else None), what="pasta",
                                     stdout=proc.DEVNULL, stderr=proc.PIPE, preexec_fn=preexec,
                                     pass_fds=() if fd is None else (fd,))
        finally:
            if fd is not None:
                os.close(fd)

    def refresh(self, fib_trie: str) -> tuple[str, ...]:
        """pasta: route the host's addresses (from /proc/net/fib_trie's text) that are new since
        the start into `prohibit` too (returns them; one that cannot be routed is raised as OSError)."""
        if self.choice.backend != PASTA or self.pid is None:
            return ()
        new = hostfilter.new_addresses(self.prohibited, fib_trie)
        for addr in new:
            done = proc.run(prohibit_command(self.pid, addr, root=self.root), what="nsenter", check=False, timeout=10)
            if done.returncode != 0 and "File exists" not in (done.stderr or ""):
                raise OSError(f"cannot add a route against {addr} in the VM's namespace: "
                              f"{proc.last_line(done.stderr, done.stdout)}")
            self.prohibited += (addr,)
        return new

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
        if self.helper is not None and self.helper.poll() is None:
            self.helper.terminate()
            try:
                self.helper.wait(timeout=5)
            except proc.TimeoutExpired:
                self.helper.kill()
                self.helper.wait()

    def helper_error(self) -> str | None:
        """Why the backend's process (passt, pasta) ended while QEMU runs (its last line of error
        output), or None."""
        if self._error is None and self.helper is not None and self.helper.poll() not in (None, 0):
            err = self.helper.stderr.read().decode(errors="replace") if self.helper.stderr else ""
            self._error = f"{self.choice.backend} exit status {self.helper.returncode}: {proc.last_line(err)}"
        return self._error


def find_pasta() -> str | None:
    return shutil.which(PASTA)


def start(choice: Choice, ports: tuple[PortForward, ...], *, passt: str | None, preexec=None,
          runas: tuple[int, int] | None = None, host_addresses: tuple[str, ...] = (),
          resolv_conf: Path | None = None) -> Network:
    """Start what `choice` needs before QEMU: nothing for slirp, passt for passt; for pasta, the
    plan of the namespace: `prohibit` routes for `host_addresses` (this host's but loopback),
    `resolv_conf` as its /etc/resolv.conf when given (a file naming DNS_RELAY); pasta itself
    starts once QEMU has made it (`Network.attach`)."""
    if choice.backend == "slirp":
        return Network(choice, NetDev("user", restrict=choice.restrict))
    if choice.backend == PASTA:
        return Network(choice, NetDev("user"), ports=ports, root=os.geteuid() == 0, resolv_conf=resolv_conf,
                       prohibited=host_addresses)
    ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        child = proc.start(passt_argv(passt, ours.fileno(), ports, runas=runas), what="passt",
                           pass_fds=(ours.fileno(),), stdout=proc.DEVNULL, stderr=proc.PIPE, preexec_fn=preexec)
    finally:
        ours.close()
    fd = qemus.detach()
    return Network(choice, NetDev("stream", fd=fd), pass_fds=(fd,), helper=child)
