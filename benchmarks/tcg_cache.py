"""Benchmark `run --tcg-cache` (issue 15): TCG's translation cache against boot time and QEMU's memory.

    python3 benchmarks/tcg_cache.py [--quick] [--out DIR] [--cache DIR] [--runs N] [--sizes 32M,64M,128M]

Under TCG every VM's QEMU keeps up to tb-size of translated guest code in host memory, which KVM
does not have: the part of a VM's cost that a fleet on a TCG host can trade against boot time.
Packs samples/hello and samples/multijar for linux (and osv when an OSv kernel is there), then in
interleaved rounds (order rotated each round) boots each image at 1G with each --tcg-cache size and
measures, from the start of `jvmkit run`, the time to the app's first stdout line (main_s) and to
exit (exit_s), and QEMU's peak RSS (VmHWM, read every 20 ms while it runs) and the peak RSS of its
executable anonymous mapping (the translation cache). Writes tcg_cache.json and tcg_cache.png.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
import _fleetbench as F  # noqa: E402
from boot import osv_available, qemu_child  # noqa: E402

APPS = {"hello": (("bench",), "Hello"), "multijar": ((), "{")}


def tb_rss_kib(pid: int) -> int:
    """RSS of QEMU's executable anonymous mappings: TCG's translation buffer."""
    return sum(m.get("Rss", 0) for m in F.smaps(pid) if not m["path"] and "x" in m["perms"])


def boot(image: Path, size: str, app: str, env: dict) -> dict:
    args, expect = APPS[app]
    argv = [*C.JVMKIT, "run", "--accel", "tcg", "--memory", "1G", "--tcg-cache", size, str(image), "--", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            cwd=C.REPO)
    peak = {"hwm_kib": 0, "tb_kib": 0}

    def watch():
        qemu = None
        while proc.poll() is None:
            try:
                qemu = qemu or qemu_child(proc.pid)
                if qemu:
                    for line in Path(f"/proc/{qemu}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak["hwm_kib"] = max(peak["hwm_kib"], int(line.split()[1]))
                    peak["tb_kib"] = max(peak["tb_kib"], tb_rss_kib(qemu))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    first, lines = None, []
    for raw in proc.stdout:
        if first is None:
            first = time.monotonic() - t0
        lines.append(raw.decode(errors="replace"))
    rc = proc.wait(timeout=600)
    exit_s = time.monotonic() - t0
    watcher.join(timeout=2)
    err = proc.stderr.read().decode(errors="replace")
    ok = rc == 0 and bool(lines) and lines[0].startswith(expect)
    rec = {"main_s": None if first is None else round(first, 3), "exit_s": round(exit_s, 3), "ok": ok,
           "qemu_peak_rss_mib": round(peak["hwm_kib"] / 1024, 1), "tb_peak_rss_mib": round(peak["tb_kib"] / 1024, 1)}
    if not ok:
        rec["stderr"] = err[-800:]
    return rec


def plot(result: dict, out: Path) -> dict:
    plt = C.pyplot()
    if plt is None:
        return C.plot_skipped()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = result["setup"]["sizes"]
    for image, per in result["configs"].items():
        xs = [int(s[:-1]) for s in sizes]
        left.errorbar(xs, [per[s]["main_s"]["median"] for s in sizes],
                      yerr=[[per[s]["main_s"]["median"] - per[s]["main_s"]["min"] for s in sizes],
                            [per[s]["main_s"]["max"] - per[s]["main_s"]["median"] for s in sizes]],
                      marker="o", capsize=3, label=image)
        right.plot(xs, [per[s]["tb_peak_rss_mib"]["median"] for s in sizes], marker="o", label=image)
    left.set(xlabel="--tcg-cache (MiB)", ylabel="s to main (median, min-max)", title="boot under TCG")
    right.set(xlabel="--tcg-cache (MiB)", ylabel="MiB (median)", title="translation cache RSS at its peak")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    return C.save_figure(fig, out, "tcg_cache")


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="boots per configuration [4; --quick 2]")
    parser.add_argument("--sizes", default="32M,64M,128M", help="--tcg-cache sizes [32M,64M,128M]")
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 4)
    sizes = args.sizes.split(",")
    ws = C.Workspace("tcg-cache", args.cache, args.keep)
    try:
        env = ws.env()
        C.ensure_linux_kernel(env)
        jars = C.build_samples(ws.dir / "samples", list(APPS))
        targets = ["linux"] + (["osv"] if osv_available(env)[0] else [])
        images = {}
        for target in targets:
            for app in APPS:
                out = ws.dir / f"{app}-{target}.jvmkit"
                C.jvmkit(["pack", jars[app], "--target", target, "-o", out, "--force"], env)
                images[f"{app}@{target}"] = (out, app)
        for key, (image, app) in images.items():  # unpack boot files into the cache: not counted
            boot(image, sizes[-1], app, env)
        configs = [(k, s) for k in images for s in sizes]
        samples: dict = {f"{k}|{s}": [] for k, s in configs}
        for r in range(runs):
            for key, size in configs[r % len(configs):] + configs[:r % len(configs)]:
                rec = boot(images[key][0], size, images[key][1], env)
                samples[f"{key}|{size}"].append(rec)
                C.log(f"round {r + 1}/{runs} {key} --tcg-cache {size}: main {rec['main_s']} s, "
                      f"TB {rec['tb_peak_rss_mib']} MiB, QEMU {rec['qemu_peak_rss_mib']} MiB"
                      + ("" if rec["ok"] else " FAILED"))
        result: dict = {"benchmark": "tcg_cache", "quick": args.quick, "machine": C.machine(env),
                        "setup": {"runs": runs, "sizes": sizes, "memory": "1G", "accel": "tcg",
                                  "measured": "from starting `jvmkit run` to the app's first stdout line and to "
                                              "exit; QEMU's VmHWM and its executable anonymous mappings' RSS, "
                                              "polled every 20 ms"}, "configs": {}}
        for key in images:
            result["configs"][key] = {}
            for size in sizes:
                good = [x for x in samples[f"{key}|{size}"] if x["ok"]]
                result["configs"][key][size] = {
                    name: C.summary([x[name] for x in good], 3 if name.endswith("_s") else 1)
                    for name in ("main_s", "exit_s", "qemu_peak_rss_mib", "tb_peak_rss_mib")}
                result["configs"][key][size]["failures"] = [x for x in samples[f"{key}|{size}"] if not x["ok"]]
        result["plots"] = plot(result, args.out)
        C.finish("tcg_cache", result, args.out)
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
