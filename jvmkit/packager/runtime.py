"""The trimmed Java runtime: jlink over the build JDK's jmods, plus a default CDS archive.

A profile with `runtime = "copy"` (jdk-profiles/jdk.toml) instead copies the build JDK as it is
installed, untrimmed, with the CDS archive it ships: the baseline the trimmed runtimes are measured
against.

A runtime is keyed by the JDK's exact release, its location, the module set and the jlink options,
and cached under `runtimes/<key>/` (see jvmkit.cache), so a warm `pack` reuses it. The decisions
(which options, which key) are pure functions; `ensure_runtime` does the I/O.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jvmkit import cache, proc, ui
from jvmkit.errors import JvmkitError

RUNTIME_FORMAT = 1  # bump when the way runtimes are built changes

# Feature releases known to take -XX:ArchiveRelocationMode (a diagnostic flag since JDK 14); outside
# this range the JDK's own mapping is kept rather than risk "Unrecognized VM option" at boot.
FIXED_CDS_BASE_RELEASES = range(14, 26)
FIXED_CDS_BASE_FLAGS = ("-XX:+UnlockDiagnosticVMOptions", "-XX:ArchiveRelocationMode=0")


def cds_mapping_flags(jdk_release: int, has_archive: bool) -> list[str]:
    """JVM flags that map the CDS archive at the base address it was written for (pure).

    Since JDK 20 (and in 17.0.x updates) the JVM maps the archive at a random address by default
    and then patches every pointer in it. Under emulation (TCG) that costs ~0.7 s of a linux guest's
    start (each page of the archive is copied on write and rewritten) and ~0.2 s on OSv; under KVM
    tens of milliseconds. A jvmkit guest runs one application, OSv has no address randomisation to
    keep, and the kernel still randomises everything else in a linux guest, so jvmkit maps the
    archive where it was dumped; `--jvm-arg=-XX:ArchiveRelocationMode=1` (a later flag wins) brings
    the JDK's randomised mapping back.
    """
    if not has_archive or jdk_release not in FIXED_CDS_BASE_RELEASES:
        return []
    return list(FIXED_CDS_BASE_FLAGS)


@dataclass(frozen=True)
class RuntimeSpec:
    """What to build: pure data, hashed into the cache key."""

    jdk_home: str
    jdk_version: str          # the full release string, e.g. 17.0.15+6
    jdk_release: int          # the feature release, e.g. 17
    modules: tuple[str, ...]  # sorted; ("ALL-MODULE-PATH",) for every module
    compress: str             # "zip" or "none"
    strip_debug: bool
    cds: bool = True
    copy: bool = False        # copy the JDK as installed instead of running jlink

    def key(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if k != "copy" or v}  # keeps older keys stable
        payload = json.dumps({"format": RUNTIME_FORMAT, **fields}, sort_keys=True)
        return f"jdk{self.jdk_release}-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Runtime:
    path: Path
    spec: RuntimeSpec
    modules: tuple[str, ...]  # the modules actually in the runtime (from its `release` file)
    size: int
    cds_archive: str | None   # relative path of the default CDS archive, if any
    built_now: bool


def jlink_args(spec: RuntimeSpec, jmods: Path | None, output: Path) -> list[str]:
    """The jlink argument list for a spec (pure)."""
    if spec.jdk_release >= 21:
        compress = "zip-6" if spec.compress == "zip" else "zip-0"
    else:
        compress = "2" if spec.compress == "zip" else "0"
    args = ["--module-path", str(jmods)] if jmods else []  # JDK 24+ may link from its own image
    args += [
        "--add-modules", ",".join(spec.modules),
        "--output", str(output),
        "--no-header-files",
        "--no-man-pages",
        f"--compress={compress}",
    ]
    if spec.strip_debug:
        args.append("--strip-debug")
    return args


def explain_jlink_failure(output: str) -> str:
    """Turn jlink's output into one line for the user (pure)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Error:"):
            return line[len("Error:"):].strip()
    for line in lines:
        if "Exception" in line or "error" in line.lower():
            return line
    return lines[-1] if lines else "jlink failed without a message"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _read_release_modules(runtime: Path) -> tuple[str, ...]:
    try:
        for line in (runtime / "release").read_text().splitlines():
            if line.startswith("MODULES="):
                return tuple(sorted(line.split("=", 1)[1].strip().strip('"').split()))
    except OSError:
        pass
    return ()


def _run(cmd: list[str], what: str) -> proc.CompletedProcess:
    return proc.run(cmd, what=what, check=False, merge_stderr=True, timeout=1800)


def _copy_jdk(spec: RuntimeSpec, dest: Path) -> None:
    """Copy the JDK home as installed: links followed, dangling ones (Debian's lib/src.zip) left out."""
    with ui.current().step(f"copy: the whole JDK {spec.jdk_version} from {spec.jdk_home} (untrimmed)"):
        try:
            shutil.copytree(spec.jdk_home, dest / "runtime", symlinks=False, ignore_dangling_symlinks=True)
        except shutil.Error as exc:
            raise JvmkitError(f"copying the JDK {spec.jdk_home} failed: {exc.args[0][0][2]}") from None


def _build(spec: RuntimeSpec, jlink: Path, jmods: Path, dest: Path) -> None:
    console = ui.current()
    out = dest / "runtime"
    if spec.copy:
        _copy_jdk(spec, dest)
        return
    # The runtime's modules are the roots given to --add-modules plus all they require: say both,
    # as the pack summary counts the runtime's (runtime_modules=).
    roots = ("all modules" if spec.modules == ("ALL-MODULE-PATH",)
             else plural(len(spec.modules), "root module"))
    started = time.monotonic()
    console.info(f"  jlink: {roots} from JDK {spec.jdk_version} ...")
    done = _run([str(jlink), *jlink_args(spec, jmods, out)], "jlink")
    if done.returncode != 0:
        if "No space left" in done.stdout:
            raise JvmkitError(f"no space left on the device that holds {dest}",
                              hint="free space, or point JVMKIT_CACHE at a larger disk")
        if 'Cannot run program "objcopy"' in done.stdout:  # --strip-debug runs binutils' objcopy
            raise JvmkitError("jlink --strip-debug needs objcopy, which is not installed",
                              hint="apt-get install -y binutils")
        raise JvmkitError(f"jlink failed: {explain_jlink_failure(done.stdout)}")
    console.info(f"  jlink: {roots} -> {len(_read_release_modules(out))} in the runtime, "
                 f"done in {time.monotonic() - started:.1f}s")
    if spec.cds:
        java = out / "bin" / "java"
        with console.step("CDS: default class data sharing archive"):
            done = _run([str(java), "-Xshare:dump", "-XX:+UseG1GC"], "java -Xshare:dump")
        if done.returncode != 0:
            raise JvmkitError(f"creating the CDS archive failed: {explain_jlink_failure(done.stdout)}")


def ensure_runtime(spec: RuntimeSpec, jlink: Path, jmods: Path) -> Runtime:
    """Return the cached runtime for `spec`, building it (jlink + CDS) if needed."""
    try:
        entry, built = cache.ensure_entry("runtimes", spec.key(), lambda tmp: _build(spec, jlink, jmods, tmp),
                                          jdk=spec.jdk_version, modules=list(spec.modules))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise JvmkitError(f"no space left on the device that holds {cache.cache_root()}",
                              hint="free space, or point JVMKIT_CACHE at a larger disk") from None
        raise
    path = entry / "runtime"
    jsa = next(iter(sorted(path.glob("lib/server/*.jsa"))), None)
    return Runtime(
        path=path,
        spec=spec,
        modules=_read_release_modules(path) or spec.modules,
        size=cache.dir_size(path),
        cds_archive=str(jsa.relative_to(path)) if jsa else None,
        built_now=built,
    )


def runtime_exists(path: Path) -> bool:
    return os.access(path / "bin" / "java", os.X_OK)
