"""Benchmark warm starts (issue 17): cold boot vs restore from a snapshot, to the app's first answer.

    python3 benchmarks/snapshot.py [--quick] [--out DIR] [--cache DIR] [--runs N] [--targets linux,osv]

Two apps: samples/httpd (snapshot taken with `--ready-url http://127.0.0.1:8080/`, so its request
path is warm; the answer is `GET /`) and samples/warmstart, which takes seconds to initialise
(generating, parsing and indexing 40 000 log lines with regexes, streams and lambdas) and calls
io.jvmkit.Ready.signal() when done (the answer is `GET /id`). Each is packed for linux and osv (when
an OSv kernel is available) with default memory 512M and 4G, and each image gets its snapshot at
its default memory (`jvmkit snapshot`; its time, the state file's size and the guest's used memory
after the trim are recorded). Then, in interleaved rounds (the order rotated each round), each image
is run cold (`jvmkit run --cold`) and restored (`jvmkit run`), and the time from the start of the
`jvmkit run` process to the first answer on the published port is measured (polled every 20 ms),
then the app is told to exit. A restore run that did not restore (no "restored from the image's
snapshot" line with --verbose) counts as failed. Last, N = 1, 4 and 8 restores of the httpd 512M
image are started at once, per target: each one's time to first answer.

Targets (reported, never asserted): restore to first answer <= 0.1x the cold boot's; the state file
<= 1.25x the guest's used memory (MemTotal - MemFree after the trim, as the guest agent reads it);
restore at 4G within 20% of 512M. Writes snapshot.json and snapshot.png under --out.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

MEMORIES = ("512M", "4G")
APPS = {"httpd": {"path": "/", "snapshot": ["--ready-url", "http://127.0.0.1:8080/"]},
        "warmstart": {"path": "/id", "snapshot": []}}
CONCURRENCY = (1, 4, 8)
RESTORED = re.compile(r"restored from the image's snapshot: state loaded in ([\d.]+) s, identity renewed in ([\d.]+) s")


class Run:
    """One `jvmkit run` with port 8080 published; `answer_s` is the time to the first answer."""

    def __init__(self, image: Path, env: dict, *, cold: bool, path: str):
        self.port = C.free_port()
        argv = [*C.JVMKIT, "run", "-p", f"{self.port}:8080", *(["--cold"] if cold else ["--verbose"]), str(image)]
        self.cold, self.path = cold, path
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env=env, cwd=C.REPO)
        self.answer_s: float | None = None
        self.body = ""

    def wait_answer(self, timeout: float = 600) -> None:
        url = f"http://127.0.0.1:{self.port}{self.path}"
        while time.monotonic() - self.t0 < timeout and self.proc.poll() is None:
            try:
                self.body = urllib.request.urlopen(url, timeout=5).read().decode()
                self.answer_s = time.monotonic() - self.t0
                return
            except Exception:  # noqa: BLE001 - refused, reset, incomplete: not up yet
                time.sleep(0.02)

    def finish(self) -> dict:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/exit?code=0", timeout=10).read()
        except Exception:  # noqa: BLE001 - OSv may power off before answering
            pass
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        err = err.decode(errors="replace")
        found = RESTORED.search(err)
        ok = self.answer_s is not None and (self.cold or found is not None)
        record = {"answer_s": None if self.answer_s is None else round(self.answer_s, 3), "ok": ok,
                  "status": self.proc.returncode}
        if found:
            record.update(loaded_s=float(found.group(1)), renewed_s=float(found.group(2)))
        if not ok:
            record["stderr"] = err[-1500:]
        return record


def once(image: Path, env: dict, cold: bool, path: str) -> dict:
    run = Run(image, env, cold=cold, path=path)
    run.wait_answer()
    return run.finish()


def concurrent(image: Path, env: dict, n: int, path: str) -> dict:
    runs = [Run(image, env, cold=False, path=path) for _ in range(n)]
    threads = [threading.Thread(target=r.wait_answer, daemon=True) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    records = [r.finish() for r in runs]
    good = [r for r in records if r["ok"]]
    return {"n": n, "ok": len(good), "answer_s": C.summary([r["answer_s"] for r in good]),
            "distinct_answers": len({r.body for r in runs}), "runs": records}


def osv_available(env: dict) -> tuple[bool, str]:
    import os

    if os.environ.get("JVMKIT_OSV_KERNEL"):
        return True, "JVMKIT_OSV_KERNEL"
    doc, _ = C.jvmkit_json(["kernel", "ls"], env, timeout=120)
    if any(k.get("target") == "osv" for k in doc.get("kernels", [])):
        return True, "kernel cache"
    return False, "no OSv kernel (JVMKIT_OSV_KERNEL or `jvmkit kernel import osv PATH`)"


def plot(result: dict, out: Path) -> dict:
    plt = C.pyplot()
    if plt is None:
        return C.plot_skipped()
    configs = result["configs"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [3, 1.3, 1.3]})
    keys = list(configs)
    for i, key in enumerate(keys):
        for j, (kind, color) in enumerate((("cold", "#c44e52"), ("restore", "#4c72b0"))):
            s = configs[key][kind]
            if s["median"] is None:
                continue
            left.bar(i + (j - 0.5) * 0.38, s["median"], 0.38, color=color, label=kind if i == 0 else None,
                     yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], capsize=3)
    left.set_xticks(range(len(keys)))
    left.set_xticklabels([k.replace("@", "\n") for k in keys], fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("s from `jvmkit run` to the first answer (median, min-max)")
    left.legend()
    left.set_title("cold boot vs restore")
    for target, rows in result.get("concurrent", {}).items():
        xs = [r["n"] for r in rows]
        middle.errorbar(xs, [r["answer_s"]["median"] for r in rows],
                        yerr=[[r["answer_s"]["median"] - r["answer_s"]["min"] for r in rows],
                              [r["answer_s"]["max"] - r["answer_s"]["median"] for r in rows]],
                        marker="o", capsize=3, label=f"{target} httpd 512M")
    middle.set_xlabel("restores started at once")
    middle.set_ylabel("s to first answer (median, min-max)")
    middle.set_xticks(list(CONCURRENCY))
    middle.legend(fontsize=8)
    middle.set_title("one snapshot, N VMs")
    snaps = result["snapshots"]
    for key, snap in snaps.items():
        if snap.get("guest_used_mib"):
            right.scatter(snap["guest_used_mib"], snap["state_mib"], label=key, s=25)
    lim = max([s.get("guest_used_mib") or 0 for s in snaps.values()] + [1]) * 1.1
    right.plot([0, lim], [0, 1.25 * lim], "k--", linewidth=0.8, label="1.25x used")
    right.set_xlabel("guest used memory after the trim (MiB)")
    right.set_ylabel("state file (MiB, zstd)")
    right.legend(fontsize=6)
    right.set_title("state file size")
    fig.suptitle(f"jvmkit snapshots (TCG, {result['machine'].get('cpus')} host cores, shared machine)")
    return C.save_figure(fig, out, "snapshot.png")


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="cold and restore runs per image [3; --quick 2]")
    parser.add_argument("--targets", default="linux,osv", help="targets to measure [linux,osv]")
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 3)
    ws = C.Workspace("snapshot", args.cache, args.keep)
    env = ws.env()
    result: dict = {"benchmark": "snapshot", "runs": runs, "machine": C.machine(env), "setup": {}}
    try:
        result["setup"]["kernel_pull"] = C.ensure_linux_kernel(env)
        targets = [t for t in args.targets.split(",") if t]
        if "osv" in targets:
            ok, why = osv_available(env)
            result["setup"]["osv"] = why
            if not ok:
                targets.remove("osv")
        jars = C.build_samples(ws.dir / "jars", list(APPS))
        images, snapshots = {}, {}
        for app in APPS:
            for target in targets:
                for memory in MEMORIES:
                    key = f"{app}@{target}@{memory}"
                    image = ws.dir / f"{app}-{target}-{memory}.jvmkit"
                    C.log(f"pack + snapshot {key}")
                    C.jvmkit(["pack", jars[app], "--target", target, "--memory", memory, "-o", image, "--quiet"],
                             env, timeout=1800)
                    doc, seconds = C.jvmkit_json(["snapshot", image, *APPS[app]["snapshot"]], env, timeout=1800)
                    info = doc["snapshot"]
                    snapshots[key] = {"seconds": round(seconds, 2), "save_s": doc["save_seconds"],
                                      "state_mib": round(info["state"]["size"] / C.MIB, 1),
                                      "stream_mib": round((info["state"].get("raw_size") or 0) / C.MIB, 1),
                                      "guest_used_mib": info.get("guest_used_mib"),
                                      "heap_committed_mib": info.get("heap_committed_mib")}
                    images[key] = image
        result["snapshots"] = snapshots

        order = list(images)
        samples: dict[str, dict[str, list[dict]]] = {k: {"cold": [], "restore": []} for k in order}
        for r in range(runs):
            rotated = order[r % len(order):] + order[:r % len(order)]
            for key in rotated:
                app = key.split("@")[0]
                for kind in (("cold", "restore") if r % 2 == 0 else ("restore", "cold")):
                    record = once(images[key], env, kind == "cold", APPS[app]["path"])
                    C.log(f"round {r + 1}/{runs} {key} {kind}: {record['answer_s']} s"
                          + ("" if record["ok"] else " (FAILED)"))
                    samples[key][kind].append(record)
        configs = {}
        for key in order:
            good = {kind: [x for x in samples[key][kind] if x["ok"]] for kind in ("cold", "restore")}
            configs[key] = {"cold": C.summary([x["answer_s"] for x in good["cold"]]),
                            "restore": C.summary([x["answer_s"] for x in good["restore"]]),
                            "restore_loaded_s": C.summary([x["loaded_s"] for x in good["restore"]]),
                            "restore_renewed_s": C.summary([x["renewed_s"] for x in good["restore"]]),
                            "failed": {kind: [x for x in samples[key][kind] if not x["ok"]] for kind in ("cold", "restore")}}
        result["configs"] = configs

        result["concurrent"] = {}
        for target in targets:
            key = f"httpd@{target}@512M"
            rows = []
            for n in CONCURRENCY:
                C.log(f"{n} restores at once: {key}")
                rows.append(concurrent(images[key], env, n, "/"))
            result["concurrent"][target] = rows

        targets_out = {}
        for key, cfg in configs.items():
            cold, warm = cfg["cold"]["median"], cfg["restore"]["median"]
            ratio = round(warm / cold, 3) if cold and warm else None
            targets_out[f"restore_vs_cold:{key}"] = C.target(ratio, "<= 0.1", None if ratio is None else ratio <= 0.1,
                                                             cold_s=cold, restore_s=warm)
        for key, snap in snapshots.items():
            used, state = snap.get("guest_used_mib"), snap["state_mib"]
            ratio = round(state / used, 3) if used else None
            targets_out[f"state_vs_used:{key}"] = C.target(ratio, "<= 1.25", None if ratio is None else ratio <= 1.25,
                                                           state_mib=state, guest_used_mib=used)
        for app in APPS:
            for target in targets:
                small, big = configs[f"{app}@{target}@512M"]["restore"]["median"], \
                    configs[f"{app}@{target}@4G"]["restore"]["median"]
                ratio = round(big / small, 3) if small and big else None
                targets_out[f"restore_4g_vs_512m:{app}@{target}"] = C.target(
                    ratio, "<= 1.2", None if ratio is None else ratio <= 1.2, restore_512m_s=small, restore_4g_s=big)
        result["targets"] = targets_out
        result["plot"] = plot(result, args.out)
        C.finish("snapshot", result, args.out)
    finally:
        ws.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
