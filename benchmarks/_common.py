"""Shared plumbing for jvmkit's benchmarks (pack.py, boot.py, balloon.py).

Each benchmark prints one JSON document on stdout, writes progress to stderr, writes its JSON and
plots (PNG, when matplotlib is importable) under `--out` (default benchmarks/out/), and uses its own
temporary JVMKIT_CACHE unless `--cache DIR` is given. jvmkit is run as a subprocess
(`python -m jvmkit`, this checkout), so the wall-clock times include what a user waits for.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "out"
JVMKIT = [sys.executable, "-m", "jvmkit"]
MIB = 2**20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a `-p PORT:...` of one run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(samples: list[float], digits: int = 3) -> dict:
    """Median plus the raw samples (wall-clock seconds unless said otherwise)."""
    xs = [x for x in samples if x is not None]
    if not xs:
        return {"median": None, "n": 0, "samples": []}
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "n": len(xs), "samples": [round(x, digits) for x in xs]}


def target(value, target_text: str, met: bool | None, **extra) -> dict:
    """A target as reported: never asserted."""
    return {"value": value, "target": target_text, "met": met, **extra}


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for JSON and PNG [benchmarks/out/]")
    p.add_argument("--quick", action="store_true", help="a smaller run")
    p.add_argument("--cache", type=Path, default=None,
                   help="JVMKIT_CACHE to use (e.g. ~/.cache/jvmkit to reuse pulled kernels) [a temporary one]")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    return p


class Workspace:
    """A temporary work directory and the JVMKIT_CACHE the benchmark uses."""

    def __init__(self, name: str, cache: Path | None, keep: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix=f"jvmkit-bench-{name}-"))
        self.keep = keep
        self.user_cache = cache.expanduser().resolve() if cache else None
        self.cache = self.user_cache or (self.dir / "cache")
        self.cache.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []

    def env(self, cache: Path | None = None, **extra: str) -> dict:
        env = dict(os.environ)
        env["JVMKIT_CACHE"] = str(cache or self.cache)
        env.setdefault("SOURCE_DATE_EPOCH", "0")
        env.update(extra)
        return env

    def close(self) -> None:
        if self.keep:
            log(f"work directory kept: {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def jvmkit(args: list, env: dict, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=REPO)
    if check and proc.returncode != 0:
        raise RuntimeError(f"jvmkit {' '.join(map(str, args))} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc


def jvmkit_json(args: list, env: dict, timeout: float = 1800) -> tuple[dict, float]:
    """Run a jvmkit command with --json; returns (document, wall-clock seconds)."""
    t0 = time.monotonic()
    proc = jvmkit([*args, "--json"], env, timeout)
    return json.loads(proc.stdout), time.monotonic() - t0


def linux_kernels(env: dict) -> list[dict]:
    doc, _ = jvmkit_json(["kernel", "ls"], env, timeout=120)
    return [k for k in doc.get("kernels", []) if k.get("target") == "linux"]


def ensure_linux_kernel(env: dict) -> dict:
    """Make sure the cache in `env` holds a Linux kernel (pulling one from Debian if needed); the
    time this takes is reported but never part of a measurement."""
    if linux_kernels(env):
        return {"pulled": False, "seconds": 0.0}
    log("no Linux kernel in the benchmark cache: jvmkit kernel pull linux (network; not measured)")
    t0 = time.monotonic()
    jvmkit(["kernel", "pull", "linux"], env, timeout=1800)
    return {"pulled": True, "seconds": round(time.monotonic() - t0, 2)}


def seed_kernels(src_cache: Path, dest_cache: Path) -> bool:
    """Hard-link (else copy) `kernels/` from one cache into another, so a scratch cache boots and packs
    without the network. Returns True when something was seeded."""
    src = src_cache / "kernels"
    if not src.is_dir():
        return False

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest_cache / "kernels", copy_function=link, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.lock", "*.tmp"))
    return True


def load_samples_builder():
    spec = importlib.util.spec_from_file_location("jvmkit_samples_build", REPO / "samples" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_samples(dest: Path, names: list[str]) -> dict[str, Path]:
    return load_samples_builder().build_samples(dest, names=names)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except Exception:  # ImportError, or a broken install
        return None


def plot_skipped() -> dict:
    log("matplotlib is not importable: plot skipped (pip install matplotlib)")
    return {"written": False, "skipped": "matplotlib is not importable (pip install matplotlib)"}


def qemu_version() -> str | None:
    for name in ("qemu-system-x86_64",):
        path = shutil.which(name)
        if path:
            with contextlib.suppress(Exception):
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
                return out.splitlines()[0].strip()
    return None


def machine(env: dict | None = None) -> dict:
    info = {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "qemu": qemu_version(),
            "note": "shared machine: other sessions run VMs at the same time; times are noisy"}
    with contextlib.suppress(Exception):
        info["mem_total_mib"] = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                                         if l.startswith("MemTotal")).split()[1]) // 1024
    if env is not None:
        with contextlib.suppress(Exception):
            doc, _ = jvmkit_json(["doctor"], env, timeout=300)
            for check in doc.get("checks", []):
                if check.get("name") in ("kvm", "jdk", "qemu"):
                    info[f"doctor_{check['name']}"] = check.get("detail")
    return info


def finish(name: str, result: dict, out: Path) -> None:
    """Write `out/NAME.json` and print the document on stdout."""
    result.setdefault("machine", {})["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, sort_keys=False)
    (out / f"{name}.json").write_text(text + "\n")
    print(text)
    log(f"wrote {out / (name + '.json')}")


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def du_size(path: Path) -> int | None:
    """Bytes on disk (`du -sb`, symlinks not followed), or None."""
    with contextlib.suppress(Exception):
        out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, timeout=120).stdout
        return int(out.split()[0])
    return None


def save_figure(fig, out: Path, name: str) -> dict:
    """Write a matplotlib figure to out/name and close it; returns the plot record for the JSON."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")
    return {"written": True, "path": str(path)}
