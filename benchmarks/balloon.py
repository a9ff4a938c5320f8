"""Benchmark the JVM-aware balloon (issue 5): the phased app three ways in one run.

    python3 benchmarks/balloon.py [--quick] [--out DIR] [--cache DIR] [--grow MB --hold S --idle S]

samples/phases (grow GROW MiB, hold, drop, idle, grow again; default `300 5 30`, --quick `200 3 20`)
packed with `--memory 1G --jvm-arg=-Xmx600m` and run three ways:
  (iii) balloon:   `jvmkit run --balloon --balloon-log` — the guest agent shrinks the heap, the host
                   agent inflates the virtio-balloon (run first: it decides the targets);
  (i)   none:      `jvmkit run`, nothing steers memory;
  (ii)  plain:     `jvmkit run` without the agent's help, the benchmark driving QMP `balloon` to the
                   same targets the policy chose in (iii), at the same phase-relative times (each set
                   is anchored to the last phase line printed before it) — what a hypervisor does today.
Every way: QEMU's RSS from /proc/<qemu_pid>/status every 0.5 s (the pid from `jvmkit ps --json`),
the balloon's actual size (QMP query-balloon in (i)/(ii); the host agent's log in (iii), so the
benchmark never competes with it for the QMP socket), the app's phase lines with their host times,
its exit status, and guest OOM-killer lines (runs use --verbose; kernel messages go to a log file).
The runner's virtio-balloon has free page reporting on in every way.
Target (issue 5): with --balloon, at least 70% of the dropped heap (GROW MiB) is returned to the host
(QEMU RSS at the end of the hold phase minus its lowest value) within 15 s of the idle phase
starting (the `dropped` line), with zero app errors (exit 0, the second growth completes, no
OutOfMemoryError). Writes balloon.json, balloon.png and each way's logs under --out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

MEMORY = "1G"
MEMORY_MIB = 1024
XMX = "-Xmx600m"
WINDOW_S = 15.0
SAMPLE_S = 0.5
PHASE_RE = re.compile(r"^phase (\S+) t=([\d.]+) used=(\d+)M committed=(\d+)M")
OOM_RE = re.compile(r"Out of memory|oom-kill|invoked oom-killer|Killed process", re.I)


def read_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def find_vm(name: str, env: dict, proc: subprocess.Popen, timeout: float = 120) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            doc, _ = C.jvmkit_json(["ps"], env, timeout=30)
            for vm in doc.get("vms", []):
                if vm.get("name") == name and vm.get("qemu_pid"):
                    return vm
        except Exception:
            pass
        time.sleep(0.2)
    return None


def qmp_call(socket_path: str, command: str, **kwargs):
    from jvmkit.vm.qmp import QmpClient

    with QmpClient.connect(Path(socket_path), timeout=3.0) as qmp:
        return qmp.execute(command, **kwargs)


class Way:
    """One run of the phased app: starts it, samples it, and records everything with host times."""

    def __init__(self, key: str, image: Path, app_args: list[str], env: dict, out: Path, *,
                 balloon: bool = False, schedule: list[dict] | None = None, query_qmp: bool = True):
        self.key, self.image, self.app_args, self.env, self.out = key, image, app_args, env, out
        self.balloon, self.schedule, self.query_qmp = balloon, schedule, query_qmp
        self.name = f"bench-{key}-{int(time.time())}"
        self.phases: dict[str, dict] = {}
        self.lines: list[dict] = []
        self.samples: list[dict] = []
        self.sets: list[dict] = []
        self.errors: list[str] = []
        self.log_path = out / f"balloon-{key}.jsonl"
        self.stderr_path = out / f"balloon-{key}.stderr.log"
        self.vm: dict | None = None
        self.done = threading.Event()

    def run(self, timeout: float = 900) -> dict:
        argv = [*C.JVMKIT, "run", "--verbose", "--name", self.name, "--memory", MEMORY]
        if self.balloon:
            self.log_path.unlink(missing_ok=True)
            argv += ["--balloon", "--balloon-log", str(self.log_path)]
        argv += [str(self.image), "--", *self.app_args]
        C.log(f"way {self.key}: {' '.join(argv[2:])}")
        self.t0 = time.time()
        err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=C.REPO)
        killer = threading.Timer(timeout, self.proc.kill)
        killer.start()
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        driver = None
        if self.schedule:
            driver = threading.Thread(target=self._drive, daemon=True)
            driver.start()
        try:
            for raw in self.proc.stdout:
                now = time.time()
                text = raw.decode(errors="replace").rstrip("\n")
                self.lines.append({"t": round(now - self.t0, 3), "line": text})
                m = PHASE_RE.match(text)
                if m:
                    self.phases[m.group(1)] = {"t": round(now - self.t0, 3), "app_t": float(m.group(2)),
                                               "used_mib": int(m.group(3)), "committed_mib": int(m.group(4))}
                    C.log(f"way {self.key}: {text}")
            rc = self.proc.wait()
        finally:
            killer.cancel()
            self.done.set()
            err.close()
        self.end = time.time() - self.t0
        sampler.join(timeout=5)
        if driver:
            driver.join(timeout=5)
        self.rc = rc
        return self.result()

    # -- threads --
    def _sample(self) -> None:
        self.vm = find_vm(self.name, self.env, self.proc)
        if self.vm is None:
            self.errors.append("the VM never appeared in `jvmkit ps --json`")
            return
        pid, qmp = int(self.vm["qemu_pid"]), self.vm.get("qmp")
        while not self.done.is_set():
            t = time.time() - self.t0
            rss = read_rss_mib(pid)
            if rss is None:
                break
            sample = {"t": round(t, 2), "rss_mib": round(rss, 1)}
            if self.query_qmp and qmp:
                try:
                    sample["balloon_actual_mib"] = qmp_call(qmp, "query-balloon")["actual"] // C.MIB
                except Exception:
                    pass
            self.samples.append(sample)
            self.done.wait(SAMPLE_S)

    def _drive(self) -> None:
        """(ii): QMP `balloon` to each scheduled target when its anchor phase + offset is reached."""
        for item in self.schedule:
            while not self.done.is_set():
                anchor = 0.0 if item["anchor"] == "launch" else self.phases.get(item["anchor"], {}).get("t")
                if anchor is not None and time.time() - self.t0 >= anchor + item["offset_s"]:
                    break
                self.done.wait(0.05)
            if self.done.is_set() or not self.vm:
                return
            t = time.time() - self.t0
            try:
                qmp_call(self.vm["qmp"], "balloon", value=int(item["target_mib"]) * C.MIB)
                self.sets.append({"t": round(t, 2), "target_mib": item["target_mib"], "anchor": item["anchor"],
                                  "offset_s": item["offset_s"]})
                C.log(f"way {self.key}: QMP balloon -> {item['target_mib']} MiB ({item['anchor']} "
                      f"+{item['offset_s']:.1f}s)")
            except Exception as exc:
                self.errors.append(f"QMP balloon {item['target_mib']} MiB failed: {exc}")

    # -- results --
    def balloon_log(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(l) for l in self.log_path.read_text().splitlines() if l.strip()]

    def result(self) -> dict:
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        oom_lines = [l.strip() for l in stderr.splitlines() if OOM_RE.search(l)][:10]
        out_text = "\n".join(x["line"] for x in self.lines)
        grow = self.app_args[0]
        app_ok = (self.rc == 0 and f"regrew {grow} MiB" in out_text and "OutOfMemoryError" not in out_text
                  and not oom_lines)
        p = self.phases
        res = {"exit_status": self.rc, "app_ok": app_ok, "duration_s": round(self.end, 2),
               "phases": p, "app_output_tail": [x["line"] for x in self.lines[-3:]],
               "guest_oom_lines": oom_lines, "errors": self.errors, "qemu_pid": (self.vm or {}).get("qemu_pid"),
               "stderr_log": str(self.stderr_path)}
        if "grown" in p and "start" in p:
            res["grow_s"] = round(p["grown"]["t"] - p["start"]["t"], 2)
        if "regrown" in p and "idle-end" in p:
            res["regrow_s"] = round(p["regrown"]["t"] - p["idle-end"]["t"], 2)
        res["memory"] = self.memory_summary()
        return res

    def rss_between(self, a: float, b: float) -> list[float]:
        return [s["rss_mib"] for s in self.samples if a <= s["t"] <= b]

    def memory_summary(self) -> dict:
        p = self.phases
        if "dropped" not in p or "grown" not in p:
            return {"note": "the app never reached the idle phase"}
        drop = p["dropped"]["t"]
        idle_end = p.get("idle-end", {}).get("t", self.end)
        before = self.rss_between(p["grown"]["t"], drop) or self.rss_between(drop - 3, drop)
        peak = max(before) if before else None
        window = self.rss_between(drop, drop + WINDOW_S)
        idle = self.rss_between(drop, idle_end)
        low15 = min(window) if window else None
        low_idle = min(idle) if idle else None
        summary = {"rss_at_drop_mib": peak, "rss_min_within_15s_mib": low15, "rss_min_idle_mib": low_idle,
                   "rss_end_of_idle_mib": idle[-1] if idle else None,
                   "returned_within_15s_mib": round(peak - low15, 1) if peak and low15 else None,
                   "returned_by_idle_end_mib": round(peak - low_idle, 1) if peak and low_idle else None,
                   "rss_peak_mib": max((s["rss_mib"] for s in self.samples), default=None)}
        if peak:  # when RSS first fell by 70% of the dropped heap
            goal = 0.7 * float(self.app_args[0])
            first = next((x["t"] for x in self.samples if drop <= x["t"] <= idle_end and peak - x["rss_mib"] >= goal),
                         None)
            summary["seconds_to_70pct_of_drop"] = round(first - drop, 2) if first is not None else None
        actual = [s.get("balloon_actual_mib") for s in self.samples
                  if drop <= s["t"] <= idle_end and s.get("balloon_actual_mib") is not None]
        if actual:
            summary["balloon_actual_min_idle_mib"] = min(actual)
        return summary


def schedule_from_log(records: list[dict], phases: dict[str, dict], t0: float) -> list[dict]:
    """The QMP `balloon` sets the host agent made in (iii), as (anchor phase, offset, target) (pure).

    A shrink sets the balloon when its final target is below the size before it; a grow (and a
    lost-contact deflate) always sets it. Only changes are kept."""
    sets = []
    current = MEMORY_MIB
    for r in sorted(records, key=lambda r: r["time"]):
        target = None
        if r.get("event") == "decision" and r.get("action") == "shrink":
            t = (r.get("achieved") or {}).get("balloon_target_mib", r.get("balloon_target_mib"))
            if t is not None and t < r.get("numbers", {}).get("balloon_actual_mib", MEMORY_MIB):
                target = t
        elif r.get("event") == "decision" and r.get("action") == "grow":
            target = r.get("balloon_target_mib")
        elif r.get("event") == "lost-contact":
            target = r.get("balloon_target_mib", MEMORY_MIB)
        if target is None or target == current:
            continue
        current = target
        rel = r["time"] - t0
        anchor, anchor_t = "launch", 0.0
        for name, ph in sorted(phases.items(), key=lambda kv: kv[1]["t"]):
            if ph["t"] <= rel:
                anchor, anchor_t = name, ph["t"]
        sets.append({"t": round(rel, 2), "anchor": anchor, "offset_s": round(rel - anchor_t, 2),
                     "target_mib": int(target), "action": r.get("action")})
    return sets


def balloon_way_series(way: Way) -> dict:
    """Heap used/committed, balloon actual/target and RSS from the host agent's log, in way time."""
    series = {"t": [], "heap_used": [], "heap_committed": [], "balloon_actual": [], "balloon_target": [],
              "rss": []}
    for r in way.balloon_log():
        if r.get("event") != "decision":
            continue
        n = r.get("numbers", {})
        series["t"].append(round(r["time"] - way.t0, 2))
        series["heap_used"].append(n.get("heap_used_mib"))
        series["heap_committed"].append(n.get("heap_committed_mib"))
        series["balloon_actual"].append(n.get("balloon_actual_mib"))
        # a shrink's final target (raised to the safe floor after the heap shrank) is in `achieved`
        series["balloon_target"].append((r.get("achieved") or {}).get("balloon_target_mib", r.get("balloon_target_mib")))
        series["rss"].append(r.get("qemu_rss_mib"))
    return series


def plot(ways: dict[str, Way], schedule: list[dict], out: Path, grow_mb: int) -> dict:
    plt = C.pyplot()
    if plt is None:
        return C.plot_skipped()
    titles = {"none": "(i) no balloon", "plain": "(ii) plain virtio-balloon, same targets, no JVM agent",
              "balloon": "(iii) jvmkit run --balloon"}
    order = [k for k in ("none", "plain", "balloon") if k in ways]
    fig, axes = plt.subplots(len(order), 1, figsize=(11, 3.4 * len(order)), sharex=True, sharey=True)
    if len(order) == 1:
        axes = [axes]
    for ax, key in zip(axes, order):
        w = ways[key]
        zero = w.phases.get("dropped", {}).get("t", 0.0)
        ts = [s["t"] - zero for s in w.samples]
        ax.plot(ts, [s["rss_mib"] for s in w.samples], color="tab:red", label="QEMU RSS")
        actual = [(s["t"] - zero, s["balloon_actual_mib"]) for s in w.samples if "balloon_actual_mib" in s]
        if key == "balloon":
            s = balloon_way_series(w)
            tt = [t - zero for t in s["t"]]
            ax.plot(tt, s["heap_committed"], color="tab:blue", marker=".", label="heap committed (agent)")
            ax.plot(tt, s["heap_used"], color="tab:cyan", marker=".", label="heap used (agent)")
            ax.step(tt, s["balloon_actual"], where="post", color="tab:green", label="balloon actual (guest memory)")
            ax.step(tt, s["balloon_target"], where="post", color="tab:olive", linestyle="--", label="balloon target")
        else:
            if actual:
                ax.step([a for a, _ in actual], [b for _, b in actual], where="post", color="tab:green",
                        label="balloon actual (query-balloon)")
            if key == "plain" and w.sets:
                xs = [0.0 - zero] + [x["t"] - zero for x in w.sets] + [w.end - zero]
                ys = [MEMORY_MIB] + [x["target_mib"] for x in w.sets] + [w.sets[-1]["target_mib"]]
                ax.step(xs, ys, where="post", color="tab:olive", linestyle="--", label="balloon target (QMP)")
            pts = sorted(w.phases.values(), key=lambda p: p["t"])
            ax.plot([p["t"] - zero for p in pts], [p["committed_mib"] for p in pts], "s", color="tab:blue",
                    label="heap committed (phase lines)")
            ax.plot([p["t"] - zero for p in pts], [p["used_mib"] for p in pts], "o", color="tab:cyan",
                    label="heap used (phase lines)")
        if "dropped" in w.phases:
            end = w.phases.get("idle-end", {}).get("t", w.end) - zero
            ax.axvspan(0, end, color="grey", alpha=0.12, label="idle phase")
            ax.axvspan(0, WINDOW_S, color="gold", alpha=0.15, label=f"first {WINDOW_S:g} s")
        for name, ph in w.phases.items():
            ax.axvline(ph["t"] - zero, color="grey", linewidth=0.6)
            ax.text(ph["t"] - zero, 5, name, rotation=90, fontsize=7, va="bottom", ha="right")
        status = "ok" if w.rc == 0 else f"exit {w.rc}"
        ax.set_title(f"{titles[key]}  [{status}]", fontsize=10)
        ax.set_ylabel("MiB")
        ax.set_ylim(0, max(1400, max((s["rss_mib"] for s in w.samples), default=0) * 1.05))
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    axes[-1].set_xlabel("seconds since the idle phase started (the app's `dropped` line)")
    fig.suptitle(f"phases {grow_mb} MiB, guest {MEMORY}, {XMX} (TCG, shared 2-core machine)")
    return C.save_figure(fig, out, "balloon.png")


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--grow", type=int, default=None, help="MiB the app grows [300; --quick 200]")
    parser.add_argument("--hold", type=int, default=None, help="seconds held [5; --quick 3]")
    parser.add_argument("--idle", type=int, default=None, help="idle seconds [30; --quick 20]")
    args = parser.parse_args(argv)
    grow = args.grow or (200 if args.quick else 300)
    hold = args.hold if args.hold is not None else (3 if args.quick else 5)
    idle = args.idle if args.idle is not None else (20 if args.quick else 30)
    app_args = [str(grow), str(hold), str(idle)]
    ws = C.Workspace("balloon", args.cache, args.keep)
    try:
        env = ws.env()
        pull = C.ensure_linux_kernel(env)
        args.out.mkdir(parents=True, exist_ok=True)
        jar = C.build_samples(ws.dir / "samples", ["phases"])["phases"]
        image = ws.dir / "phases.jvmkit"
        C.log(f"pack phases --memory {MEMORY} --jvm-arg={XMX}")
        C.jvmkit(["pack", jar, "--target", "linux", "-o", image, "--force", "--memory", MEMORY,
                  f"--jvm-arg={XMX}", "-q"], env)
        result: dict = {"benchmark": "balloon", "quick": args.quick, "machine": C.machine(env),
                        "setup": {"cache": str(ws.cache), "kernel_pull": pull, "app": f"phases {' '.join(app_args)}",
                                  "memory": MEMORY, "jvm_args": [XMX], "sample_interval_s": SAMPLE_S,
                                  "order": ["balloon (iii)", "none (i)", "plain (ii)"],
                                  "free_page_reporting": "on in every way (the runner's default device)"}}
        ways: dict[str, Way] = {}
        ways["balloon"] = Way("balloon", image, app_args, env, args.out, balloon=True, query_qmp=False)
        res_balloon = ways["balloon"].run()
        schedule = schedule_from_log(ways["balloon"].balloon_log(), ways["balloon"].phases, ways["balloon"].t0)
        C.log(f"policy's balloon sets in (iii): {schedule}")
        ways["none"] = Way("none", image, app_args, env, args.out)
        res_none = ways["none"].run()
        ways["plain"] = Way("plain", image, app_args, env, args.out, schedule=schedule)
        res_plain = ways["plain"].run()
        res_plain["qmp_sets"] = ways["plain"].sets
        if ways["plain"].sets:
            lowest = min(s["target_mib"] for s in ways["plain"].sets)
            res_plain["lowest_target_mib"] = lowest
            act = res_plain["memory"].get("balloon_actual_min_idle_mib")
            res_plain["target_reached"] = act is not None and act <= lowest + 8
        if "regrow_s" in res_plain and "regrow_s" in res_none:
            res_plain["regrow_slowdown_vs_none"] = round(res_plain["regrow_s"] / res_none["regrow_s"], 2)
        if "regrow_s" in res_balloon and "regrow_s" in res_none:
            res_balloon["regrow_slowdown_vs_none"] = round(res_balloon["regrow_s"] / res_none["regrow_s"], 2)
        log_records = ways["balloon"].balloon_log()
        res_balloon["decisions"] = {
            "count": sum(1 for r in log_records if r.get("event") == "decision"),
            "shrinks": sum(1 for r in log_records if r.get("action") == "shrink"),
            "grows": sum(1 for r in log_records if r.get("event") == "decision" and r.get("action") == "grow"),
            "lost_contact": sum(1 for r in log_records if r.get("event") == "lost-contact"),
            "first_connected_s": next((round(r["time"] - ways["balloon"].t0, 2) for r in log_records
                                       if r.get("event") == "connected"), None),
            "log": str(ways["balloon"].log_path)}
        committed = [r.get("achieved", {}).get("heap_committed") for r in log_records
                     if r.get("achieved", {}).get("heap_committed") is not None]
        if committed:
            res_balloon["decisions"]["min_heap_committed_after_shrink_mib"] = round(min(committed) / C.MIB, 1)
        result["schedule_from_balloon"] = schedule
        result["ways"] = {"none": res_none, "plain": res_plain, "balloon": res_balloon}
        mem = res_balloon["memory"]
        returned = mem.get("returned_within_15s_mib")
        share = round(returned / grow, 3) if returned is not None else None
        result["targets"] = {
            "balloon_returns_dropped_heap": C.target(
                share, f">= 0.70 of the dropped heap ({grow} MiB) back to the host (QEMU RSS) within "
                       f"{WINDOW_S:g} s of the idle phase starting, zero app errors",
                share is not None and share >= 0.70 and res_balloon["app_ok"],
                returned_mib=returned, dropped_mib=grow, app_ok=res_balloon["app_ok"],
                exit_status=res_balloon["exit_status"],
                seconds_to_70pct=mem.get("seconds_to_70pct_of_drop")),
            "plain_balloon_outcome": {
                "returned_within_15s_mib": res_plain["memory"].get("returned_within_15s_mib"),
                "returned_by_idle_end_mib": res_plain["memory"].get("returned_by_idle_end_mib"),
                "balloon_actual_min_idle_mib": res_plain["memory"].get("balloon_actual_min_idle_mib"),
                "lowest_target_mib": res_plain.get("lowest_target_mib"),
                "target_reached": res_plain.get("target_reached"),
                "app_ok": res_plain["app_ok"], "exit_status": res_plain["exit_status"],
                "guest_oom_lines": res_plain["guest_oom_lines"],
                "regrow_slowdown_vs_none": res_plain.get("regrow_slowdown_vs_none")},
            "no_balloon_outcome": {
                "returned_by_idle_end_mib": res_none["memory"].get("returned_by_idle_end_mib"),
                "rss_min_idle_mib": res_none["memory"].get("rss_min_idle_mib"), "app_ok": res_none["app_ok"]},
        }
        result["plot"] = plot(ways, schedule, args.out, grow)
        C.finish("balloon", result, args.out)
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
