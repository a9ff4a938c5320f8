"""The balloon showcase: samples/cache-service under `jvmkit run --balloon`, with the host asking.

Fill the cache (200 MiB) → idle: the balloon takes the unused guest memory → the host asks for
memory (`jvmkit balloon set NAME 300M`): the guest agent runs the app's shrinker hook, the cache
evicts, the heap shrinks, the balloon inflates → load returns: the balloon deflates and the cache
refills. Prints JSON (cache bytes, heap, QEMU RSS and balloon over time) and draws a PNG timeline
when matplotlib is installed. Usage: python3 benchmarks/cache_service.py [--out DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JVMKIT = [sys.executable, "-m", "jvmkit"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--cache", type=Path, help="JVMKIT_CACHE to use [a temporary one]")
    parser.add_argument("--fill-mb", type=int, default=200)
    parser.add_argument("--ask-mb", type=int, default=300, help="what the host asks the VM to shrink to")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="jvmkit-bench-cache."))
    env = {**os.environ, "JVMKIT_CACHE": str(args.cache or work / "cache"), "PYTHONPATH": str(ROOT)}
    log("building samples/cache-service")
    subprocess.run([sys.executable, str(ROOT / "samples/cache-service/build.py"), str(work / "cs")], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    image = work / "cs.jvmkit"
    subprocess.run([*JVMKIT, "pack", str(work / "cs/cache-service.jar"), "--target", "linux", "--memory", "1G",
                    "-o", str(image), "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    port, name = free_port(), f"cache-{os.getpid()}"
    balloon_log, timeline = args.out / "cache-service-balloon.jsonl", args.out / "cache-service-load.jsonl"
    balloon_log.unlink(missing_ok=True)
    log(f"booting {name} with --balloon")
    vm = subprocess.Popen([*JVMKIT, "run", "--balloon", "--balloon-log", str(balloon_log), "--name", name,
                           "--publish", f"{port}:8080", str(image)], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    asked: dict = {}

    def ask_later() -> None:  # the host asks during the load's idle phase
        time.sleep(args.fill_mb / 8 + 25)
        asked["time"] = time.time()
        proc = subprocess.run([*JVMKIT, "balloon", "set", name, f"{args.ask_mb}M", "--json"], env=env,
                              capture_output=True, text=True, timeout=120)
        asked["result"] = json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr.strip()
        log(f"host asked for {args.ask_mb}M: {asked['result']}")

    try:
        load_start = time.time()
        asker = threading.Thread(target=ask_later, daemon=True)
        asker.start()
        subprocess.run([sys.executable, str(ROOT / "samples/cache-service/load.py"), "--url",
                        f"http://127.0.0.1:{port}", "--fill-mb", str(args.fill_mb), "--idle", "60",
                        "--wait-ready", "180", "--out", str(timeline), "--shutdown"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        asker.join(timeout=60)
        status = vm.wait(timeout=120)
    finally:
        if vm.poll() is None:
            vm.kill()
    load = [json.loads(l) for l in timeline.read_text().splitlines() if l.strip()]
    decisions = [json.loads(l) for l in balloon_log.read_text().splitlines() if l.strip()]
    t0 = load_start
    series = {
        "cache_mib": [(round(load_start + r["t"] - t0, 2), r["cache_bytes"] / 2**20) for r in load],
        "heap_committed_mib": [(round(load_start + r["t"] - t0, 2), r["heap_committed"] / 2**20) for r in load],
        "qemu_rss_mib": [(round(r["time"] - t0, 2), r["qemu_rss_mib"]) for r in decisions if "qemu_rss_mib" in r],
        "balloon_target_mib": [(round(r["time"] - t0, 2), r["balloon_target_mib"]) for r in decisions
                               if r.get("event") == "decision"],
    }
    released = max((r["shrink_released_bytes"] for r in load), default=0)
    result = {"benchmark": "cache-service", "exit_status": status, "asked_at_s": round(asked.get("time", t0) - t0, 2),
              "asked": asked.get("result"), "hook_released_mib": round(released / 2**20, 1),
              "hook_ran": released > 0, "series": series}
    (args.out / "cache-service.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4.5))
        for key, label in (("qemu_rss_mib", "QEMU RSS"), ("balloon_target_mib", "balloon target"),
                           ("heap_committed_mib", "heap committed"), ("cache_mib", "cache")):
            if series[key]:
                xs, ys = zip(*series[key])
                ax.step(xs, ys, where="post", label=label) if key == "balloon_target_mib" else ax.plot(xs, ys, label=label)
        if "time" in asked:
            ax.axvline(asked["time"] - t0, color="grey", linestyle=":", label=f"host asks for {args.ask_mb}M")
        ax.set_xlabel("seconds since the load started")
        ax.set_ylabel("MiB")
        ax.set_title("cache-service under jvmkit run --balloon (TCG): fill, idle, host asks, refill")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / "cache-service.png", dpi=90)
        result["plot"] = str(args.out / "cache-service.png")
    except ImportError:
        result["plot"] = "skipped: matplotlib is not installed"
    print(json.dumps({k: v for k, v in result.items() if k != "series"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
