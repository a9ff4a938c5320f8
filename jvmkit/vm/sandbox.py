"""QEMU's confinement: its seccomp sandbox, and when jvmkit runs as root, an unprivileged user and
an empty root directory.

A guest that takes over QEMU (a device emulation bug) gets what the QEMU process has. So QEMU runs
with its seccomp filter (`-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny`, and
`elevateprivileges=deny` when QEMU is not asked to drop to a user: QEMU 7.2 kills itself with SIGSYS
at its own setgid when both are given, measured), and as root it also opens everything it needs
(kernel, disks, fw_cfg files, the QMP socket, /dev/kvm) and then drops to a user of its own
(`-runas UID:GID`) inside an empty directory (`-chroot`): after that it can read no file of
anyone's, signal no other process, and start nothing.

The user is dynamic, as systemd's DynamicUser: a uid:gid from a range no account uses
(DYNAMIC_BASE + an even offset; the next odd one is the VM's passt), checked against the passwd
and group databases and the VMs running now, with no entry anywhere and no file on disk; nothing is
created and nothing to remove. QEMU's files are opened while it is still root, so they need no
permission for that uid. The empty root holds only `etc/resolv.conf` (the host's nameservers: QEMU's
user network reads it when the guest first asks its DNS).

Dropping its user clears QEMU's parent-death signal (the kernel does that on a uid change), so a
killed jvmkit would leave it running; a lifeline process (`Lifeline`) holds pidfds of QEMU and
passt and kills them when jvmkit's end of its pipe closes without a word, i.e. when jvmkit died.

Which of these QEMU accepts is probed once (`probe()`: the options on `-machine none`, quit over
QMP) and cached per host kernel, QEMU version and root-or-not in `sandbox-probe.json`.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jvmkit import cache, fileio, proc
from jvmkit.errors import JvmkitError
from jvmkit.vm import hostfilter
from jvmkit.vm import qemu as qemu_argvs
from jvmkit.vm.qemu import Confinement, host_key

DYNAMIC_BASE = 0x7A000000         # 2046820352: far above distributions' ranges and systemd's (61184-65519)
DYNAMIC_SLOTS = 1 << 19           # pairs: base + 2k (QEMU), base + 2k + 1 (passt)
PROBE_TIMEOUT = 20.0
QMP_QUIT = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


def is_root() -> bool:
    return os.geteuid() == 0


def _id_free(n: int) -> bool:
    try:
        pwd.getpwuid(n)
        return False
    except KeyError:
        pass
    try:
        grp.getgrgid(n)
        return False
    except KeyError:
        return True


def allocate_ids(taken: set[int], pick=secrets.randbelow) -> int:
    """An even uid for QEMU (the next one is passt's), with no account or group, not `taken`."""
    for _ in range(64):
        uid = DYNAMIC_BASE + 2 * pick(DYNAMIC_SLOTS)
        if uid not in taken and uid + 1 not in taken and _id_free(uid) and _id_free(uid + 1):
            return uid
    raise JvmkitError("found no free uid for QEMU's dynamic user", hint="see `jvmkit ps`: are many VMs running?")


def make_root(directory: Path, resolv_conf: str) -> Path:
    """The empty root QEMU chroots into: `directory` with only etc/resolv.conf's nameservers. One
    left by an earlier QEMU of the same run (a restore that failed, then the cold boot) is replaced."""
    if directory.exists():
        for sub in (directory, directory / "etc"):
            if sub.is_dir() and not sub.is_symlink():
                os.chmod(sub, 0o755)
        shutil.rmtree(directory)
    directory.mkdir(mode=0o755)
    (directory / "etc").mkdir(mode=0o755)
    lines = [line for line in resolv_conf.splitlines() if line.split()[:1] == ["nameserver"]]
    fileio.write_private(directory / "etc" / "resolv.conf", ("\n".join(lines) + "\n").encode())
    os.chmod(directory / "etc" / "resolv.conf", 0o444)
    os.chmod(directory / "etc", 0o555)
    os.chmod(directory, 0o555)
    return directory


# ---- the probe ------------------------------------------------------------------------------------

def candidates(root: bool, chroot: Path) -> list[Confinement]:
    """What to try, strongest first."""
    runas = (DYNAMIC_BASE, DYNAMIC_BASE) if root else None
    where = chroot if root else None
    return [Confinement(seccomp=True, deny_elevate=True, runas=runas, chroot=where),
            Confinement(seccomp=True, deny_elevate=False, runas=runas, chroot=where),
            Confinement(seccomp=False, runas=runas, chroot=where)]


def run_probe(qemu: str, root: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="jvmkit-sandbox.") as tmp:
        chroot = make_root(Path(tmp) / "root", "")
        tried = []
        try:
            for candidate in candidates(root, chroot):
                done = proc.run(qemu_argvs.sandbox_probe_argv(qemu, candidate), what="the sandbox probe's QEMU",
                                input=QMP_QUIT, timeout=PROBE_TIMEOUT, check=False, timeout_is_error=False)
                if done.returncode == 0:
                    return {"seccomp": candidate.seccomp, "deny_elevate": candidate.deny_elevate, "host": _key(qemu, root),
                            "tried": tried}
                tried.append(f"{' '.join(qemu_argvs.sandbox_options(candidate))}: "
                             f"{proc.last_line(done.stderr or '') if done.returncode else 'timed out'}"
                             f" (exit {done.returncode})")
        finally:
            os.chmod(chroot, 0o755)
            os.chmod(chroot / "etc", 0o755)
    return {"seccomp": False, "deny_elevate": False, "host": _key(qemu, root), "tried": tried, "failed": True}


def _key(qemu: str, root: bool) -> str:
    return f"{host_key(qemu)}|{'root' if root else 'user'}"


def _verdict_path() -> Path:
    return cache.cache_root() / "sandbox-probe.json"


def verdict(qemu: str) -> dict:
    """The cached verdict for this host kernel, QEMU and privilege, probing (once) when there is none."""
    root = is_root()
    try:
        found = json.loads(_verdict_path().read_text())
        if found.get("host") == _key(qemu, root) and isinstance(found.get("seccomp"), bool):
            return found
    except (OSError, ValueError, AttributeError):
        pass
    found = run_probe(qemu, root)
    fileio.atomic_write_bytes(_verdict_path(), json.dumps(found, indent=2).encode())
    return found


@dataclass(frozen=True)
class Decision:
    confinement: Confinement
    note: str | None              # what is missing, for the user (None: fully confined)


def decide(qemu: str, run_path: Path | None, taken: set[int], resolv_conf: str | None = None) -> Decision:
    """QEMU's confinement for one VM whose run directory is `run_path` (None: no chroot, for the
    KVM probe, whose only file is opened before QEMU drops to its user). `resolv_conf`: the
    nameservers QEMU's slirp is to read in its root (default: the host's)."""
    v = verdict(qemu)
    if v.get("failed") and not v.get("seccomp") and is_root():
        # QEMU accepted none of it, not even the user and root: confine nothing rather than fail
        # every run; say so.
        return Decision(Confinement(seccomp=False), "QEMU refused its sandbox options; it runs unconfined "
                                                    f"({'; '.join(v.get('tried', []))[:300]})")
    note = None if v["seccomp"] else "this QEMU has no seccomp sandbox (-sandbox); it runs without one"
    if not is_root():
        return Decision(Confinement(seccomp=v["seccomp"], deny_elevate=v["deny_elevate"]), note)
    uid = allocate_ids(taken)
    chroot = None if run_path is None else make_root(run_path / "root", resolv_conf if resolv_conf is not None
                                                     else hostfilter.read_or_empty("/etc/resolv.conf"))
    return Decision(Confinement(seccomp=v["seccomp"], deny_elevate=v["deny_elevate"], runas=(uid, uid), chroot=chroot),
                    note)


def probe_confinement(qemu: str, taken: set[int]) -> Confinement:
    """The KVM probe's QEMU, which boots the image's kernel: a VM's seccomp filter and (as root)
    user, without the chroot."""
    return decide(qemu, None, taken).confinement


# ---- the lifeline ---------------------------------------------------------------------------------

LIFELINE = """
import os, signal, sys
fds = []
for pid in sys.argv[1:]:
    try:
        fds.append(os.pidfd_open(int(pid)))
    except OSError:
        pass
os.write(1, b"ready\\n")
os.close(1)
if not os.read(0, 1):
    for fd in fds:
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
"""


class Lifeline:
    """A small process that kills `pids` if jvmkit dies before it says goodbye (`release()`)."""

    def __init__(self, pids: list[int]):
        read_end, self._write = os.pipe()
        try:
            self._proc = proc.start([sys.executable, "-I", "-c", LIFELINE, *map(str, pids)], what="jvmkit's lifeline",
                                    stdin=read_end, stdout=proc.PIPE, stderr=proc.DEVNULL,
                                    preexec_fn=os.setpgrp)
        finally:
            os.close(read_end)
        self._proc.stdout.readline()  # its pidfds are open: from here on it holds the processes

    def release(self) -> None:
        """jvmkit ends normally: let the lifeline go without killing anything."""
        try:
            os.write(self._write, b"x")
            os.close(self._write)
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except proc.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
