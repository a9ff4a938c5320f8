"""Benchmark `jvmkit run` boot time (issue 3): hello, trimmed + CDS against the full JDK without CDS.

    python3 benchmarks/boot.py [--quick] [--out DIR] [--cache DIR] [--runs N]

Packs samples/hello for `--target linux` as
  (a) the jvmkit image: the default `auto` profile (trimmed runtime + default CDS archive);
  (b) the same app on the full, untrimmed JDK without CDS in the same micro-VM: `--profile jdk
      --jvm-arg=-Xshare:off` (the build JDK copied as it is installed);
  (b_jlink) for reference, every JDK module through jlink (debug info stripped, compressed), no CDS;
and samples/multijar for linux. Boots each N times (default 5, --quick 3) and measures, from the
start of the `jvmkit run` process, the wall-clock time to the app's first stdout line ("main") and
to the process's exit. (a) and the OSv hello run at guest memory 256M, 1G, 4G, 8G and 16G (issue 15:
the OSv paper's critics saw OSv's boot grow linearly with memory); the rest at 1G, where the
comparisons are made. The configurations are interleaved round by round, so load from other work on
the machine hits them alike. One boot of each image before the rounds (unpacking boot files into the
cache, the KVM probe) is reported as `first_boot` and not counted.
OSv rows (issue 4): when `jvmkit kernel ls --json` lists an osv kernel or JVMKIT_OSV_KERNEL is set,
hello and multijar are also packed with `--target osv` and booted at 1G; otherwise the JSON says why
they were skipped.
Targets: (a) reaches main >= 1.5x sooner than (b); boot-to-main at 8G within 10% of 256M; the
jvmkit hello image (kernel included) < 40 MB; the OSv images reach main in less than half the
linux images' time. Writes boot.json and boot.png under --out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

MEMORIES = ("256M", "1G", "4G", "8G", "16G")
MEMORY_KINDS = ("a", "osv")  # booted at every size of MEMORIES (the rest at COMPARE_MEMORY)
COMPARE_MEMORY = "1G"
IMAGE_LIMIT = 40 * 10**6  # 40 MB


def boot_once(image: Path, memory: str, env: dict, timeout: float = 600, app_args: tuple = ("bench",),
              expect: str = "Hello") -> dict:
    """One `jvmkit run`: seconds to the first stdout line and to exit, exit status, output."""
    argv = [*C.JVMKIT, "run", "--memory", memory, str(image), "--", *app_args]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, cwd=C.REPO)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    qemu_at: list[float] = []
    poller = threading.Thread(target=_watch_child, args=(proc, t0, qemu_at), daemon=True)
    poller.start()
    first = None
    lines = []
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        for raw in proc.stdout:
            if first is None:
                first = time.monotonic() - t0
            lines.append(raw.decode(errors="replace").rstrip("\n"))
        rc = proc.wait()
    finally:
        killer.cancel()
    exit_s = time.monotonic() - t0
    reader.join(timeout=5)
    ok = rc == 0 and bool(lines) and lines[0].startswith(expect)
    qemu_s = round(qemu_at[0], 3) if qemu_at else None
    record = {"main_s": None if first is None else round(first, 3), "exit_s": round(exit_s, 3), "status": rc,
              "ok": ok, "qemu_start_s": qemu_s,
              "guest_main_s": round(first - qemu_s, 3) if first is not None and qemu_s is not None else None}
    if not ok:
        record["stdout"] = lines[-5:]
        record["stderr"] = b"".join(err).decode(errors="replace")[-1500:]
    return record


def qemu_child(pid: int) -> int | None:
    """The VM's QEMU among jvmkit's children: the one whose command line has -kernel (jvmkit also
    runs `qemu --version` and the like first); None while there is none."""
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    if b"-kernel" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                        return int(child)
                except OSError:
                    continue
    except OSError:
        pass
    return None


def _watch_child(proc: subprocess.Popen, t0: float, found: list[float]) -> None:
    """Note when jvmkit has started the VM's QEMU: polls its children every 5 ms."""
    while proc.poll() is None:
        if qemu_child(proc.pid) is not None:
            found.append(time.monotonic() - t0)
            return
        time.sleep(0.005)


def breakdown_once(image: Path, memory: str, env: dict, timeout: float = 600, app_args: tuple = ("bench",)) -> dict:
    """One `jvmkit run --verbose` boot, split into parts by when lines arrive on the host: QEMU
    started, the kernel's `Run /init` (and its own guest timestamp), init's `starting java`, the
    app's first line. The console is tailed every 0.1 s and verbose kernel logging slows the boot,
    so this explains where the time goes; it is not one of the measured samples."""
    argv = [*C.JVMKIT, "run", "--verbose", "--memory", memory, str(image), "--", *app_args]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, cwd=C.REPO)
    qemu_at: list[float] = []
    threading.Thread(target=_watch_child, args=(proc, t0, qemu_at), daemon=True).start()
    marks: dict = {}

    def read_err():
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            now = round(time.monotonic() - t0, 3)
            if "Run /init" in line and "kernel_run_init_s" not in marks:
                marks["kernel_run_init_s"] = now
                m = re.search(r"\[\s*([\d.]+)\]", line)
                if m:
                    marks["kernel_guest_clock_at_init_s"] = float(m.group(1))
            elif "starting java" in line and "init_starting_java_s" not in marks:
                marks["init_starting_java_s"] = now

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        for _raw in proc.stdout:
            marks.setdefault("main_s", round(time.monotonic() - t0, 3))
        proc.wait()
    finally:
        killer.cancel()
    reader.join(timeout=5)
    marks["exit_s"] = round(time.monotonic() - t0, 3)
    marks["qemu_start_s"] = round(qemu_at[0], 3) if qemu_at else None
    marks["status"] = proc.returncode
    if "main_s" in marks and "init_starting_java_s" in marks:
        marks["java_to_main_s"] = round(marks["main_s"] - marks["init_starting_java_s"], 3)
    return marks


def osv_available(env: dict) -> tuple[bool, str]:
    if os.environ.get("JVMKIT_OSV_KERNEL"):
        return True, f"JVMKIT_OSV_KERNEL={os.environ['JVMKIT_OSV_KERNEL']}"
    try:
        doc, _ = C.jvmkit_json(["kernel", "ls"], env, timeout=120)
    except Exception as exc:
        return False, f"jvmkit kernel ls failed: {exc}"
    osv = [k for k in doc.get("kernels", []) if k.get("target") == "osv"]
    if osv:
        return True, f"cached osv kernel {osv[0].get('version') or osv[0].get('id')}"
    return False, ("no OSv kernel: `jvmkit kernel ls --json` lists none and JVMKIT_OSV_KERNEL is not set "
                   "(GitHub release downloads are not reachable from this machine)")


def plot(result: dict, out: Path) -> dict:
    plt = C.pyplot()
    if plt is None:
        return C.plot_skipped()
    configs = result["configs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={'width_ratios': [3, 2]})
    labels = {"a": "(a) jvmkit\ntrimmed+CDS", "b": "(b) JDK as\ninstalled, no CDS",
              "b_jlink": "all modules\njlink, no CDS", "osv": "osv\ntrimmed+CDS",
              "multijar": "multijar\nlinux", "multijar_osv": "multijar\nosv"}
    rows = [(k, COMPARE_MEMORY, label) for k, label in labels.items() if f"{k}@{COMPARE_MEMORY}" in configs]
    width = 0.38
    for i, (kind, mem, label) in enumerate(rows):
        cfg = configs[f"{kind}@{mem}"]
        for j, (metric, color) in enumerate((("main_s", "tab:blue"), ("exit_s", "tab:orange"))):
            s = cfg[metric]
            x = i + (j - 0.5) * width
            if s["median"] is not None:
                left.bar(x, s["median"], width, color=color, alpha=0.7,
                         label=("first line (main)" if metric == "main_s" else "exit") if i == 0 else None)
                left.scatter([x] * len(s["samples"]), s["samples"], color="black", s=10, zorder=3)
        q = cfg["qemu_start_s"]["median"]
        if q is not None:
            left.bar(i - 0.5 * width, q, width, color="grey", alpha=0.8,
                     label="jvmkit before QEMU starts" if i == 0 else None)
    left.set_xticks(range(len(rows)), [r[2] for r in rows])
    left.set_ylabel("seconds from `jvmkit run` start")
    left.set_title(f"hello at {COMPARE_MEMORY} (median bars, samples as dots)")
    left.legend()
    xs = [_mib(m) for m in MEMORIES]
    for kind, style in (("a", "-"), ("osv", "--")):
        if f"{kind}@{MEMORIES[0]}" not in configs:
            continue
        for metric, color, label in (("main_s", "tab:blue", "first line (main)"), ("exit_s", "tab:orange", "exit")):
            meds = [configs[f"{kind}@{m}"][metric]["median"] for m in MEMORIES]
            right.plot(xs, meds, marker="o", color=color, linestyle=style,
                       label=f"{'linux' if kind == 'a' else 'osv'}: {label}")
            for x, m in zip(xs, MEMORIES):
                samples = configs[f"{kind}@{m}"][metric]["samples"]
                right.scatter([x] * len(samples), samples, color=color, s=8, alpha=0.5)
    right.set_xscale("log", base=2)
    right.set_xticks(xs, list(MEMORIES))
    right.set_ylim(bottom=0)
    right.set_xlabel("guest memory")
    right.set_ylabel("seconds")
    right.set_title("hello vs guest memory (linux solid, osv dashed)")
    right.legend()
    fig.suptitle(f"jvmkit boot benchmark (TCG, {result['machine'].get('cpus')} host cores, shared machine)")
    return C.save_figure(fig, out, "boot.png")


def _ratio(num: dict, den: dict) -> float | None:
    if num["median"] and den["median"]:
        return round(num["median"] / den["median"], 3)
    return None


def _mib(text: str) -> int:
    return int(text[:-1]) * (1024 if text.endswith("G") else 1)


# kind -> (sample, target, extra `pack` flags, app arguments, first-line prefix, description)
IMAGES = {
    "a": ("hello", "linux", [], ("bench",), "Hello",
          "jvmkit image: trimmed runtime (auto profile) + default CDS"),
    "b": ("hello", "linux", ["--profile", "jdk", "--jvm-arg=-Xshare:off"], ("bench",), "Hello",
          "the full JDK as installed, untrimmed (profile jdk), without CDS"),
    "b_jlink": ("hello", "linux", ["--profile", "full", "--jvm-arg=-Xshare:off"], ("bench",), "Hello",
                "every JDK module through jlink (debug info stripped, compressed), without CDS"),
    "osv": ("hello", "osv", [], ("bench",), "Hello", "OSv image: trimmed runtime + default CDS"),
    "multijar": ("multijar", "linux", [], (), "{", "multi-jar sample, jvmkit linux image"),
    "multijar_osv": ("multijar", "osv", [], (), "{", "multi-jar sample, jvmkit OSv image"),
}
OSV_KINDS = ("osv", "multijar_osv")


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="boots per configuration [5; --quick 3]")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)
    ws = C.Workspace("boot", args.cache, args.keep)
    try:
        env = ws.env()
        pull = C.ensure_linux_kernel(env)
        result: dict = {"benchmark": "boot", "quick": args.quick, "machine": C.machine(env),
                        "setup": {"cache": str(ws.cache), "kernel_pull": pull, "runs": runs,
                                  "compare_memory": COMPARE_MEMORY, "memories": list(MEMORIES),
                                  "apps": "samples/hello with argument 'bench'; samples/multijar without arguments",
                                  "images": {k: v[5] for k, v in IMAGES.items()},
                                  "measured": "wall-clock from starting `jvmkit run` (python -m jvmkit) to the "
                                              "app's first stdout line (main_s) and to the process's exit (exit_s)"}}
        jars = C.build_samples(ws.dir / "samples", ["hello", "multijar"])
        osv_ok, osv_reason = osv_available(env)
        osv_row: dict = {"available": osv_ok, "reason": osv_reason}
        images: dict[str, dict] = {}
        for kind, (sample, target, extra, _args, _expect, _what) in IMAGES.items():
            if target == "osv" and not osv_row["available"]:
                continue
            C.log(f"pack ({kind}) {sample} --target {target} {' '.join(extra)}")
            out = ws.dir / f"{kind}.jvmkit"
            try:
                doc, wall = C.jvmkit_json(["pack", jars[sample], "--target", target, "-o", out, "--force", *extra],
                                          env)
            except Exception as exc:
                if target != "osv":
                    raise
                osv_row.update(available=False, reason=f"pack --target osv failed: {exc}")
                continue
            jdk = doc["manifest"]["jdk"]
            images[kind] = {"path": out, "size": doc["size"], "module_count": len(doc["modules"]),
                            "runtime_size": jdk.get("runtime_size"), "cds": jdk.get("cds"),
                            "pack_flags": extra, "pack_wall_s": round(wall, 2),
                            "files": {k: {"size": v.get("size"), "raw_size": v.get("raw_size")}
                                      for k, v in doc["manifest"].get("files", {}).items()}}
        configs_order = ([(k, m) for k in MEMORY_KINDS if k in images for m in MEMORIES]
                         + [(k, COMPARE_MEMORY) for k in images if k not in MEMORY_KINDS])
        first_boot = {}
        for kind in images:
            C.log(f"first boot of ({kind}) (unpacks boot files; not counted)")
            first_boot[kind] = boot_once(images[kind]["path"], COMPARE_MEMORY, env, app_args=IMAGES[kind][3],
                                         expect=IMAGES[kind][4])
        breakdown = {}
        for kind in images:
            C.log(f"one --verbose boot of ({kind}) for the time breakdown (not counted)")
            breakdown[kind] = breakdown_once(images[kind]["path"], COMPARE_MEMORY, env, app_args=IMAGES[kind][3])
        samples: dict[str, list[dict]] = {f"{k}@{m}": [] for k, m in configs_order}
        for r in range(runs):
            # rotate the order each round so no configuration always follows the same one
            order = configs_order[r % len(configs_order):] + configs_order[:r % len(configs_order)]
            for kind, mem in order:
                rec = boot_once(images[kind]["path"], mem, env, app_args=IMAGES[kind][3], expect=IMAGES[kind][4])
                samples[f"{kind}@{mem}"].append(rec)
                C.log(f"round {r + 1}/{runs} ({kind}) {mem}: main {rec['main_s']} s, exit {rec['exit_s']} s"
                      + ("" if rec["ok"] else f"  FAILED status {rec['status']}"))
        configs = {}
        for key, recs in samples.items():
            good = [x for x in recs if x["ok"]]
            configs[key] = {"main_s": C.summary([x["main_s"] for x in good]),
                            "exit_s": C.summary([x["exit_s"] for x in good]),
                            "qemu_start_s": C.summary([x["qemu_start_s"] for x in good]),
                            "guest_main_s": C.summary([x["guest_main_s"] for x in good]),
                            "failures": [x for x in recs if not x["ok"]]}
        result["images"] = {k: {kk: (str(vv) if kk == "path" else vv) for kk, vv in v.items()}
                            for k, v in images.items()}
        result["first_boot"] = first_boot
        result["breakdown_verbose_boot"] = breakdown
        result["configs"] = configs

        def main_of(kind):
            return configs[f"{kind}@{COMPARE_MEMORY}"]["main_s"] if kind in images else {"median": None}

        for kind in OSV_KINDS:
            if kind in images:
                osv_row[kind] = {"main_s": main_of(kind), "exit_s": configs[f"{kind}@{COMPARE_MEMORY}"]["exit_s"],
                                 "image_size": images[kind]["size"]}
        osv_row["skipped"] = not any(k in images for k in OSV_KINDS)
        result["osv"] = osv_row

        a_main = main_of("a")["median"]
        b_main = main_of("b")["median"]
        speedup = round(b_main / a_main, 3) if a_main and b_main else None
        m256 = configs["a@256M"]["main_s"]["median"]
        m8g = configs["a@8G"]["main_s"]["median"]
        growth = round((m8g - m256) / m256, 4) if m256 and m8g else None
        size_a = images["a"]["size"]
        a_exit = configs[f"a@{COMPARE_MEMORY}"]["exit_s"]["median"]
        b_exit = configs[f"b@{COMPARE_MEMORY}"]["exit_s"]["median"]
        result["targets"] = {
            "main_speedup_a_vs_b": C.target(speedup, ">= 1.5 (median main_s of (b) / (a), at 1G)",
                                            speedup is not None and speedup >= 1.5,
                                            a_main_s=a_main, b_main_s=b_main,
                                            guest_only_speedup=_ratio(configs[f"b@{COMPARE_MEMORY}"]["guest_main_s"],
                                                                      configs[f"a@{COMPARE_MEMORY}"]["guest_main_s"]),
                                            exit_speedup=round(b_exit / a_exit, 3) if a_exit and b_exit else None,
                                            speedup_vs_b_jlink=_ratio(main_of("b_jlink"), main_of("a"))),
            "main_8g_vs_256m": C.target(growth, "<= +0.10 (relative change of median main_s, 8G vs 256M)",
                                        growth is not None and growth <= 0.10, main_256m_s=m256, main_8g_s=m8g,
                                        guest_main_256m_s=configs["a@256M"]["guest_main_s"]["median"],
                                        guest_main_8g_s=configs["a@8G"]["guest_main_s"]["median"]),
            "hello_image_size_bytes": C.target(size_a, "< 40 MB (40,000,000 bytes), kernel included",
                                               size_a < IMAGE_LIMIT, mib=round(size_a / C.MIB, 1),
                                               full_jdk_image_bytes=images["b"]["size"]),
        }
        if "osv" in images:
            o256, o16 = configs["osv@256M"]["main_s"]["median"], configs["osv@16G"]["main_s"]["median"]
            ogrowth = round((o16 - o256) / o256, 4) if o256 and o16 else None
            result["targets"]["osv_main_16g_vs_256m"] = C.target(
                ogrowth, "reported (the OSv paper's critics saw OSv's boot grow linearly with memory): relative "
                         "change of median main_s, 16G vs 256M", None,
                main_s={m: configs[f"osv@{m}"]["main_s"]["median"] for m in MEMORIES})
        a16 = configs["a@16G"]["main_s"]["median"]
        result["targets"]["main_16g_vs_256m"] = C.target(
            round((a16 - m256) / m256, 4) if a16 and m256 else None, "reported: linux, 16G vs 256M", None)
        for osv_kind, linux_kind in (("osv", "a"), ("multijar_osv", "multijar")):
            if osv_kind in images:
                ratio = _ratio(main_of(osv_kind), main_of(linux_kind))
                result["targets"][f"{osv_kind}_vs_linux_main"] = C.target(
                    ratio, "< 0.5 (median main_s of the OSv image / the linux image, at 1G; issue 4)",
                    ratio is not None and ratio < 0.5, osv_main_s=main_of(osv_kind)["median"],
                    linux_main_s=main_of(linux_kind)["median"], osv_image_bytes=images[osv_kind]["size"],
                    linux_image_bytes=images[linux_kind]["size"])
        result["plot"] = plot(result, args.out)
        C.finish("boot", result, args.out)
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
