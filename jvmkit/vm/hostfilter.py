"""The host filter: the process that does a guest's network I/O may not connect to this host.

QEMU's user network (slirp) and passt make the guest's connections with ordinary host sockets, so
a guest reaches whatever the host process could: slirp even maps its gateway 10.0.2.2 to the
host's 127.0.0.1 (measured: a linux guest read a service listening only on the host's loopback),
and both reach services listening on the host's own addresses. QEMU 7.2 exposes no per-address
filter (libslirp's `disable_host_loopback` is not one of `-netdev user`'s options, and
`restrict=on` cuts all egress).

When jvmkit runs as root, it puts QEMU (and passt) into a cgroup of their own (cgroup v2) with two
small BPF programs attached (`cgroup/connect4`, `cgroup/sendmsg4`, the kernel's hooks on every
IPv4 `connect()` and UDP `sendmsg()` of a socket of that cgroup): a connection to 0.0.0.0, to
127.0.0.0/8 or to any address this host holds when the VM starts (`/proc/net/fib_trie`'s LOCAL
entries) fails with EPERM, which the network backend turns into a refused connection for the
guest. The host's DNS resolvers stay reachable on port 53 (slirp and passt forward the guest's
DNS queries to them, and on many hosts that is 127.0.0.53). Addresses the host gains after the VM
started are denied by one more program within seconds (`HostFilter.refresh`, which the run's wait
loop calls every REFRESH_S). The programs are assembled here (a few dozen instructions, no
compiler, no BPF library) and loaded with the bpf(2) system call; `program()` is pure and
unit-tested, the kernel's verifier checks the rest.

Where it cannot be set up (not root, no cgroup v2 mount, a kernel without cgroup BPF), `open_filter`
says why and the caller decides (network.py: passt's `--no-map-gw` still keeps the guest off the
host's loopback).
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

SYS_BPF = 321                                    # x86_64
BPF_PROG_LOAD, BPF_PROG_ATTACH = 5, 8
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_UDP4_SENDMSG = 10, 14
BPF_F_ALLOW_MULTI = 2
HOOKS = {"connect4": BPF_CGROUP_INET4_CONNECT, "sendmsg4": BPF_CGROUP_UDP4_SENDMSG}
# struct bpf_sock_addr: user_family @0, user_ip4 @4 (network order), user_ip6 @8, user_port @24
# (network order in the low 16 bits).
CTX_USER_IP4, CTX_USER_PORT = 4, 24
CGROUP_PREFIX = "jvmkit."
DNS_PORT = 53
REFRESH_S = 2.0  # how often a run looks for host addresses gained since its filter was set up


class FilterUnavailable(Exception):
    """Why the host filter cannot be set up here (one line)."""


# ---- the program (pure) ---------------------------------------------------------------------------

def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _word(addr: str) -> int:
    """An IPv4 address as the program compares it: its network-order bytes loaded as a
    little-endian u32, as a signed 32-bit immediate."""
    return struct.unpack("<i", socket.inet_aton(addr))[0]


def _port(port: int) -> int:
    return socket.htons(port)


LDX_W, MOV64_X, AND64_K, MOV64_K, EXIT = 0x61, 0xbf, 0x57, 0xb7, 0x95
JEQ32_K, JNE32_K = 0x16, 0x56                    # BPF_JMP32: compare the low 32 bits (no sign extension)


def program(deny: tuple[str, ...], allow: tuple[tuple[str, int], ...] = ()) -> bytes:
    """The filter's instructions (pure): allow (addr, port) pairs first, then deny 0.0.0.0,
    127.0.0.0/8 and every address in `deny`; anything else is allowed. Returns 1 (allow) or
    0 (deny: the connect or sendmsg fails with EPERM)."""
    code: list[tuple] = []                       # (opcode, dst, src, off or label, imm)
    code.append((LDX_W, 2, 1, CTX_USER_IP4, 0))  # r2 = ctx->user_ip4
    code.append((LDX_W, 4, 1, CTX_USER_PORT, 0))  # r4 = ctx->user_port
    for i, (addr, port) in enumerate(allow):
        code.append((JNE32_K, 2, 0, f"next{i}", _word(addr)))
        code.append((JEQ32_K, 4, 0, "allow", _port(port)))
        code.append(("label", f"next{i}"))
    code.append((MOV64_X, 3, 2, 0, 0))           # r3 = r2 & 0xff: the first byte of the address
    code.append((AND64_K, 3, 0, 0, 0xFF))
    code.append((JEQ32_K, 3, 0, "deny", 127))
    code.append((JEQ32_K, 2, 0, "deny", 0))
    for addr in dict.fromkeys(deny):
        code.append((JEQ32_K, 2, 0, "deny", _word(addr)))
    code += [("label", "allow"), (MOV64_K, 0, 0, 0, 1), (EXIT, 0, 0, 0, 0),
             ("label", "deny"), (MOV64_K, 0, 0, 0, 0), (EXIT, 0, 0, 0, 0)]
    labels, pc = {}, 0
    for item in code:
        if item[0] == "label":
            labels[item[1]] = pc
        else:
            pc += 1
    out, pc = [], 0
    for item in code:
        if item[0] == "label":
            continue
        op, dst, src, off, imm = item
        if isinstance(off, str):
            off = labels[off] - pc - 1
        out.append(_insn(op, dst, src, off, imm))
        pc += 1
    return b"".join(out)


def run_program(code: bytes, ip4: str, port: int) -> int:
    """Interpret `program()`'s output for one destination (pure; the tests' check of the
    assembler, covering exactly the opcodes it emits)."""
    regs = [0] * 11
    ctx = {CTX_USER_IP4: struct.unpack("<I", socket.inet_aton(ip4))[0], CTX_USER_PORT: socket.htons(port)}
    insns = [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]
    pc = 0
    while True:
        op, regs_byte, off, imm = insns[pc]
        dst, src = regs_byte & 0xF, regs_byte >> 4
        pc += 1
        if op == LDX_W:
            regs[dst] = ctx[off]
        elif op == MOV64_X:
            regs[dst] = regs[src]
        elif op == AND64_K:
            regs[dst] &= imm
        elif op == MOV64_K:
            regs[dst] = imm
        elif op in (JEQ32_K, JNE32_K):
            equal = (regs[dst] & 0xFFFFFFFF) == (imm & 0xFFFFFFFF)
            if equal == (op == JEQ32_K):
                pc += off
        elif op == EXIT:
            return regs[0]
        else:
            raise ValueError(f"opcode {op:#x} is not one program() emits")


# ---- what to deny and allow (pure parsers) --------------------------------------------------------

def local_addresses(fib_trie: str) -> tuple[str, ...]:
    """The IPv4 addresses this host holds, from /proc/net/fib_trie (pure): the `/32 host LOCAL`
    entries of its local table."""
    found, last = [], None
    for line in fib_trie.splitlines():
        m = re.search(r"[|+]-- (\d+\.\d+\.\d+\.\d+)$", line.rstrip())
        if m:
            last = m.group(1)
        elif last and "/32 host LOCAL" in line:
            found.append(last)
    return tuple(dict.fromkeys(found))


def resolvers(resolv_conf: str) -> tuple[str, ...]:
    """The IPv4 nameservers of a resolv.conf (pure)."""
    out = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                socket.inet_aton(parts[1])
            except OSError:
                continue
            if parts[1].count(".") == 3:
                out.append(parts[1])
    return tuple(out)


def read_or_empty(path: str) -> str:
    """A host file's text (/proc/net/fib_trie, /etc/resolv.conf), or "" when it cannot be read."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# ---- the kernel side ------------------------------------------------------------------------------

def cgroup2_mount(mountinfo: str) -> str | None:
    """Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo (pure)."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return left.split()[4]
    return None


def own_cgroup(proc_cgroup: str) -> str:
    """This process's cgroup v2 path, from /proc/self/cgroup (pure)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return "/"


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    fd = _libc().syscall(SYS_BPF, cmd, buf, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _load(code: bytes, attach_type: int) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = struct.pack("<IIQQIIQII16sII", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, len(code) // 8, ctypes.addressof(insns),
                       ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0, b"jvmkit_host", 0,
                       attach_type)
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        detail = log.value.decode(errors="replace").strip().splitlines()[-1:] or [exc.strerror]
        raise FilterUnavailable(f"the kernel refused the host filter's BPF program ({detail[0]})") from None


@dataclass
class HostFilter:
    """A cgroup whose sockets may not reach this host; processes join it with `join()` (a
    preexec function), and `close()` removes it once they have ended."""

    cgroup: Path
    denied: tuple[str, ...]
    allowed: tuple[tuple[str, int], ...]

    def refresh(self, fib_trie: str | None = None, resolv_conf: str | None = None) -> tuple[str, ...]:
        """Deny the addresses this host gained since the filter was set up (an interface came up,
        a VPN, DHCP): one more program on the cgroup for them alone (the kernel runs every program
        attached with BPF_F_ALLOW_MULTI, and any of them denies). Returns the new addresses."""
        new = new_addresses(self.denied, fib_trie if fib_trie is not None else read_or_empty("/proc/net/fib_trie"))
        if not new:
            return ()
        conf = resolv_conf if resolv_conf is not None else read_or_empty("/etc/resolv.conf")
        _attach(self.cgroup, program(new, dns_allowed(conf, new)))
        self.denied += new
        return new

    def join(self) -> None:  # runs in the child before exec
        with open(self.cgroup / "cgroup.procs", "w") as procs:
            procs.write("0")

    def close(self) -> None:
        try:
            os.rmdir(self.cgroup)
        except OSError:
            pass  # still busy (a process outlived its wait) or gone; prune_stale retries


def open_filter(name: str, alive=lambda name: False) -> HostFilter:
    """The host filter for VM `name`, or FilterUnavailable saying why not. `alive(name)` says
    whether another VM of that name still runs (its cgroup is kept)."""
    if os.geteuid() != 0:
        raise FilterUnavailable("the host filter needs root (a cgroup and BPF programs)")
    mount = cgroup2_mount(read_or_empty("/proc/self/mountinfo"))
    if mount is None:
        raise FilterUnavailable("no cgroup v2 hierarchy is mounted")
    denied = new_addresses((), read_or_empty("/proc/net/fib_trie"))
    allowed = dns_allowed(read_or_empty("/etc/resolv.conf"), denied)
    code = program(denied, allowed)
    parents = [Path(mount + own_cgroup(read_or_empty("/proc/self/cgroup")).rstrip("/")), Path(mount)]
    prune_stale(parents, alive)
    cgroup = None
    for parent in parents:
        candidate = parent / f"{CGROUP_PREFIX}{name}"
        try:
            candidate.mkdir(mode=0o755)
        except OSError:
            continue
        cgroup = candidate
        break
    if cgroup is None:
        raise FilterUnavailable(f"cannot create a cgroup under {parents[0]}")
    host_filter = HostFilter(cgroup, denied, allowed)
    try:
        _attach(cgroup, code)
    except BaseException:
        host_filter.close()
        raise
    return host_filter


def new_addresses(known: tuple[str, ...], fib_trie: str) -> tuple[str, ...]:
    """This host's addresses (from /proc/net/fib_trie) that are not loopback and not in `known` (pure)."""
    return tuple(a for a in local_addresses(fib_trie) if not a.startswith("127.") and a not in known)


def dns_allowed(resolv_conf: str, denied: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """The resolvers a program denying `denied` (and loopback) must still let DNS reach (pure)."""
    return tuple((r, DNS_PORT) for r in resolvers(resolv_conf) if r.startswith("127.") or r in denied)


def _attach(cgroup: Path, code: bytes) -> None:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attach_type in HOOKS.values():
            prog = _load(code, attach_type)
            try:
                _bpf(BPF_PROG_ATTACH, struct.pack("<IIII", fd, prog, attach_type, BPF_F_ALLOW_MULTI))
            except OSError as exc:
                raise FilterUnavailable(f"cannot attach the host filter to a cgroup ({exc.strerror})") from None
            finally:
                os.close(prog)
    finally:
        os.close(fd)


def prune_stale(parents: list[Path], alive) -> None:
    """Remove the empty cgroups of jvmkit runs that were killed (not those of VMs that run)."""
    for parent in parents:
        try:
            entries = [e for e in parent.iterdir() if e.name.startswith(CGROUP_PREFIX)]
        except OSError:
            continue
        for entry in entries:
            if alive(entry.name[len(CGROUP_PREFIX):]):
                continue
            try:
                if entry.is_dir() and not (entry / "cgroup.procs").read_text().strip():
                    os.rmdir(entry)
            except OSError:
                pass
