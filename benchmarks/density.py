"""Benchmark the fleet (issue 15): how many cache-service replicas fit in one host budget, memory that
follows moving load, and crowd boots, against containers of the same userland and host JVMs.

    python3 benchmarks/density.py [--quick] [--out DIR] [--cache DIR] [--budget 3G] [--reps N]

Density: under one budget (`host_memory`, 3G), replicas of samples/cache-service are started one
by one, each fills its cache with --fill-mb (100) MiB and idles, until one cannot be admitted or
an instance fails a request or is OOM-killed, four ways: (i) jvmkit linux VMs without the balloon
(each holds its --memory, 1G), (ii) the fleet with the balloon (--min-memory 256M), (iii)
"containers" of the same userland (see _fleetbench.py: unshare + chroot into the image's
initramfs, a memory cgroup each with the VM's --memory as its limit, all under a parent cgroup
limited to the budget; podman fails on this machine), (iv) plain host JVMs (the host's JDK, the
same flags, in the same cgroups), and (ii) again with OSv guests (`vm_fleet_osv`, when an OSv image
could be packed). Reports instances per GiB and where each instance's memory goes.
The ways are interleaved round by round; --reps rounds (2; --quick 1).
Moving load: with the fleet of (ii) full, load goes to one VM at a time (a first GET, then
--move-mb MiB of cache fills and GETs) while every VM is probed each second: failed requests,
OOM kills (guest consoles, the app's output), p50/p99 latency, the first request's latency, and
the time until the loaded VM's guest memory has grown by 80% of what it filled.
Crowd boot: N = 1, 4, 8, 16 started at once, time until every one answers GET /health: linux and
osv VMs (`jvmkit up`, parallel = N, no balloon), and for linux also 2 at a time (parallel = 2, as
many as the host has cores), containers and host JVMs. Under TCG on 2 cores the big N take minutes, so
N >= 8 runs once (--quick: N = 1, 4 only).
Writes density.json and density.png, moving-load.png, crowd-boot.png under --out.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
import _fleetbench as F  # noqa: E402

WAYS = ("vm_no_balloon", "vm_fleet", "vm_fleet_osv", "containers", "host_jvm")
LABELS = {"vm_no_balloon": "(i) VMs, no balloon", "vm_fleet": "(ii) fleet + balloon",
          "vm_fleet_osv": "(ii) the fleet, OSv guests",
          "containers": "(iii) containers", "host_jvm": "(iv) host JVMs"}


def mib(text: str) -> int:
    sys.path.insert(0, str(C.REPO))
    from jvmkit.units import parse_mib

    return parse_mib(text)


_PORTS = {"next": 19100}


def fresh_ports(n: int) -> int:
    """The first of n host ports not used before in this run: `jvmkit run` checks a port with a
    plain bind(), which fails while connections to a stopped VM's port are in TIME_WAIT."""
    base = _PORTS["next"]
    _PORTS["next"] += n + 8
    return base


def probe_all(ports: list[int]) -> list[tuple[int, bool, float]]:
    out = []
    for port in ports:
        ok, secs, body = F.http(f"http://127.0.0.1:{port}/item/probe-{port}", timeout=30)
        out.append((port, ok and len(body) == 64 * 1024, secs))
    return out


# ---- density --------------------------------------------------------------------------------

def density_vm(way: str, ctx: dict, rep: int) -> dict:
    balloon = way in ("vm_fleet", "vm_fleet_osv")
    image = ctx["osv_image"] if way == "vm_fleet_osv" else ctx["linux_image"]
    if image is None:
        return {"instances": None, "stopped_by": ctx.get("osv") or "no image"}
    tag = f"d{rep}{'o' if way == 'vm_fleet_osv' else 'b' if balloon else 'n'}"
    fleet = F.VmFleet(tag, image, ctx["work"], ctx["env"],
                      balloon=balloon, memory=ctx["vm_memory"], budget=ctx["budget"],
                      base_port=fresh_ports(ctx["max_vms"]), tcg_cache=ctx.get("tcg_cache"),
                      min_memory=ctx["min_memory"])
    result: dict = {"instances": 0, "stopped_by": None, "per_instance": []}
    try:
        for k in range(ctx["max_vms"]):
            t0 = time.monotonic()
            admitted, why = fleet.start(k)
            if not admitted:
                result["stopped_by"] = f"not admitted: {why}"
                break
            port = fleet.ports[-1]
            up = F.wait_health(port, 240)
            filled = up is not None and F.fill(port, ctx["fill_mb"])
            if balloon:  # let the brain settle this VM within the budget
                settle(fleet, fleet.names[-1], 90)
            probes = probe_all(fleet.ports)
            failed = [p for p, ok, _ in probes if not ok]
            result["per_instance"].append({"name": fleet.names[-1], "ready_s": up, "filled": filled,
                                           "start_to_settled_s": round(time.monotonic() - t0, 1),
                                           "brain": fleet.brain_status().get("vms", {}).get(fleet.names[-1])})
            if not filled or failed:
                result["stopped_by"] = f"requests failed on ports {failed or [port]}"
                break
            result["instances"] = k + 1
            C.log(f"density {way} rep {rep}: {k + 1} up")
        result["memory"] = fleet.memory_of()
        result["brain"] = fleet.brain_status() if balloon else None
        result["oom_kills"] = F.oom_kills_in(fleet.console_texts())
        result["within_budget_real"] = result["memory"]["total_mib"] <= mib(ctx["budget"])
        if way == "vm_fleet" and rep == 0 and result["instances"]:
            result["moving_load"] = moving_load(fleet, ctx)
    finally:
        if balloon:  # the brain's decisions and each VM's balloon log, for reading afterwards
            import shutil

            dest = ctx["out"] / f"density-logs-{fleet.tag}"
            dest.mkdir(parents=True, exist_ok=True)
            for src in [fleet.root / ".brain" / "decisions.jsonl", *(ctx["work"] / "balloon-logs").glob(f"{fleet.tag}*")]:
                if src.exists():
                    shutil.copy(src, dest / src.name)
            result["logs"] = str(dest)
        fleet.stop_all()
    return result


def settle(fleet: F.VmFleet, name: str, timeout: float) -> None:
    """Until the brain has readings for `name` and its balloon stopped moving (or timeout)."""
    t0, last, steady = time.monotonic(), None, 0
    while time.monotonic() - t0 < timeout:
        vm = fleet.brain_status().get("vms", {}).get(name) or {}
        actual = fleet.balloon_actual(name)
        if vm.get("role") not in (None, "waiting") and actual is not None and last is not None \
                and abs(actual - last) < 16:
            steady += 1
            if steady >= 3:
                return
        else:
            steady = 0
        last = actual
        time.sleep(2)


def density_cgroup(way: str, ctx: dict, rep: int) -> dict:
    host = way == "host_jvm"
    inst = F.CgroupInstances(f"{'h' if host else 'c'}{rep}", ctx["rootfs"], ctx["manifest"], mib(ctx["budget"]),
                             mib(ctx["vm_memory"]), fresh_ports(ctx["max_cgroup"]), host=host)
    result: dict = {"instances": 0, "stopped_by": None, "per_instance": []}
    try:
        for k in range(ctx["max_cgroup"]):
            port = inst.start(k, ctx["work"])
            up = F.wait_health(port, 60)
            filled = up is not None and F.fill(port, ctx["fill_mb"])
            time.sleep(1)
            probes = probe_all(inst.ports)
            failed = [p for p, ok, _ in probes if not ok]
            kills = inst.oom_kills()
            result["per_instance"].append({"port": port, "ready_s": up, "filled": filled})
            if not filled or failed or kills or not inst.alive():
                result["stopped_by"] = (f"OOM kills in the budget's cgroup: {kills}" if kills else
                                        f"requests failed on ports {failed or [port]}")
                break
            result["instances"] = k + 1
        result["memory"] = inst.memory_of()
        result["oom_kills"] = inst.oom_kills()
        if result["stopped_by"] is None:
            result["stopped_by"] = f"the benchmark's cap of {ctx['max_cgroup']} instances"
    finally:
        inst.close()
    return result


# ---- moving load ----------------------------------------------------------------------------

def moving_load(fleet: F.VmFleet, ctx: dict) -> dict:
    """Load to one VM at a time in turn, the fleet full (see the module)."""
    C.log(f"moving load over {len(fleet.names)} VMs, {ctx['move_mb']} MiB each")
    requests: list[dict] = []
    series: list[dict] = []
    stop = threading.Event()

    def sample():
        row = {"t": time.time(), "budget": fleet.brain_status().get("counted_mib")}
        for name in fleet.names:
            st = fleet.state(name)
            row[name] = {"rss": F.rss_mib(st.get("qemu_pid")), "actual": fleet.balloon_actual(name)}
        return row

    def prober():
        while not stop.is_set():
            for port in fleet.ports:
                ok, secs, _ = F.http(f"http://127.0.0.1:{port}/item/hot-{port}", timeout=30)
                requests.append({"t": time.time(), "port": port, "kind": "probe", "ok": ok, "s": secs})
            stop.wait(1.0)

    F.sample_series(stop, 1.0, sample, series)
    threading.Thread(target=prober, daemon=True).start()
    turns = []
    time.sleep(5)
    for name, port in zip(fleet.names, fleet.ports):
        before = fleet.balloon_actual(name) or 0
        t0 = time.time()
        ok, first, _ = F.http(f"http://127.0.0.1:{port}/item/move-first-{port}", timeout=30)
        requests.append({"t": t0, "port": port, "kind": "first", "ok": ok, "s": first})
        followed = None
        done = 0
        while done < ctx["move_mb"]:
            ok, secs, _ = F.http(f"http://127.0.0.1:{port}/fill?mb=10", "POST", timeout=60)
            requests.append({"t": time.time(), "port": port, "kind": "fill", "ok": ok, "s": secs})
            done += 10
            for j in range(3):
                ok, secs, _ = F.http(f"http://127.0.0.1:{port}/item/move-{done}-{j}", timeout=30)
                requests.append({"t": time.time(), "port": port, "kind": "get", "ok": ok, "s": secs})
            if followed is None and (fleet.balloon_actual(name) or 0) >= before + 0.8 * ctx["move_mb"]:
                followed = time.time() - t0
        deadline = time.time() + 60
        while followed is None and time.time() < deadline:
            if (fleet.balloon_actual(name) or 0) >= before + 0.8 * ctx["move_mb"]:
                followed = time.time() - t0
            time.sleep(0.5)
        turns.append({"vm": name, "start": round(t0, 2), "first_request_s": round(first, 3),
                      "guest_before_mib": before, "guest_after_mib": fleet.balloon_actual(name),
                      "memory_followed_s": None if followed is None else round(followed, 1)})
        C.log(f"moving load: {name}: first request {first:.2f}s, memory followed "
              f"{'never' if followed is None else f'{followed:.1f}s'}")
        time.sleep(10)
    stop.set()
    time.sleep(1.5)
    lat = [r["s"] for r in requests if r["ok"] and r["kind"] in ("get", "probe", "first")]
    t0 = turns[0]["start"] if turns else 0
    return {"turns": turns, "requests": len(requests), "failed_requests": sum(1 for r in requests if not r["ok"]),
            "oom_kills": F.oom_kills_in(fleet.console_texts()),
            "latency_s": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "max": round(max(lat), 3) if lat else None},
            "first_request_s": C.summary([t["first_request_s"] for t in turns]),
            "memory_followed_s": C.summary([t["memory_followed_s"] for t in turns]),
            "series": [{"t": round(r["t"] - t0, 1), **{k: v for k, v in r.items() if k != "t"}} for r in series]}


def _pct(xs: list[float], p: int) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 3)


# ---- crowd boot -----------------------------------------------------------------------------

def crowd_vm(image: Path, n: int, parallel: int, ctx: dict, tag: str) -> dict:
    path = ctx["work"] / f"crowd-{tag}.toml"
    base = fresh_ports(n)
    path.write_text(f'name = "crowd-{tag}"\nparallel = {parallel}\n[[vm]]\nname = "{tag}"\nimage = "{image}"\n'
                    f'replicas = {n}\nmemory = "{ctx["crowd_memory"]}"\nballoon = false\n'
                    f'publish = ["{base}+:8080"]\nargs = ["--port", "8080"]\n')
    t0 = time.monotonic()
    proc = subprocess.Popen([*C.JVMKIT, "up", str(path)], env=ctx["env"], cwd=C.REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    state = Path(ctx["env"]["XDG_RUNTIME_DIR"]) / "jvmkit" / ".fleet" / f"crowd-{tag}.json"

    def failed() -> list[str]:  # a VM that ended will never answer
        try:
            vms = json.loads(state.read_text()).get("vms", {})
        except (OSError, ValueError):
            return []
        return [f"{name}: exit status {vm.get('status')}" for name, vm in vms.items() if vm.get("phase") == "exited"]

    try:
        times = _all_healthy([base + k for k in range(n)], t0, 900, failed)
    finally:
        C.jvmkit(["down", f"crowd-{tag}"], ctx["env"], timeout=300, check=False)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return times


def crowd_cgroup(n: int, host: bool, ctx: dict, tag: str) -> dict:
    inst = F.CgroupInstances(tag, ctx["rootfs"], ctx["manifest"], 64 * 1024, mib(ctx["crowd_memory"]),
                             fresh_ports(n), host=host)
    try:
        t0 = time.monotonic()
        for k in range(n):
            inst.start(k, ctx["work"])
        return _all_healthy(inst.ports, t0, 300,
                            lambda: [f"instance {k}: exit status {p.returncode}" for k, p in enumerate(inst.procs)
                                     if p.poll() is not None])
    finally:
        inst.close()


def _all_healthy(ports: list[int], t0: float, timeout: float, failed=lambda: []) -> dict:
    answered: dict[int, float] = {}
    while len(answered) < len(ports) and time.monotonic() - t0 < timeout:
        gone = failed()
        if gone:
            return {"all_s": None, "first_s": round(min(answered.values()), 2) if answered else None,
                    "answered": len(answered), "n": len(ports), "failed": gone}
        for port in ports:
            if port not in answered:
                ok, _, _ = F.http(f"http://127.0.0.1:{port}/health", timeout=2)
                if ok:
                    answered[port] = time.monotonic() - t0
        time.sleep(0.2)
    done = len(answered) == len(ports)
    return {"all_s": round(max(answered.values()), 2) if done else None, "first_s": round(min(answered.values()), 2)
            if answered else None, "answered": len(answered), "n": len(ports)}


def crowd_boot(ctx: dict) -> dict:
    counts = (1, 4) if ctx["quick"] else (1, 4, 8, 16)
    rows: dict = {}
    for n in counts:
        reps = 2 if n <= 4 and not ctx["quick"] else 1
        kinds = [("linux", lambda r: crowd_vm(ctx["linux_image"], n, n, ctx, f"l{n}r{r}")),
                 ("containers", lambda r: crowd_cgroup(n, False, ctx, f"cc{n}r{r}")),
                 ("host_jvm", lambda r: crowd_cgroup(n, True, ctx, f"ch{n}r{r}"))]
        if ctx.get("osv_image"):
            kinds.insert(1, ("osv", lambda r: crowd_vm(ctx["osv_image"], n, n, ctx, f"o{n}r{r}")))
        if n in (4, 8):
            kinds.append(("linux_parallel_2", lambda r: crowd_vm(ctx["linux_image"], n, 2, ctx, f"p{n}r{r}")))
        for r in range(reps):
            for kind, fn in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                rec = fn(r)
                rows.setdefault(kind, {}).setdefault(str(n), []).append(rec)
                C.log(f"crowd boot {kind} N={n} round {r + 1}: all answer after {rec['all_s']} s")
    return {"counts": list(counts), "raw": rows,
            "all_answer_s": {k: {n: C.summary([x["all_s"] for x in v]) for n, v in per.items()}
                             for k, per in rows.items()}}


# ---- plots ----------------------------------------------------------------------------------

def plots(result: dict, out: Path) -> dict:
    plt = C.pyplot()
    if plt is None:
        return C.plot_skipped()
    records = {}
    d = result["density"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    for i, way in enumerate(WAYS):
        s = d["per_gib"][way]
        if s["median"] is None:
            continue
        left.bar(i, s["median"], color=("tab:gray", "tab:blue", "tab:purple", "tab:green", "tab:orange")[i], alpha=0.8)
        left.errorbar(i, s["median"], yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], color="black",
                      capsize=4)
        left.text(i, s["median"], f"{s['median']:.2f}", ha="center", va="bottom")
    left.set_xticks(range(len(WAYS)), [LABELS[w] for w in WAYS], fontsize=8)
    left.set_ylabel("instances per GiB of budget")
    left.set_title(f"cache-service replicas in {result['setup']['budget']} ({result['setup']['fill_mb']} MiB cache each)")
    parts = d.get("breakdown_mib", {})
    keys = ("guest_ram", "tcg_translation_cache", "boot_files_mapped", "qemu_itself", "jvmkit_processes", "rss",
            "cache", "shared_page_cache")
    bottom = [0.0] * len(WAYS)
    for key in keys:
        vals = [parts.get(w, {}).get(key, 0) or 0 for w in WAYS]
        if any(vals):
            right.bar(range(len(WAYS)), vals, bottom=bottom, label=key.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, vals)]
    right.set_xticks(range(len(WAYS)), [LABELS[w] for w in WAYS], fontsize=8)
    right.set_ylabel("MiB per instance (PSS)")
    right.set_title("where an instance's memory goes")
    right.legend(fontsize=7)
    records["density"] = C.save_figure(fig, out, "density.png")
    ml = result.get("moving_load")
    if ml and ml.get("series"):
        fig, ax = plt.subplots(figsize=(12, 5))
        names = [k for k in ml["series"][0] if k not in ("t", "budget")]
        xs = [r["t"] for r in ml["series"]]
        for name in names:
            ax.plot(xs, [r[name]["rss"] for r in ml["series"]], label=f"{name} QEMU RSS")
        ax.plot(xs, [r.get("budget") for r in ml["series"]], color="black", linestyle="--", label="budget in use (brain)")
        ax.axhline(mib(result["setup"]["budget"]), color="red", linestyle=":", label="host_memory")
        for t in ml["turns"]:
            ax.axvline(t["start"] - ml["turns"][0]["start"], color="grey", alpha=0.4)
        ax.set_xlabel("seconds (grey lines: load moves to the next VM)")
        ax.set_ylabel("MiB")
        ax.set_title("moving load across the full fleet (TCG)")
        ax.legend(fontsize=7, ncol=2)
        records["moving_load"] = C.save_figure(fig, out, "moving-load.png")
    cb = result.get("crowd_boot")
    if cb:
        fig, ax = plt.subplots(figsize=(9, 5))
        for kind, per in cb["all_answer_s"].items():
            ns = sorted(int(n) for n in per if per[n]["median"] is not None)
            ax.plot(ns, [per[str(n)]["median"] for n in ns], marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("instances started at once")
        ax.set_ylabel("seconds until all answer")
        ax.set_title("crowd boot (TCG, 2 host cores)")
        ax.legend()
        records["crowd_boot"] = C.save_figure(fig, out, "crowd-boot.png")
    return records


# ---- main -----------------------------------------------------------------------------------

def breakdown(result: dict, way: str) -> dict:
    """The median instance's memory by part (MiB)."""
    mem = result.get("memory") or {}
    if way.startswith("vm"):
        vms = list(mem.get("vms", {}).values())
        if not vms:
            return {}
        part = lambda key: statistics.median(v["qemu"].get(key, 0) for v in vms)  # noqa: E731
        extra = (mem.get("brain_pss", 0) + mem.get("supervisors_pss", 0)) / len(vms)
        return {"guest_ram": part("guest_ram"), "tcg_translation_cache": part("tcg_translation_cache"),
                "boot_files_mapped": part("boot_files_mapped"), "qemu_itself": part("qemu_itself"),
                "jvmkit_processes": round(statistics.median(v["jvmkit_run_pss"] for v in vms) + extra, 1)}
    inst = list(mem.get("instances", {}).values())
    if not inst:
        return {}
    return {"rss": statistics.median(v["rss"] for v in inst), "cache": statistics.median(v["cache"] for v in inst),
            "shared_page_cache": round(mem.get("shared_page_cache_mib", 0) / len(inst), 1)}


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="3G")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--fill-mb", type=int, default=100)
    p.add_argument("--move-mb", type=int, default=150)
    p.add_argument("--skip", action="append", default=[], help="density or crowd (repeatable)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"density ways to run [{','.join(WAYS)}]")
    p.add_argument("--min-memory", default="256M",
                   help="the fleet VMs' min_memory: the least a balloon floor goes to, and what a VM is "
                        "admitted at before the brain has measured it [256M]")
    p.add_argument("--tcg-cache", default=None, help="the VMs' --tcg-cache (both VM ways) [jvmkit's default]")
    p.add_argument("--jvm-arg", action="append", default=[],
                   help="a JVM option packed into both images, so also the containers' and host JVMs' (repeatable; "
                        "e.g. -Xmx320m: an OSv guest's balloon floor keeps room for the heap's max)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("density.py needs root for its memory cgroups and namespaces", file=sys.stderr)
        return 2
    reps = args.reps or (1 if args.quick else 2)
    ws = C.Workspace("density", args.cache, args.keep)
    try:
        env = ws.env(XDG_RUNTIME_DIR=str(ws.dir / "xdg"))
        (ws.dir / "xdg").mkdir()
        C.ensure_linux_kernel(env)
        C.log("building samples/cache-service and packing it (linux, osv)")
        subprocess.run([sys.executable, str(C.REPO / "samples/cache-service/build.py"), str(ws.dir / "cs")], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        linux = ws.dir / "cs-linux.jvmkit"
        jvm_args = [f"--jvm-arg={a}" for a in args.jvm_arg]
        C.jvmkit(["pack", ws.dir / "cs/cache-service.jar", "--target", "linux", "--memory", "1G", *jvm_args,
                  "-o", linux], env)
        osv = ws.dir / "cs-osv.jvmkit"
        osv_note = None
        try:
            C.jvmkit(["pack", ws.dir / "cs/cache-service.jar", "--target", "osv", "--memory", "1G", *jvm_args,
                      "-o", osv], env)
        except RuntimeError as exc:
            osv, osv_note = None, f"osv pack failed (no OSv kernel?): {str(exc)[-300:]}"
        manifest = json.loads((linux / "manifest.json").read_text())
        ctx = {"work": ws.dir, "env": env, "linux_image": linux, "osv_image": osv, "manifest": manifest,
               "rootfs": F.unpack_initramfs(linux, ws.dir / "rootfs"), "budget": args.budget, "vm_memory": "1G",
               "crowd_memory": "512M", "fill_mb": args.fill_mb, "move_mb": args.move_mb,
               "max_vms": 12, "max_cgroup": 40, "quick": args.quick, "out": args.out, "tcg_cache": args.tcg_cache,
               "min_memory": args.min_memory}
        result: dict = {"benchmark": "density", "quick": args.quick, "machine": C.machine(env), "setup": {
            "budget": args.budget, "fill_mb": args.fill_mb, "move_mb": args.move_mb, "reps": reps,
            "tcg_cache": args.tcg_cache or "jvmkit's default (128M)", "jvm_args": args.jvm_arg,
            "vm_memory": "1G", "min_memory": args.min_memory, "crowd_memory": "512M", "osv": osv_note or "packed",
            "containers": "unshare --mount --pid --fork --uts --ipc + chroot into the linux image's initramfs, "
                          "cgroup v1 memory limit 1G each under a parent limited to the budget; host network, one "
                          "port each (podman fails to set rlimits here and crun refuses the hybrid cgroup layout)",
            "host_jvm": f"{F.HOST_JDK}/bin/java, the image's flags, the same cgroups",
            "java": F.java_command(manifest),
            "note": "TCG only (no KVM), 2 cores shared with other work: fewer repetitions than usual"}}
        if "density" not in args.skip:
            runs: dict = {w: [] for w in WAYS}
            chosen = tuple(w for w in WAYS if w in args.ways.split(","))
            for rep in range(reps):
                order = chosen[rep % len(chosen):] + chosen[:rep % len(chosen)]
                for way in order:
                    C.log(f"density {way}, round {rep + 1}/{reps}")
                    fn = density_vm if way.startswith("vm") else density_cgroup
                    runs[way].append(fn(way, ctx, rep))
                    C.log(f"density {way}: {runs[way][-1]['instances']} instances ({runs[way][-1]['stopped_by']})")
            gib = mib(args.budget) / 1024
            per_gib = {w: C.summary([r["instances"] / gib for r in runs[w] if r["instances"] is not None]) for w in WAYS}
            result["density"] = {"instances": {w: C.summary([r["instances"] for r in runs[w]], 0) for w in WAYS},
                                 "per_gib": per_gib,
                                 "breakdown_mib": {w: breakdown(runs[w][0], w) for w in WAYS if runs[w]},
                                 "runs": {w: [{k: v for k, v in r.items() if k != "moving_load"} for r in runs[w]]
                                          for w in WAYS}}
            moving = next((r.get("moving_load") for r in runs["vm_fleet"] if r.get("moving_load")), None)
            result["moving_load"] = moving
            fleet_n, plain_n = per_gib["vm_fleet"]["median"], per_gib["vm_no_balloon"]["median"]
            cont_n = per_gib["containers"]["median"]
            ratio = round(fleet_n / plain_n, 2) if fleet_n and plain_n else None
            vs_cont = round(fleet_n / cont_n, 2) if fleet_n and cont_n else None
            result["targets"] = {
                "fleet_vs_no_balloon": C.target(ratio, ">= 2.5x as many VMs as without the balloon, same budget",
                                                ratio is not None and ratio >= 2.5),
                "fleet_vs_containers": C.target(vs_cont, ">= 0.5x the density of containers of the same app",
                                                vs_cont is not None and vs_cont >= 0.5)}
            osv_n = per_gib["vm_fleet_osv"]["median"]
            if osv_n and cont_n:  # the same target for a fleet of OSv guests (no initramfs, a smaller kernel)
                osv_vs = round(osv_n / cont_n, 2)
                result["targets"]["osv_fleet_vs_containers"] = C.target(
                    osv_vs, ">= 0.5x the density of containers of the same app (OSv guests)", osv_vs >= 0.5)
            if moving:
                first = moving["first_request_s"]["max"]
                result["targets"]["moving_load_clean"] = C.target(
                    {"failed_requests": moving["failed_requests"], "oom_kills": moving["oom_kills"]},
                    "zero failed requests and zero OOM kills through the moving load",
                    moving["failed_requests"] == 0 and moving["oom_kills"] == 0)
                result["targets"]["first_request_when_loaded"] = C.target(
                    first, "<= 2 s for the first request of a VM that gets load back, fleet full",
                    first is not None and first <= 2.0)
        if "crowd" not in args.skip:
            result["crowd_boot"] = crowd_boot(ctx)
        result["plots"] = plots(result, args.out) if "density" in result or "crowd_boot" in result else {}
        C.finish("density", result, args.out)
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
