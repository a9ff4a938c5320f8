"""Benchmark `jvmkit pack` (issue 2): cold and warm pack times, trimmed runtime size, module counts.

    python3 benchmarks/pack.py [--quick] [--out DIR] [--cache DIR]

For the samples hello and multijar (`--target linux`):
* cold: the runtime and agent caches are empty (jlink + CDS + agent build happen); the kernel cache
  is pre-seeded so the network is not measured. Cold packs always run in a scratch JVMKIT_CACHE
  (its runtimes/ and agents/ are wiped before each cold pack); its kernels/ are hard-linked from
  `--cache DIR` when given, else pulled once with `jvmkit kernel pull linux` (timed, not counted).
* warm: re-pack after changing only the app jar (a resource inside it changes each time, so the jar's
  digest and the image change), the runtime and agent reused. The target excludes the image writer's
  compression: warm time = wall-clock of the `jvmkit pack` process − `timings.image`.
Also: the hello and multijar runtimes against the build JDK's directory and the `--profile full`
runtime, module counts, and how much of the image step is spent compressing the (unchanging) kernel.
Targets (issue 2): hello runtime ≤ 20% of the full JDK's size on disk; warm re-pack < 1 s excluding
the image writer's compression. Prints one JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

SAMPLES = ("hello", "multijar")
STAMP = "META-INF/jvmkit-bench-stamp.txt"


def restamp_jar(jar: Path, stamp: str) -> None:
    """Rewrite `jar` with one resource changed (the rest byte-identical): 'only the app jar changed'."""
    tmp = jar.with_name(jar.name + ".tmp")
    with zipfile.ZipFile(jar) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            if info.filename != STAMP:
                dst.writestr(info, src.read(info.filename))
        info = zipfile.ZipInfo(STAMP, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o100644 << 16
        dst.writestr(info, f"bench stamp {stamp}\n".encode())
    tmp.replace(jar)


def pack_once(jar: Path, out: Path, env: dict, *extra: str) -> dict:
    doc, wall = C.jvmkit_json(["pack", jar, "--target", "linux", "-o", out, "--force", *extra], env)
    timings = doc.get("timings", {})
    image = timings.get("image", 0.0)
    return {"wall_s": round(wall, 3), "in_process_s": doc.get("seconds"), "timings": timings,
            "wall_excl_image_s": round(wall - image, 3), "size": doc.get("size"),
            "runtime_built": doc.get("runtime_built"), "modules": doc.get("modules", []),
            "runtime_size": doc.get("manifest", {}).get("jdk", {}).get("runtime_size"),
            "runtime_key": doc.get("manifest", {}).get("jdk", {}).get("runtime_key")}


def wipe(cache: Path, *kinds: str) -> None:
    for kind in kinds:
        shutil.rmtree(cache / kind, ignore_errors=True)


def kernel_compress_seconds(env: dict) -> dict | None:
    """How long zstd-compressing the cached vmlinux takes (what every pack repeats for a file that
    never changes), measured in-process with jvmkit's own compress_file."""
    try:
        from jvmkit.packager import zstd

        kernels = C.linux_kernels(env)
        vmlinux = Path(kernels[0]["path"]) / "vmlinux"
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            record = zstd.compress_file(vmlinux, Path(tmp), "vmlinux.zst")
            seconds = time.monotonic() - t0
        return {"seconds": round(seconds, 3), "raw_size": record.raw_size, "compressed_size": record.size,
                "level": zstd.ZSTD_LEVEL}
    except Exception as exc:  # informative only
        return {"error": f"{type(exc).__name__}: {exc}"}


def plot(result: dict, out: Path) -> dict:
    plt = C.pyplot()
    if plt is None:
        return C.plot_skipped()
    sizes, samples = result["sizes"], result["samples"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    bars = [("build JDK\n(directory)", sizes["build_jdk"]["size"]),
            ("build JDK\nwithout jmods", sizes["build_jdk"]["size_without_jmods"]),
            ("--profile full\nruntime", sizes["full_profile_runtime"]["size"]),
            ("multijar\nruntime", sizes["multijar_runtime"]), ("hello\nruntime", sizes["hello_runtime"])]
    bars = [(label, v) for label, v in bars if v]
    left.bar(range(len(bars)), [v / C.MIB for _, v in bars], color=["grey", "silver", "tab:purple", "tab:blue",
                                                                      "tab:green"][:len(bars)])
    if sizes["build_jdk"]["size"]:
        left.axhline(0.2 * sizes["build_jdk"]["size"] / C.MIB, color="red", linestyle="--",
                     label="target: 20% of the build JDK")
        left.legend()
    left.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    left.set_ylabel("MiB on disk")
    left.set_title("runtime size")
    names = list(samples)
    width = 0.2
    for j, (kind, metric, color, label) in enumerate((
            ("cold", "wall_s", "tab:red", "cold (wall)"), ("warm", "wall_s", "tab:orange", "warm (wall)"),
            ("warm", "wall_excl_image_s", "tab:green", "warm excl. image step"))):
        for i, name in enumerate(names):
            s = samples[name][kind][metric]
            x = i + (j - 1) * width
            right.bar(x, s["median"], width, color=color, alpha=0.75, label=label if i == 0 else None)
            right.scatter([x] * len(s["samples"]), s["samples"], color="black", s=8, zorder=3)
    right.axhline(1.0, color="red", linestyle="--", label="target: warm < 1 s excl. image")
    right.set_xticks(range(len(names)), names)
    right.set_ylabel("seconds (median bars, samples as dots)")
    right.set_title("jvmkit pack --target linux")
    right.legend(fontsize=8)
    fig.suptitle(f"jvmkit pack benchmark ({result['machine'].get('cpus')} host cores, shared machine)")
    return C.save_figure(fig, out, "pack.png")


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cold", type=int, default=None, help="cold packs per sample [3; --quick 1]")
    parser.add_argument("--warm", type=int, default=None, help="warm re-packs per sample [5; --quick 3]")
    args = parser.parse_args(argv)
    n_cold = args.cold or (1 if args.quick else 3)
    n_warm = args.warm or (3 if args.quick else 5)
    ws = C.Workspace("pack", args.cache, args.keep)
    try:
        # Cold packs need empty runtime/agent caches: always a scratch cache, never the user's.
        scratch = ws.dir / "cold-cache"
        scratch.mkdir()
        env = ws.env(scratch)
        seeded = bool(ws.user_cache) and C.seed_kernels(ws.user_cache, scratch)
        pull = C.ensure_linux_kernel(env)
        result: dict = {"benchmark": "pack", "quick": args.quick, "machine": C.machine(env),
                        "setup": {"cache": "scratch JVMKIT_CACHE; runtimes/ and agents/ wiped before each cold pack",
                                  "kernels_seeded_from": str(ws.user_cache) if seeded else None,
                                  "kernel_pull": pull, "cold_runs": n_cold, "warm_runs": n_warm}}
        from jvmkit import jdk as jdks

        jdk = jdks.find_jdk(None)
        jars = C.build_samples(ws.dir / "samples", list(SAMPLES))
        samples: dict = {}
        for name in SAMPLES:
            jar = jars[name]
            image = ws.dir / f"{name}.jvmkit"
            cold = []
            for i in range(n_cold):
                wipe(scratch, "runtimes", "agents")
                C.log(f"{name}: cold pack {i + 1}/{n_cold}")
                run = pack_once(jar, image, env)
                if not run["runtime_built"]:
                    raise RuntimeError(f"{name}: a cold pack reused a runtime")
                cold.append(run)
            warm = []
            for i in range(n_warm):
                restamp_jar(jar, f"{name}-{i}-{time.time_ns()}")
                C.log(f"{name}: warm re-pack {i + 1}/{n_warm} (app jar changed)")
                run = pack_once(jar, image, env)
                if run["runtime_built"]:
                    raise RuntimeError(f"{name}: a warm pack rebuilt the runtime")
                warm.append(run)
            last = warm[-1] if warm else cold[-1]
            samples[name] = {
                "modules": last["modules"], "module_count": len(last["modules"]),
                "runtime_size": last["runtime_size"], "image_size": last["size"],
                "cold": {"wall_s": C.summary([r["wall_s"] for r in cold]),
                         "wall_excl_image_s": C.summary([r["wall_excl_image_s"] for r in cold]),
                         "timings": {k: C.summary([r["timings"].get(k) for r in cold]) for k in cold[0]["timings"]},
                         "runs": cold},
                "warm": {"wall_s": C.summary([r["wall_s"] for r in warm]),
                         "wall_excl_image_s": C.summary([r["wall_excl_image_s"] for r in warm]),
                         "in_process_excl_image_s": C.summary([r["in_process_s"] - r["timings"].get("image", 0)
                                                               for r in warm]),
                         "process_overhead_s": C.summary([r["wall_s"] - r["in_process_s"] for r in warm]),
                         "timings": {k: C.summary([r["timings"].get(k) for r in warm]) for k in warm[0]["timings"]},
                         "runs": warm},
            }
        # The full profile: every JDK module (still jlinked with strip-debug + compression, + CDS).
        C.log("full profile: pack hello --profile full (cold jlink of every module)")
        full = pack_once(jars["hello"], ws.dir / "hello-full.jvmkit", env, "--profile", "full")
        jmods_count = len(list(jdk.jmods.glob("*.jmod"))) if jdk.jmods else None
        jdk_size = C.du_size(jdk.home)
        jmods_size = C.du_size(jdk.jmods) if jdk.jmods else None
        hello_rt = samples["hello"]["runtime_size"]
        sizes = {
            "build_jdk": {"home": str(jdk.home), "version": jdk.version, "size": jdk_size,
                          "jmods_size": jmods_size,
                          "size_without_jmods": jdk_size - jmods_size if jdk_size and jmods_size else None,
                          "jmod_count": jmods_count},
            "full_profile_runtime": {"size": full["runtime_size"], "module_count": len(full["modules"]),
                                     "image_size": full["size"], "pack_wall_s": full["wall_s"],
                                     "timings": full["timings"]},
            "hello_runtime": hello_rt, "multijar_runtime": samples["multijar"]["runtime_size"],
            "hello_vs_build_jdk": round(hello_rt / jdk_size, 4) if jdk_size else None,
            "hello_vs_build_jdk_without_jmods": (round(hello_rt / (jdk_size - jmods_size), 4)
                                                 if jdk_size and jmods_size else None),
            "hello_vs_full_profile_runtime": round(hello_rt / full["runtime_size"], 4),
            "multijar_vs_build_jdk": round(samples["multijar"]["runtime_size"] / jdk_size, 4) if jdk_size else None,
        }
        result["samples"] = samples
        result["sizes"] = sizes
        result["image_step"] = {"kernel_compress": kernel_compress_seconds(env),
                                "note": "timings.image = initramfs cpio+zstd (runtime included) + kernel zstd, "
                                        "redone on every pack"}
        warm_hello = samples["hello"]["warm"]["wall_excl_image_s"]["median"]
        warm_multi = samples["multijar"]["warm"]["wall_excl_image_s"]["median"]
        ratio = sizes["hello_vs_build_jdk"]
        result["targets"] = {
            "hello_runtime_vs_full_jdk": C.target(ratio, "<= 0.20 of the build JDK directory (du -sb)",
                                                  ratio is not None and ratio <= 0.20,
                                                  vs_jdk_without_jmods=sizes["hello_vs_build_jdk_without_jmods"],
                                                  vs_full_profile_runtime=sizes["hello_vs_full_profile_runtime"]),
            "warm_repack_hello_s": C.target(warm_hello, "< 1 s wall-clock excluding timings.image",
                                            warm_hello < 1.0),
            "warm_repack_multijar_s": C.target(warm_multi, "< 1 s wall-clock excluding timings.image",
                                               warm_multi < 1.0),
        }
        result["plot"] = plot(result, args.out)
        C.finish("pack", result, args.out)
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
