"""Plumbing for benchmarks/density.py: the four ways to run N replicas of samples/cache-service, and
where their memory goes.

Ways:
- `VmFleet`: jvmkit VMs, each replica as a one-VM fleet file (`jvmkit up -d`) sharing one
  `host_memory`, so jvmkit's own admission decides whether the next one fits; with or without
  the balloon.
- `Cgroup` instances: "containers" of the same userland (the linux image's initramfs unpacked:
  the same trimmed runtime, app, agent jar, libraries and java flags) as `unshare` (mount, pid,
  uts, ipc namespaces; the host's network, each on its own port) + `chroot`, each in a cgroup v1
  memory cgroup with the VM's --memory as its limit, all under one parent cgroup limited to the
  budget. On this machine podman fails to set rlimits and crun refuses the hybrid cgroup layout,
  so this is what a container runtime would set up, done by hand. `host=True`: plain JVMs of the
  host's JDK with the same flags, in the same cgroups (only to hold them to the budget and measure
  them), no namespaces, no chroot.
Memory: QEMU's /proc/PID/smaps split into guest RAM (the anonymous mapping of --memory), the TCG
translation cache (the anonymous rwx mapping), the boot files QEMU keeps mapped (kernel, initrd;
PSS, so images shared between VMs count once), and QEMU itself (the rest); the jvmkit processes by
PSS; cgroups by memory.stat (rss, cache) plus the page cache of their files (fincore), once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import _common as C

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
HOST_JDK = Path("/usr/lib/jvm/java-17-openjdk-amd64")


# ---- HTTP -------------------------------------------------------------------------------------

def http(url: str, method: str = "GET", timeout: float = 30.0) -> tuple[bool, float, bytes]:
    """(ok, seconds, body) of one request; never raises."""
    t0 = time.monotonic()
    try:
        req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            return resp.status == 200, time.monotonic() - t0, body
    except Exception:  # refused, reset, timeout, HTTP error: a failed request
        return False, time.monotonic() - t0, b""


def wait_health(port: int, timeout: float) -> float | None:
    """Seconds until GET /health answers, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        ok, _, _ = http(f"http://127.0.0.1:{port}/health", timeout=3)
        if ok:
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


def fill(port: int, mb: int, chunk: int = 10, timeout: float = 180) -> bool:
    left = mb
    while left > 0:
        ok, _, _ = http(f"http://127.0.0.1:{port}/fill?mb={min(chunk, left)}", "POST", timeout=timeout)
        if not ok:
            return False
        left -= chunk
    return True


# ---- memory of processes ------------------------------------------------------------------------

def smaps(pid: int) -> list[dict]:
    maps, cur = [], None
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    parts = line.split()
                    cur = {"perms": parts[1], "path": parts[5] if len(parts) > 5 else ""}
                    maps.append(cur)
                elif cur is not None:
                    key, _, value = line.partition(":")
                    if key in ("Size", "Rss", "Pss"):
                        cur[key] = int(value.split()[0])
    except OSError:
        return []
    return maps


def qemu_breakdown(pid: int, memory_mib: int) -> dict:
    """Where a QEMU's memory goes, in MiB (PSS; see the module)."""
    maps = smaps(pid)
    if not maps:
        return {}
    guest = [m for m in maps if not m["path"] and m.get("Size", 0) >= memory_mib * 1024 - 8192 and "x" not in m["perms"]]
    guest = sorted(guest, key=lambda m: -m.get("Size", 0))[:1]
    tb = [m for m in maps if not m["path"] and "x" in m["perms"]]
    boot = [m for m in maps if "/boot/" in m["path"] and m["path"].endswith("/file")]
    total = sum(m.get("Pss", 0) for m in maps)
    parts = {"guest_ram": sum(m.get("Pss", 0) for m in guest), "tcg_translation_cache": sum(m.get("Pss", 0) for m in tb),
             "boot_files_mapped": sum(m.get("Pss", 0) for m in boot)}
    parts["qemu_itself"] = total - sum(parts.values())
    result = {k: round(v / 1024, 1) for k, v in parts.items()}
    result["total_pss"] = round(total / 1024, 1)
    result["rss"] = round(sum(m.get("Rss", 0) for m in maps) / 1024, 1)
    return result


def pss_mib(pid: int | None) -> float:
    if not pid:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return 0.0


def rss_mib(pid: int | None) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, TypeError):
        pass
    return 0.0


def fincore_mib(paths: list[Path]) -> float:
    """Page cache held by these files (MiB), from fincore(1)."""
    files = [str(p) for root in paths for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file()]
    total = 0
    for i in range(0, len(files), 200):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files[i:i + 200]],
                             capture_output=True, text=True).stdout
        total += sum(int(x) for x in out.split() if x.isdigit())
    return round(total / C.MIB, 1)


def oom_kills_in(texts: list[str]) -> int:
    """OOM kills and OutOfMemoryErrors of the guests' kernels and apps. The host side's own lines
    (`jvmkit-balloon: NAME: lost contact ... OutOfMemoryError` of the brain's JMX client, which a
    VM's output relays) are not the guest's and are left out."""
    pattern = re.compile(r"Out of memory|oom-kill|OutOfMemoryError|invoked oom-killer")
    return sum(len(pattern.findall(line)) for t in texts for line in t.splitlines() if "jvmkit-balloon:" not in line)


# ---- jvmkit VMs ----------------------------------------------------------------------------------

class VmFleet:
    """Replicas as one-VM fleets under one host_memory (see the module)."""

    def __init__(self, tag: str, image: Path, work: Path, env: dict, *, balloon: bool, memory: str, budget: str,
                 min_memory: str = "256M", base_port: int = 19000, interval: float | None = None,
                 tcg_cache: str | None = None):
        self.tag, self.image, self.work, self.env = tag, image, work, env
        self.tcg_cache = tcg_cache
        self.balloon, self.memory, self.budget, self.min_memory = balloon, memory, budget, min_memory
        self.base_port, self.names, self.ports = base_port, [], []
        self.root = Path(env["XDG_RUNTIME_DIR"]) / "jvmkit"

    def file_for(self, k: int) -> Path:
        name = f"{self.tag}{k}"
        path = self.work / f"{self.tag}-{k}.toml"
        path.write_text(f'name = "{self.tag}-{k}"\nhost_memory = "{self.budget}"\n[[vm]]\nname = "{name}"\n'
                        f'image = "{self.image}"\nmemory = "{self.memory}"\nmin_memory = "{self.min_memory}"\n'
                        f'balloon = {str(self.balloon).lower()}\npublish = ["{self.base_port + k}:8080"]\n'
                        f'args = ["--port", "8080"]\nballoon_log = "balloon-logs/{{name}}.jsonl"\n'
                        + (f'tcg_cache = "{self.tcg_cache}"\n' if self.tcg_cache else ""))
        return path

    def start(self, k: int) -> tuple[bool, str]:
        """`jvmkit up -d` replica k: (admitted, the refusal line or '')."""
        proc = C.jvmkit(["up", "-d", self.file_for(k)], self.env, timeout=900, check=False)
        refused = [line for line in proc.stderr.splitlines() if "not started" in line]
        if proc.returncode == 0:
            self.names.append(f"{self.tag}{k}")
            self.ports.append(self.base_port + k)
            return True, ""
        return False, refused[0] if refused else proc.stderr.strip()[-500:]

    def state(self, name: str) -> dict:
        try:
            return json.loads((self.root / name / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def brain_status(self) -> dict:
        try:
            return json.loads((self.root / ".brain" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def balloon_actual(self, name: str) -> int | None:
        sys.path.insert(0, str(C.REPO))
        from jvmkit.vm.qmp import QmpClient

        try:
            with QmpClient.connect(self.root / name / "qmp.sock", timeout=3) as qmp:
                return qmp.execute("query-balloon")["actual"] // C.MIB
        except Exception:
            return None

    def memory_of(self) -> dict:
        """Per VM: QEMU's breakdown and the jvmkit run process; the brain and supervisors."""
        vms = {}
        for name in self.names:
            st = self.state(name)
            vms[name] = {"qemu": qemu_breakdown(st.get("qemu_pid"), int(st.get("memory_mib") or 0)),
                         "jvmkit_run_pss": pss_mib(st.get("jvmkit_pid")), "balloon_actual": self.balloon_actual(name)}
        brain = self.brain_status().get("pid")
        supervisors = []
        for k in range(len(self.names) + 64):
            data = None
            try:
                data = json.loads((self.root / ".fleet" / f"{self.tag}-{k}.json").read_text())
            except (OSError, ValueError):
                continue
            supervisors.append(data.get("pid"))
        total = sum(v["qemu"].get("total_pss", 0) + v["jvmkit_run_pss"] for v in vms.values())
        extra = pss_mib(brain) + sum(pss_mib(p) for p in supervisors)
        return {"vms": vms, "brain_pss": pss_mib(brain), "supervisors_pss": round(sum(pss_mib(p) for p in supervisors), 1),
                "total_mib": round(total + extra, 1)}

    def console_texts(self) -> list[str]:
        texts = []
        for name in self.names:
            for path in (self.root / name / "console.log",):
                try:
                    texts.append(path.read_text(errors="replace"))
                except OSError:
                    pass
        for log in (self.root / ".fleet").glob(f"{self.tag}-*.log"):
            texts.append(log.read_text(errors="replace"))
        return texts

    def stop_all(self) -> None:
        for k in range(len(self.names) + 64):
            if (self.root / ".fleet" / f"{self.tag}-{k}.json").exists():
                C.jvmkit(["down", f"{self.tag}-{k}"], self.env, timeout=120, check=False)
        self.names, self.ports = [], []


# ---- cgroup instances ("containers" and host JVMs) ----------------------------------------------

class Cgroup:
    def __init__(self, path: Path, limit_mib: int | None = None):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        if limit_mib:
            (path / "memory.limit_in_bytes").write_text(str(limit_mib * C.MIB))

    def stat(self) -> dict:
        out = {}
        try:
            for line in (self.path / "memory.stat").read_text().splitlines():
                key, value = line.split()
                out[key] = int(value)
        except OSError:
            pass
        return out

    def oom_kills(self) -> int:
        try:
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def usage_mib(self) -> float:
        try:
            return round(int((self.path / "memory.usage_in_bytes").read_text()) / C.MIB, 1)
        except OSError:
            return 0.0

    def kill_all(self) -> None:
        for _ in range(50):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for child in sorted(self.path.glob("*/"), reverse=True):
            if child.is_dir():
                Cgroup(child).kill_all()
                try:
                    child.rmdir()
                except OSError:
                    pass


def java_command(manifest: dict, balloon: bool = False) -> list[str]:
    """The guest's java argv as a non-balloon run has it (the agent flags only for balloon runs)."""
    cmd = manifest["command"]
    agent = set(cmd.get("agent_flags", []))
    return [a for a in cmd["java"] if balloon or a not in agent]


class CgroupInstances:
    def __init__(self, tag: str, rootfs: Path, manifest: dict, budget_mib: int, limit_mib: int,
                 base_port: int, host: bool = False):
        self.tag, self.rootfs, self.manifest, self.host = tag, rootfs, manifest, host
        self.parent = Cgroup(CGROUP_ROOT / f"jvmkit-bench-{tag}-{os.getpid()}", budget_mib)
        self.limit_mib, self.base_port = limit_mib, base_port
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        self.logs: list[Path] = []

    def argv(self, port: int) -> list[str]:
        java = java_command(self.manifest)
        main_args = ["--port", str(port)]
        if self.host:  # the host's JDK, the same flags, the app from the unpacked image
            cp = ":".join(str(self.rootfs / p.lstrip("/")) for p in java[java.index("-cp") + 1].split(":"))
            java = [str(HOST_JDK / "bin/java")] + java[1:java.index("-cp") + 1] + [cp] + java[java.index("-cp") + 2:]
            return java + main_args
        r = self.rootfs
        inner = (f"mount -t proc proc {r}/proc && mount --bind /dev {r}/dev && mount --rbind /sys {r}/sys && "
                 f"exec chroot {r} " + " ".join(java + main_args))
        return ["unshare", "--mount", "--pid", "--fork", "--uts", "--ipc", "sh", "-c", inner]

    def start(self, k: int, log_dir: Path) -> int:
        cg = Cgroup(self.parent.path / f"i{k}", self.limit_mib)
        port = self.base_port + k
        log = log_dir / f"{self.tag}-{k}.log"
        argv = self.argv(port)
        wrapper = ["sh", "-c", f'echo $$ > {cg.path}/cgroup.procs && exec "$@"', "sh", *argv]
        self.procs.append(subprocess.Popen(wrapper, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        self.ports.append(port)
        self.logs.append(log)
        return port

    def memory_of(self) -> dict:
        per = {}
        for k, _port in enumerate(self.ports):
            st = Cgroup(self.parent.path / f"i{k}").stat()
            per[f"i{k}"] = {"rss": round(st.get("rss", 0) / C.MIB, 1), "cache": round(st.get("cache", 0) / C.MIB, 1)}
        shared = fincore_mib([self.rootfs / "app", self.rootfs / "jvmkit", HOST_JDK] if self.host else [self.rootfs])
        total = sum(v["rss"] + v["cache"] for v in per.values())
        return {"instances": per, "shared_page_cache_mib": shared, "parent_usage_mib": self.parent.usage_mib(),
                "total_mib": round(total + shared, 1)}

    def oom_kills(self) -> int:
        return self.parent.oom_kills() + sum(Cgroup(self.parent.path / f"i{k}").oom_kills()
                                             for k in range(len(self.ports)))

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop_all(self) -> None:
        self.parent.kill_all()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs, self.ports, self.logs = [], [], []

    def close(self) -> None:
        self.stop_all()
        try:
            self.parent.path.rmdir()
        except OSError:
            pass


def unpack_initramfs(image: Path, dest: Path) -> Path:
    """The linux image's initramfs as a directory (the containers' root)."""
    import zstandard

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    raw = dest.parent / "initramfs.cpio"
    with open(image / "initramfs.cpio.zst", "rb") as src, open(raw, "wb") as out:
        zstandard.ZstdDecompressor().copy_stream(src, out)
    with open(raw, "rb") as handle:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=handle, cwd=dest, check=True)
    raw.unlink()
    return dest


def sample_series(stop: threading.Event, every: float, fn, out: list) -> threading.Thread:
    def loop():
        while not stop.is_set():
            try:
                out.append(fn())
            except Exception as exc:  # a sample that fails is left out, not the run
                C.log(f"sample failed: {exc}")
            stop.wait(every)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t
