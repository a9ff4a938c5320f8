"""Isolation without a VM: the network policy and its backends, the host filter's BPF program (and,
as root, the real filter on a real process), QEMU's confinement options and probe, the lifeline,
the capped console log, run directory permissions, option escaping, and the bounds of CPU and
memory on QEMU's command line. The VM tests are in test_isolation_vm.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jvmkit.errors import JvmkitError, UsageError
from jvmkit.settings import RunOptions
from jvmkit.vm import consolelog, hostfilter, network, rundir, sandbox
from jvmkit.vm.qemu import (Confinement, NetDev, PortForward, VmConfig, check_devices, opt, qemu_argv,
                            sandbox_options)
from jvmkit.vm.runner import parse_publish

ROOT = os.geteuid() == 0


def config(**kw):
    base = dict(name="vm-1", kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd"), append="console=ttyS0",
                memory_mib=512, cpus=2, accel="tcg", qmp_socket=Path("/run/q.sock"), console_log=Path("/run/c.log"))
    base.update(kw)
    return VmConfig(**base)


# ---- the policy and the backend choice -------------------------------------------------------------

def test_defaults_are_outbound_without_the_host():
    options = RunOptions()
    assert options.network == "outbound" and options.allow_host_loopback is False


NS_OK, NO_NS = None, "/dev/net/tun cannot be opened by this user"


@pytest.mark.parametrize("mode,loopback,reason,passt,forced,namespace,expected", [
    # outbound: slirp behind the host filter (root), else QEMU in pasta's namespace, else passt --no-map-gw
    ("outbound", False, None, "/usr/bin/passt", None, NS_OK, ("slirp", False, True, False)),
    ("outbound", False, None, None, None, NO_NS, ("slirp", False, True, False)),
    ("outbound", False, "it needs root", "/usr/bin/passt", None, NS_OK, ("pasta", False, False, False)),
    ("outbound", False, "it needs root", "/usr/bin/passt", None, NO_NS, ("passt", False, False, True)),
    ("outbound", False, None, "/usr/bin/passt", "passt", NS_OK, ("passt", False, True, False)),
    ("outbound", False, "it needs root", "/usr/bin/passt", "passt", NS_OK, ("passt", False, False, True)),
    # forced pasta: the namespace alone, even where the filter could be had (so a test tests it alone)
    ("outbound", False, None, "/usr/bin/passt", "pasta", NS_OK, ("pasta", False, False, False)),
    # isolated: slirp restrict=on, filtered where possible
    ("isolated", False, None, None, None, NS_OK, ("slirp", True, True, False)),
    ("isolated", False, "it needs root", None, None, NS_OK, ("slirp", True, False, False)),
    # the opt-in: QEMU's own user network, unfiltered, and said so
    ("outbound", True, None, None, None, NS_OK, ("slirp", False, False, True)),
    ("outbound", True, "it needs root", None, "pasta", NS_OK, ("slirp", False, False, True)),
])
def test_backend_choice(mode, loopback, reason, passt, forced, namespace, expected):
    c = network.choose(network.Policy(mode, loopback), filter_reason=reason, passt=passt, forced=forced,
                       namespace_reason=namespace)
    assert (c.backend, c.restrict, c.host_filter, c.exposure is not None) == expected


def test_passt_says_why_neither_the_filter_nor_the_namespace_could_be_had():
    c = network.choose(network.Policy(), filter_reason="it needs root", passt="/usr/bin/passt", namespace_reason=NO_NS)
    assert "it needs root" in c.exposure and NO_NS in c.exposure
    with pytest.raises(JvmkitError, match="JVMKIT_NETWORK_BACKEND=pasta: QEMU cannot run in a network namespace here "
                                          r"\(/dev/net/tun"):
        network.choose(network.Policy(), filter_reason=None, passt=None, forced="pasta", namespace_reason=NO_NS)
    with pytest.raises(UsageError, match="not one of auto, slirp, passt, pasta"):
        network.choose(network.Policy(), filter_reason=None, passt=None, forced="tap")


TOOLS = {"pasta": "/usr/bin/pasta", "unshare": "/usr/bin/unshare", "ip": "/usr/bin/ip", "nsenter": "/usr/bin/nsenter"}


@pytest.mark.parametrize("root,tools,tun,userns,problem", [
    (False, TOOLS, True, True, None),
    (True, TOOLS, False, None, None),          # root opens /dev/net/tun whatever its mode
    (False, {**TOOLS, "pasta": None}, True, True, "pasta is not installed (apt-get install passt)"),
    (False, {**TOOLS, "ip": None}, True, True, "ip is not installed"),
    (False, TOOLS, False, None, "/dev/net/tun cannot be opened by this user"),
    (False, TOOLS, True, False, "this user cannot create a user namespace (unshare -Urn failed)"),
])
def test_when_qemu_can_run_in_pastas_namespace(root, tools, tun, userns, problem):
    assert network.namespace_problem(root=root, tools=tools, tun_usable=tun, userns_works=userns) == problem


def test_a_resolver_on_the_host_is_reached_through_pastas_relay():
    hosts = ("192.0.2.2", "10.199.0.1")
    assert network.resolver_on_host(("127.0.0.53",), hosts)           # systemd-resolved
    assert network.resolver_on_host(("10.199.0.1", "9.9.9.9"), hosts)  # a dnsmasq on a bridge of the host
    assert not network.resolver_on_host(("10.255.255.53", "127.0.0.53"), hosts)  # slirp asks the first
    assert not network.resolver_on_host((), hosts)
    qemu = ["/usr/bin/qemu-system-x86_64", "-name", "vm-1"]
    argv = network.namespace_argv(qemu, root=False, prohibit=(), resolv_conf="/run/x y/resolv.conf")
    assert argv[:argv.index("--")] == ["unshare", "--user", "--map-root-user", "--net", "--mount"]
    script = argv[argv.index("-c") + 1]
    assert "mount --bind '/run/x y/resolv.conf' /etc/resolv.conf || exit 1" in script
    assert script.index("mount --bind") < script.index('exec "$@"')
    assert "--mount" not in network.namespace_argv(qemu, root=False, prohibit=())
    assert "--dns-forward 169.254.0.53" in " ".join(network.pasta_argv("pasta", 1, (), dns_forward=network.DNS_RELAY))
    assert "--dns-forward" not in network.pasta_argv("pasta", 1, ())


def test_the_namespace_wraps_qemu_and_keeps_its_argv():
    qemu = ["/usr/bin/qemu-system-x86_64", "-name", "vm-1", "-append", "a b; c"]
    argv = network.namespace_argv(qemu, root=False, prohibit=("192.0.2.2", "10.199.0.1"))
    assert argv[:argv.index("--")] == ["unshare", "--user", "--map-root-user", "--net"]
    assert argv[-len(qemu):] == qemu  # QEMU's own argv as given, after the script's $0: never parsed by the shell
    script = argv[argv.index("-c") + 1]
    assert "ip route add prohibit 192.0.2.2/32" in script and "ip route add prohibit 10.199.0.1/32" in script
    assert script.index("route show default") < script.index("prohibit") < script.index('exec "$@"')
    assert network.namespace_argv(qemu, root=True, prohibit=())[:3] == ["unshare", "--net", "--"]
    with pytest.raises(OSError):
        network.namespace_argv(qemu, root=True, prohibit=("1.2.3.4/0; reboot",))


def test_pasta_argv_forwards_the_published_ports_and_nothing_of_the_hosts_loopback():
    ports = (PortForward("127.0.0.1", 18080, 8080), PortForward("0.0.0.0", 9000, 90))
    argv = network.pasta_argv("/usr/bin/pasta", 4242, ports)
    joined = " ".join(argv)
    assert "--no-map-gw" in argv and "--config-net" in argv and "--ipv4-only" in argv
    assert "--tcp-ns none" in joined and "--udp-ns none" in joined and "--udp-ports none" in joined
    assert "--tcp-ports 127.0.0.1/18080" in joined and "--tcp-ports 9000" in joined and argv[-1] == "4242"
    assert "--tcp-ports none" in " ".join(network.pasta_argv("pasta", 1, ()))
    as_root = network.pasta_argv("pasta", 4242, (), netns_fd=7)
    assert as_root[-5:] == ["--runas", "0:0", "--netns-only", "--netns", "/proc/self/fd/7"] and "4242" not in as_root
    # slirp's forwards inside the namespace: every address there, the host's port
    assert network.inside_namespace(ports) == (PortForward("0.0.0.0", 18080, 8080), PortForward("0.0.0.0", 9000, 90))
    assert network.prohibit_command(99, "10.1.2.3", root=False) == [
        "nsenter", "--target", "99", "--user", "--preserve-credentials", "--net", "ip", "route", "add", "prohibit",
        "10.1.2.3/32"]


def test_no_safe_backend_is_one_line_naming_passt():
    with pytest.raises(JvmkitError) as err:
        network.choose(network.Policy(), filter_reason="it needs root", passt=None)
    assert "passt is not installed" in err.value.message and "apt-get install passt" in err.value.hint
    assert err.value.exit_code == 1  # the environment, not the input
    with pytest.raises(JvmkitError, match="needs the host filter"):
        network.choose(network.Policy(), filter_reason="it needs root", passt="/usr/bin/passt", forced="slirp")


def test_isolated_with_the_loopback_opt_in_is_refused():
    with pytest.raises(UsageError, match="does not go with --network isolated"):
        network.Policy("isolated", True).check()
    with pytest.raises(UsageError, match="not one of outbound, isolated"):
        network.Policy("open").check()


def test_passt_argv_keeps_the_gateway_off_the_host_and_serves_the_images_addresses():
    argv = network.passt_argv("/usr/bin/passt", 7, (PortForward("127.0.0.1", 8080, 80), PortForward("0.0.0.0", 9000, 90)),
                              runas=(2046820353, 2046820353))
    joined = " ".join(argv)
    assert "--no-map-gw" in argv and "--fd 7" in joined and "--ipv4-only" in argv
    assert "--address 10.0.2.15" in joined and "--gateway 10.0.2.2" in joined and "--dns-forward 10.0.2.3" in joined
    assert "--tcp-ports 127.0.0.1/8080:80" in joined and "--tcp-ports 9000:90" in joined
    assert "--runas 2046820353:2046820353" in joined
    assert "--no-map-gw" not in network.passt_argv("passt", 7, (), map_gateway=True)


def test_netdev_options():
    user = qemu_argv(config(ports=(PortForward("127.0.0.1", 8080, 80),)))
    assert "user,id=net0,ipv6=off,hostfwd=tcp:127.0.0.1:8080-:80" in user
    restricted = qemu_argv(config(netdev=NetDev("user", restrict=True)))
    assert "user,id=net0,ipv6=off,restrict=on" in restricted
    stream = qemu_argv(config(netdev=NetDev("stream", fd=9), ports=(PortForward("127.0.0.1", 8080, 80),)))
    assert "stream,id=net0,server=off,addr.type=fd,addr.str=9" in stream
    assert not any("hostfwd" in a for a in stream)  # passt forwards the ports itself


@pytest.mark.parametrize("spec", ["127.0.0.1,smb=/:80:80", "host:80:80", "1.2.3:80:80", "::1:80:80"])
def test_publish_address_must_be_an_address(spec):
    with pytest.raises(UsageError):
        parse_publish(spec)


# ---- the host filter -------------------------------------------------------------------------------

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.2
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
     |-- 10.199.0.1
        /32 host LOCAL
"""


def test_host_addresses_and_resolvers_are_read_from_the_kernel_and_resolv_conf():
    assert hostfilter.local_addresses(FIB_TRIE) == ("192.0.2.2", "127.0.0.1", "10.199.0.1")
    assert hostfilter.resolvers("# x\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 10.255.255.53\n") == \
        ("127.0.0.53", "10.255.255.53")
    assert hostfilter.cgroup2_mount("41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n") == \
        "/sys/fs/cgroup/unified"
    assert hostfilter.cgroup2_mount("29 1 0:26 / /sys/fs/cgroup rw - cgroup cgroup rw,memory\n") is None
    assert hostfilter.own_cgroup("4:memory:/x\n0::/user.slice/session-1.scope\n") == "/user.slice/session-1.scope"


def test_the_filter_program_denies_the_host_and_allows_the_rest():
    code = hostfilter.program(("192.0.2.2", "10.199.0.1"), (("127.0.0.53", 53),))
    deny = [("127.0.0.1", 5432), ("127.1.2.3", 80), ("0.0.0.0", 22), ("192.0.2.2", 80), ("10.199.0.1", 1),
            ("127.0.0.53", 54)]
    allow = [("127.0.0.53", 53), ("10.199.0.2", 80), ("203.0.113.80", 443), ("192.0.2.1", 53), ("255.1.1.1", 1),
             ("128.0.0.1", 1)]
    assert [hostfilter.run_program(code, a, p) for a, p in deny] == [0] * len(deny)
    assert [hostfilter.run_program(code, a, p) for a, p in allow] == [1] * len(allow)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.ip_addresses(v=4).map(str), max_size=20), st.ip_addresses(v=4).map(str), st.integers(1, 65535))
def test_the_filter_program_is_exactly_its_rule(denied, dest, port):
    code = hostfilter.program(tuple(denied))
    blocked = dest.startswith("127.") or dest == "0.0.0.0" or dest in denied
    assert hostfilter.run_program(code, dest, port) == (0 if blocked else 1)


def _listener(addr: str) -> socket.socket:
    s = socket.socket()
    s.bind((addr, 0))
    s.listen(4)
    return s


@pytest.mark.skipif(not ROOT, reason="the host filter needs root")
def test_the_real_filter_refuses_a_process_in_its_cgroup_and_nobody_else(tmp_path):
    reason = hostfilter_reason()
    if reason:
        pytest.skip(reason)
    listener = _listener("127.0.0.1")
    port = listener.getsockname()[1]
    f = hostfilter.open_filter(f"test-{os.getpid()}")
    probe = (f"import socket\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', {port})); print('open')\n"
             f"except OSError as e:\n    print(e.errno)\n")
    try:
        inside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, preexec_fn=f.join)
        outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    finally:
        f.close()
        listener.close()
    assert inside.stdout.strip() == "1"  # EPERM
    assert outside.stdout.strip() == "open"
    assert not f.cgroup.exists()


def test_new_host_addresses_are_the_ones_not_yet_denied():
    trie = ("Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.1.2.3\n        /32 host LOCAL\n"
            "     |-- 127.0.0.1\n        /32 host LOCAL\n     |-- 10.9.9.9\n        /32 host LOCAL\n")
    assert hostfilter.new_addresses((), trie) == ("10.1.2.3", "10.9.9.9")
    assert hostfilter.new_addresses(("10.1.2.3",), trie) == ("10.9.9.9",)
    assert hostfilter.dns_allowed("nameserver 127.0.0.53\nnameserver 10.9.9.9\nnameserver 8.8.8.8\n",
                                  ("10.9.9.9",)) == (("127.0.0.53", 53), ("10.9.9.9", 53))


@pytest.mark.skipif(not ROOT or not shutil.which("ip"), reason="needs root and iproute2 (an address to add)")
def test_an_address_the_host_gains_after_the_filter_is_set_up_is_denied_too():
    """A VM's filter is made once, at its start; the run's wait loop refreshes it (launch.Launched.
    keep_filter_current): an address added later is denied after the refresh, the old ones still."""
    reason = hostfilter_reason()
    if reason:
        pytest.skip(reason)
    dev, addr = f"jkd{os.getpid() % 100000}", f"10.197.{os.getpid() % 250 + 1}.1"
    f = hostfilter.open_filter(f"test-gain-{os.getpid()}")
    listener = _listener("0.0.0.0")
    port = listener.getsockname()[1]
    probe = (f"import socket\ns = socket.socket()\ntry:\n    s.connect(('{addr}', {port})); print('open')\n"
             f"except OSError as e:\n    print(e.errno)\n")
    try:
        for argv in (["link", "add", dev, "type", "veth", "peer", "name", dev + "p"],  # no dummy module here
                     ["addr", "add", f"{addr}/32", "dev", dev], ["link", "set", dev, "up"],
                     ["link", "set", dev + "p", "up"]):
            subprocess.run(["ip", *argv], check=True, capture_output=True)
        before = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, preexec_fn=f.join)
        assert f.refresh() == (addr,) and f.refresh() == ()
        after = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, preexec_fn=f.join)
    finally:
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
        f.close()
        listener.close()
    assert before.stdout.strip() == "open", before  # the address came after the filter
    assert after.stdout.strip() == "1", after  # EPERM once refreshed


def hostfilter_reason():
    from jvmkit.vm.launch import filter_unavailable

    return filter_unavailable()


# ---- QEMU's confinement -----------------------------------------------------------------------------

def test_sandbox_options_and_spawn_only_for_a_vm_that_migrates():
    full = Confinement(seccomp=True, deny_elevate=True)
    assert sandbox_options(full) == ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert "spawn=allow" in sandbox_options(full, spawn=True)[1]
    dropped = Confinement(seccomp=True, deny_elevate=False, runas=(2046820352, 2046820352), chroot=Path("/run/x/root"))
    assert sandbox_options(dropped) == ["-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
                                        "-runas", "2046820352:2046820352", "-chroot", "/run/x/root"]
    assert sandbox_options(Confinement()) == []
    argv = qemu_argv(config(confinement=full))
    assert argv[argv.index("-sandbox") + 1].startswith("on,obsolete=deny")


def test_the_sandbox_probe_on_this_qemu(isolated_cache):
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("QEMU is not installed")
    v = sandbox.verdict(shutil.which("qemu-system-x86_64"))
    assert v["seccomp"] is True  # Debian's QEMU is built with seccomp
    # QEMU 7.2 kills itself at -runas's setgid under elevateprivileges=deny: as root the probe learns that
    assert v["deny_elevate"] is (not ROOT)
    assert sandbox.verdict(shutil.which("qemu-system-x86_64")) == v  # cached


def test_dynamic_ids_avoid_accounts_and_running_vms():
    picks = iter([0, 0, 5])
    uid = sandbox.allocate_ids({sandbox.DYNAMIC_BASE}, pick=lambda n: next(picks))
    assert uid == sandbox.DYNAMIC_BASE + 10 and uid % 2 == 0
    with pytest.raises(JvmkitError):
        sandbox.allocate_ids({sandbox.DYNAMIC_BASE, sandbox.DYNAMIC_BASE + 1}, pick=lambda n: 0)


def test_the_chroot_is_empty_but_for_the_nameservers(tmp_path):
    root = sandbox.make_root(tmp_path / "root", "search x\nnameserver 10.0.0.1\noptions ndots:2\n")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["etc", "etc/resolv.conf"]
    assert (root / "etc" / "resolv.conf").read_text() == "nameserver 10.0.0.1\n"
    assert stat.S_IMODE(root.stat().st_mode) == 0o555
    # a second QEMU of the same run (the cold boot after a restore that failed) gets a fresh one
    again = sandbox.make_root(tmp_path / "root", "nameserver 10.0.0.2\n")
    assert (again / "etc" / "resolv.conf").read_text() == "nameserver 10.0.0.2\n"
    assert stat.S_IMODE(again.stat().st_mode) == 0o555


def test_the_lifeline_kills_when_jvmkit_dies_and_not_when_it_lets_go():
    victim = subprocess.Popen(["sleep", "60"])
    spared = subprocess.Popen(["sleep", "60"])
    try:
        line = sandbox.Lifeline([victim.pid])
        os.close(line._write)  # what jvmkit's death does: the pipe closes without a word
        assert victim.wait(timeout=10) == -signal.SIGKILL
        line._proc.wait(timeout=10)
        kind = sandbox.Lifeline([spared.pid])
        kind.release()
        time.sleep(0.2)
        assert spared.poll() is None
    finally:
        for p in (victim, spared):
            p.kill()
            p.wait()


# ---- the console log ----------------------------------------------------------------------------------

def test_the_console_log_is_capped_and_keeps_the_end(tmp_path):
    log = consolelog.BoundedLog(tmp_path / "console.log", cap=1000)
    for i in range(500):
        log.write(f"line {i:04d}\n".encode())
    log.write(b"jvmkit-exit=3\n")
    assert log.written == 500 * 10 + 14
    assert log.on_disk() <= 2000 and log.text().endswith("line 0499\njvmkit-exit=3\n")
    log.close()
    assert stat.S_IMODE((tmp_path / "console.log").stat().st_mode) == 0o600


def test_qemu_writes_no_console_log_of_its_own_when_jvmkit_caps_it():
    osv = dict(initrd=None, disk=Path("/d"), console_stdio=True, app_serial=False)
    assert any("logfile=" in a for a in qemu_argv(config(**osv)))
    capped = qemu_argv(config(**osv, qemu_console_log=False))
    assert "stdio,id=console,signal=off" in capped and not any("logfile" in a or "c.log" in a for a in capped)
    linux = qemu_argv(config(console_fd=5, qemu_console_log=False))
    assert "file,id=console,path=/proc/self/fd/5" in linux and not any("c.log" in a for a in linux)


def test_the_console_pump_and_tee(tmp_path):
    log = consolelog.BoundedLog(tmp_path / "c.log", cap=64)
    r, w = os.pipe()
    out, copier = consolelog.tee(r, log)
    os.write(w, b"x" * 300 + b"end\n")
    os.close(w)
    got = b""
    while chunk := os.read(out, 4096):
        got += chunk
    os.close(out)
    copier.join(timeout=5)
    assert got == b"x" * 300 + b"end\n"      # the target's pump sees everything
    assert log.written == 304 and log.on_disk() <= 128 and log.text().endswith("end\n")


# ---- run directories and QEMU's files -------------------------------------------------------------------

def test_run_directories_state_and_secrets_are_private(isolated_cache):
    root = rundir.run_root()
    os.chmod(root, 0o755)  # as an older jvmkit may have left it
    root = rundir.run_root()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    run = rundir.create("vm", explicit=False)
    try:
        run.write_state({"name": run.name, "qemu_uid": 2046820352})
        secret = run.write_secret("seed", b"jmx.password=x\n")
        assert stat.S_IMODE(run.path.stat().st_mode) == 0o700
        assert stat.S_IMODE(run.state_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    finally:
        run.remove()


def test_a_leftover_run_directory_without_state_does_not_keep_its_name_forever(isolated_cache):
    """CI once found `cache-1/` holding only the brain's balloon.json after `jvmkit down` (its
    write raced the directory's removal): `--name cache-1` could then never start again. Such a
    directory goes once it has been without a state file for STATELESS_S; a VM just created (no
    state yet) and the brain's and fleets' own directories stay."""
    import time

    root = rundir.run_root()
    leftover = root / "cache-1"
    leftover.mkdir(mode=0o700)
    (leftover / "balloon.json").write_text("{}")
    starting = rundir.create("vm", explicit=False)
    (root / ".brain").mkdir(mode=0o700, exist_ok=True)
    old = time.time() - rundir.STATELESS_S - 5
    for path in (leftover, root / ".brain"):
        os.utime(path, (old, old))
    try:
        rundir.prune_stale()
        assert not leftover.exists() and starting.path.exists() and (root / ".brain").exists()
        run = rundir.create("cache-1", explicit=True)   # the name is free again
        run.remove()
        assert not run.path.exists()
    finally:
        starting.remove()


@given(st.text(min_size=1, max_size=20))
def test_option_values_are_escaped_or_refused(text):
    try:
        escaped = opt(text)
    except ValueError:
        assert any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
        return
    assert escaped.replace(",,", "").count(",") == 0 and escaped.replace(",,", ",") == text


def test_paths_with_commas_stay_one_value():
    argv = qemu_argv(config(initrd=None, disk=Path("/tmp/a,format=qcow2/disk"), data_disks=(Path("/r,x/seed.img"),),
                            fw_cfg=(("opt/io.jvmkit/seed", Path("/r,file=/etc/shadow/seed")),),
                            qmp_socket=Path("/r,x/q.sock"), console_log=Path("/r,x/c.log")))
    assert "file=/tmp/a,,format=qcow2/disk,if=none,id=rootfs,format=raw,readonly=on,cache=unsafe,aio=threads" in argv
    assert "name=opt/io.jvmkit/seed,file=/r,,file=/etc/shadow/seed" in argv
    assert "unix:/r,,x/q.sock,server=on,wait=off" in argv


def test_only_known_devices_and_read_only_drives():
    argv = qemu_argv(config(initrd=None, disk=Path("/d"), data_disks=(Path("/s"),)))
    devices = [argv[i + 1].split(",")[0] for i, a in enumerate(argv) if a == "-device"]
    assert set(devices) <= {"virtio-blk-pci", "virtio-net-pci", "virtio-balloon-pci", "virtio-rng-pci"}
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert len(drives) == 2 and all("readonly=on" in d for d in drives)
    with pytest.raises(ValueError, match="not one jvmkit gives"):
        check_devices(["qemu", "-device", "e1000"])
    with pytest.raises(ValueError):
        qemu_argv(config(extra=("-device", "usb-host")))


def test_unused_built_in_devices_are_off():
    for machine, extra in (("pc", ""), ("q35", ",sata=off")):
        argv = qemu_argv(config(machine=machine))
        machines = [argv[i + 1] for i, a in enumerate(argv) if a == "-machine"]
        assert machines[1] == "vmport=off,smbus=off,i8042=off" + extra


def test_cpu_and_memory_are_exactly_what_was_asked():
    """The guest gets --cpus and --memory and no way to grow: no hot-plug slots, no maxmem, no
    maxcpus; under TCG the translation cache is bounded too (tb-size)."""
    argv = qemu_argv(config(cpus=3, memory_mib=768))
    assert argv[argv.index("-smp") + 1] == "3" and argv[argv.index("-m") + 1] == "768M"
    assert not any("maxmem" in a or "slots" in a or "maxcpus" in a for a in argv)
    assert "tb-size=128" in argv[argv.index("-accel") + 1]


@settings(max_examples=300, deadline=None)
@given(st.integers(64, 8192), st.integers(0, 8192), st.integers(0, 8 << 30), st.integers(0, 8 << 30),
       st.floats(0, 5000), st.booleans())
def test_the_balloon_never_gives_more_than_memory(memory, actual, used, committed, gc_ms, pressure):
    from jvmkit.balloon.policy import Inputs, Settings, decide

    settings_ = Settings(memory_mib=memory, min_memory_mib=min(memory, 64))
    inputs = Inputs(heap_used=min(used, committed), heap_committed=committed, heap_max=max(committed, 1),
                    gc_time_delta_ms=gc_ms, interval_s=2.0, balloon_actual_mib=min(actual, memory),
                    host_total=16 << 30, host_available=(1 << 30) if pressure else 12 << 30)
    assert decide(inputs, settings_).balloon_target_mib <= memory


def test_the_network_settings_in_jvmkit_toml(tmp_path):
    from jvmkit.config import run_options

    good = tmp_path / "jvmkit.toml"
    good.write_text('[run]\nnetwork = "isolated"\nallow_host_loopback = false\n')
    options = run_options({}, good)
    assert options.network == "isolated" and options.allow_host_loopback is False
    assert run_options({"network": "outbound"}, good).network == "outbound"  # a flag wins
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nnetwork = "open"\n')
    with pytest.raises(UsageError, match=r"bad.toml:2: 'run.network' must be one of outbound, isolated"):
        run_options({}, bad)


def test_the_kvm_probe_boots_the_image_kernel_confined(monkeypatch):
    """The KVM probe boots the image's own kernel (a hostile image's, perhaps): it gets a VM's
    seccomp filter and, as root, a dynamic user (vm/kvm.py run_kernel_probe)."""
    from jvmkit.vm.qemu import kvm_kernel_argv

    argv = kvm_kernel_argv("qemu", Path("k"), Path("l"), Confinement(seccomp=True, deny_elevate=False,
                                                                       runas=(2000000000, 2000000000)))
    assert argv[argv.index("-sandbox") + 1] == "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
    assert argv[argv.index("-runas") + 1] == "2000000000:2000000000" and "-chroot" not in argv
    monkeypatch.setattr(sandbox, "verdict", lambda qemu: {"seccomp": True, "deny_elevate": True})
    monkeypatch.setattr(sandbox, "is_root", lambda: False)
    assert sandbox.probe_confinement("qemu", set()) == Confinement(seccomp=True, deny_elevate=True)
    monkeypatch.setattr(sandbox, "is_root", lambda: True)
    rooted = sandbox.probe_confinement("qemu", set())
    assert rooted.runas and rooted.runas[0] >= sandbox.DYNAMIC_BASE and rooted.chroot is None


# ---- pasta's namespace, for real, without a VM ----------------------------------------------------------

INSIDE = r"""
import socket, sys
def attempt(target):
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        return "open " + s.recv(64).decode().strip()
    except OSError as exc:
        return type(exc).__name__ if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
    finally:
        s.close()
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen(4)
for target in sys.argv[2:]:
    print(target, attempt(target), flush=True)
print("ready", flush=True)
conn, _ = listener.accept()
conn.sendall(b"published-ok\n")
conn.close()
print("later", attempt(sys.stdin.readline().strip()), flush=True)
"""


@pytest.mark.skipif(not ROOT or not shutil.which("pasta") or not shutil.which("ip"),
                    reason="needs root (a veth gives the host more addresses), pasta and iproute2")
def test_pastas_namespace_keeps_the_host_out_and_lets_published_ports_in():
    """The namespace QEMU runs in on the pasta backend, with a program in QEMU's place: the host's
    loopback and every host address are out of its reach (an address gained later too, once
    `refresh` has routed it), a published port reaches its listener, and the world (here a
    non-host address) is reached. No guest: what slirp does inside the namespace is QEMU's
    (tests/test_isolation_vm.py runs it with guests)."""
    from support.servers import free_port

    n = os.getpid() % 200 + 20
    dummy, addr, later = f"jkv{os.getpid() % 100000}", f"10.198.{n}.1", f"10.198.{n}.2"
    lo = socket.socket()
    lo.bind(("127.0.0.1", 0))
    lo.listen(8)
    anyaddr = socket.socket()
    anyaddr.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    anyaddr.bind(("0.0.0.0", 0))
    anyaddr.listen(8)
    subprocess.run(["ip", "link", "add", dummy, "type", "veth", "peer", "name", dummy + "p"], check=True,
                   capture_output=True)
    child = net = None
    try:
        subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", dummy], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", dummy, "up"], check=True, capture_output=True)
        hosts = hostfilter.new_addresses((), Path("/proc/net/fib_trie").read_text())
        assert addr in hosts
        published = free_port()
        targets = [f"127.0.0.1:{lo.getsockname()[1]}"] + [f"{a}:{anyaddr.getsockname()[1]}" for a in hosts]
        net = network.start(network.Choice("pasta"), (PortForward("127.0.0.1", published, 8080),), passt=None,
                            host_addresses=hosts)
        argv = net.qemu_argv([sys.executable, "-c", INSIDE, str(published), *targets])
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        net.attach(child.pid)
        said = {}
        for line in child.stdout:
            if line.strip() == "ready":
                break
            target, outcome = line.rstrip("\n").split(" ", 1)
            said[target] = outcome
        assert set(said) == set(targets), (said, child.stderr.read() if child.poll() is not None else "")
        assert not [t for t, o in said.items() if o.startswith("open")], said
        assert said[f"{addr}:{anyaddr.getsockname()[1]}"] == "Permission denied"  # the prohibit route
        with socket.create_connection(("127.0.0.1", published), timeout=10) as s:  # through pasta's -t
            assert s.recv(64) == b"published-ok\n"
        subprocess.run(["ip", "addr", "add", f"{later}/32", "dev", dummy], check=True, capture_output=True)
        assert net.refresh(Path("/proc/net/fib_trie").read_text()) == (later,)
        child.stdin.write(f"{later}:{anyaddr.getsockname()[1]}\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "later Permission denied"
        assert child.wait(timeout=10) == 0
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        if net is not None:
            net.stop()
        subprocess.run(["ip", "link", "del", dummy], capture_output=True)
        lo.close()
        anyaddr.close()


def test_doctor_says_which_network_outbound_gets_and_what_it_leaves_open(monkeypatch):
    """`jvmkit doctor`'s network line, for each backend a host can give (plan_network replaced:
    which one this host gives is the backend choice's test)."""
    from jvmkit import doctor
    from jvmkit.vm import launch

    for choice, ok, words in ((network.Choice("slirp", host_filter=True), True, "behind jvmkit's host filter"),
                              (network.Choice("pasta"), True, "joined to the host by pasta"),
                              (network.Choice("passt", exposure="services on this host's own addresses"), False,
                               "the guest can reach services on this host's own addresses")):
        monkeypatch.setattr(launch, "plan_network", lambda policy, c=choice: c)
        check = doctor.network_check()
        assert check["ok"] is ok and words in check["detail"] and check["required"] is False, check
        assert (check["fix"] is None) is ok and (ok or "/dev/net/tun" in check["fix"]), check

    def refuse(policy):
        raise JvmkitError("--network outbound: passt is not installed", hint="apt-get install passt")

    monkeypatch.setattr(launch, "plan_network", refuse)
    check = doctor.network_check()
    assert not check["ok"] and check["fix"] == "apt-get install passt"
