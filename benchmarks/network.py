"""Benchmark the guest network backends (issue 16): what each wall toward the host costs.

    python3 benchmarks/network.py [--quick] [--rounds N] [--out DIR] [--cache DIR] [--targets linux,osv]

Backends (vm/network.py), each through `jvmkit run -p PORT:8080` of samples/httpd packed at 256M:
- `slirp+filter`: QEMU's user network behind the cgroup BPF host filter (root's default; root only);
- `pasta`: QEMU's user network in a network namespace of its own, joined to the host by pasta
  (a non-root run's default where /dev/net/tun and user namespaces are usable;
  JVMKIT_NETWORK_BACKEND=pasta, which as root leaves the filter off);
- `passt`: passt on `-netdev stream` (a non-root run's fallback; JVMKIT_NETWORK_BACKEND=passt, which
  as root keeps the filter on).
For each: the time from starting `jvmkit run` to the first HTTP answer through the published port
(polled every 50 ms), then sequential GETs of `/` (a new connection each) for a fixed time (10 s,
5 s with --quick; a GET refused, reset or cut short is counted as failed), the RSS of the
backend's helper process (pasta, passt) while it serves, and `GET /exit`. Interleaved: for each
round, for each target, the backends in an order rotated each round. Medians with min/max.
Writes network.json and network.png under --out.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

BACKENDS = {"slirp+filter": {}, "pasta": {"JVMKIT_NETWORK_BACKEND": "pasta"},
            "passt": {"JVMKIT_NETWORK_BACKEND": "passt"}}


def get(url: str, timeout: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.read()
    except (OSError, http.client.HTTPException):  # refused, reset, or cut short
        return None


def helper_rss_mib(jvmkit_pid: int) -> float | None:
    """The RSS of the run's pasta or passt process, a child of its `jvmkit run` (None: it has
    none). Found by parent, not by command line: pasta rewrites its own arguments as it parses them."""
    out = subprocess.run(["pgrep", "-P", str(jvmkit_pid)], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(("pasta", "passt")):  # Debian execs pasta.avx2 / passt.avx2 where the CPU has it
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            return round(kib / 1024, 1)
    return None


def one_run(image: Path, env: dict, serve_s: float) -> dict:
    port = C.free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([*C.JVMKIT, "run", "-p", f"{port}:8080", str(image)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    first = None
    try:
        while time.monotonic() - t0 < 180 and proc.poll() is None:
            if get(base + "/", timeout=1.0) is not None:
                first = time.monotonic() - t0
                break
            time.sleep(0.05)
        if first is None:
            said = proc.stderr.read() if proc.poll() is not None else ""
            return {"failed": f"no answer (exit {proc.poll()}): {said[-300:]}"}
        rss = helper_rss_mib(proc.pid)
        n, errors, end = 0, 0, time.monotonic() + serve_s
        while time.monotonic() < end:
            if get(base + "/") is not None:
                n += 1
            else:
                errors += 1
        return {"first_answer_s": round(first, 3), "gets_per_s": round(n / serve_s, 1), "failed_gets": errors,
                "helper_rss_mib": rss}
    finally:
        get(base + "/exit?code=0")
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def plot(result: dict, out: Path) -> dict:
    plt = C.pyplot()
    if plt is None:
        return C.plot_skipped()
    targets = list(result["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "first_answer_s", "first answer (s)"), (axes[1], "gets_per_s", "GETs/s")):
        width = 0.8 / max(1, len(result["backends"]))
        for i, backend in enumerate(result["backends"]):
            meds, lows, highs = [], [], []
            for t in targets:
                s = result["results"][t][backend][key]
                meds.append(s["median"] or 0)
                lows.append((s["median"] or 0) - (s.get("min") or 0))
                highs.append((s.get("max") or 0) - (s["median"] or 0))
            xs = [j + i * width for j in range(len(targets))]
            ax.bar(xs, meds, width, yerr=[lows, highs], capsize=3, label=backend)
        ax.set_xticks([j + width * (len(result["backends"]) - 1) / 2 for j in range(len(targets))])
        ax.set_xticklabels(targets)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("httpd through a published port: to the first answer")
    axes[1].set_title("sequential GETs (new connection each)")
    return C.save_figure(fig, out, "network.png")


def main() -> int:
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds [3; 1 with --quick]")
    p.add_argument("--targets", default="linux,osv", help="targets to measure [linux,osv]")
    args = p.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    serve_s = 5.0 if args.quick else 10.0
    ws = C.Workspace("network", args.cache, args.keep)
    try:
        env = ws.env()
        C.ensure_linux_kernel(env)
        backends = [b for b in BACKENDS if b != "slirp+filter" or os.geteuid() == 0]
        jars = C.build_samples(ws.dir / "jars", ["httpd"])
        images = {}
        for t in args.targets.split(","):
            extra = []
            if t == "osv":
                kernels, _ = C.jvmkit_json(["kernel", "ls"], env, timeout=120)
                if not any(k.get("target") == "osv" for k in kernels.get("kernels", [])):
                    C.log("no OSv kernel in the cache: osv skipped")
                    continue
            image = ws.dir / f"httpd-{t}.jvmkit"
            C.jvmkit(["pack", jars["httpd"], "--target", t, "-o", image, "--memory", "256M", *extra], env, timeout=900)
            images[t] = image
        samples = {t: {b: [] for b in backends} for t in images}
        for r in range(rounds):
            for t, image in images.items():
                order = backends[r % len(backends):] + backends[:r % len(backends)]
                for b in order:
                    got = one_run(image, ws.env(**BACKENDS[b]), serve_s)
                    C.log(f"round {r + 1}/{rounds} {t} {b}: {got}")
                    samples[t][b].append(got)
        results = {}
        for t, by in samples.items():
            results[t] = {}
            for b, runs in by.items():
                ok = [x for x in runs if "failed" not in x]
                results[t][b] = {key: C.summary([x[key] for x in ok if x.get(key) is not None])
                                 for key in ("first_answer_s", "gets_per_s", "helper_rss_mib")}
                results[t][b]["failed_gets"] = sum(x.get("failed_gets", 0) for x in ok)
                results[t][b]["failed"] = [x["failed"] for x in runs if "failed" in x]
        result = {"benchmark": "network", "rounds": rounds, "serve_s": serve_s, "backends": backends,
                  "root": os.geteuid() == 0, "machine": C.machine(env), "results": results}
        result["plot"] = plot(result, args.out)
        C.finish("network", result, args.out)
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
