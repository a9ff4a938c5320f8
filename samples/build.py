"""Build jvmkit's sample apps from source into jars, deterministically.

    python3 samples/build.py OUT_DIR [--javac PATH]

writes OUT_DIR/hello.jar, OUT_DIR/httpd.jar, OUT_DIR/phases.jar, OUT_DIR/warmstart.jar, OUT_DIR/netprobe.jar (a guest
that tries TCP connects and floods its console: the isolation tests), OUT_DIR/multijar/app.jar and
OUT_DIR/multijar/lib/{textutil,jsonish}.jar. Importable too: `build_samples(out_dir, javac=None)`
returns {"hello": ..., "httpd": ..., "netprobe": ..., ...}, the path of each sample's main jar.

The sources are compiled with the build JDK's javac (`--javac`, else $JAVA_HOME/bin/javac, else
`javac` on PATH) for `--release 11`, so the jars run on any JDK from 11 on. The jars are written
with Python's zipfile: the manifest first, then entries in sorted order, fixed timestamps and modes,
so the same sources and javac give the same bytes. No built jar is ever committed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent
JAVA_RELEASE = "11"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest timestamp a zip entry can hold


@dataclass(frozen=True)
class JarSpec:
    """One jar to build: sources and resources (relative to samples/), where it goes (relative
    to OUT_DIR), its Main-Class and its manifest Class-Path (relative to the jar; the same jars
    are the compile class path)."""

    out: str
    sources: str
    main: str | None = None
    class_path: tuple[str, ...] = ()
    resources: str | None = None


# Per sample, its jars in build order; the last one is the sample's main jar.
SAMPLES: dict[str, tuple[JarSpec, ...]] = {
    "hello": (JarSpec("hello.jar", "hello/src", main="hello.Hello"),),
    "httpd": (JarSpec("httpd.jar", "httpd/src", main="httpd.Httpd"),),
    "phases": (JarSpec("phases.jar", "phases/src", main="phases.Phases"),),
    "netprobe": (JarSpec("netprobe.jar", "netprobe/src", main="netprobe.NetProbe"),),
    "warmstart": (JarSpec("warmstart.jar", "warmstart/src", main="warmstart.Warmstart"),),
    "multijar": (
        JarSpec("multijar/lib/textutil.jar", "multijar/textutil/src"),
        JarSpec("multijar/lib/jsonish.jar", "multijar/jsonish/src"),
        JarSpec("multijar/app.jar", "multijar/app/src", main="multijar.App",
                class_path=("lib/textutil.jar", "lib/jsonish.jar"), resources="multijar/app/resources"),
    ),
}


class BuildError(Exception):
    """A sample failed to build (javac missing or failing)."""


def find_javac(javac: str | os.PathLike | None = None) -> Path:
    """The javac to use: the one given, else $JAVA_HOME/bin/javac, else `javac` on PATH."""
    if javac:
        path = Path(javac)
        if not path.is_file():
            raise BuildError(f"javac {path} does not exist")
        return path
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "javac").is_file():
        return Path(home) / "bin" / "javac"
    found = shutil.which("javac")
    if not found:
        raise BuildError("no javac found: install a JDK (e.g. apt-get install openjdk-17-jdk-headless), "
                         "set JAVA_HOME, or pass --javac PATH")
    return Path(found).resolve()


def manifest_bytes(attributes: dict[str, str]) -> bytes:
    """A jar manifest main section: `Name: value` lines of at most 72 bytes, longer ones continued
    on lines that start with a space, CRLF line ends, a blank line at the end."""
    out = bytearray()
    for name, value in attributes.items():
        line = f"{name}: {value}".encode("utf-8")
        limit = 72
        while len(line) > limit:
            cut = limit
            while cut > 0 and (line[cut] & 0xC0) == 0x80:  # never split a UTF-8 sequence
                cut -= 1
            out += line[:cut] + b"\r\n"
            line = b" " + line[cut:]
        out += line + b"\r\n"
    return bytes(out + b"\r\n")


def _zip_info(name: str, *, directory: bool = False) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.create_system = 3  # Unix, so the modes below mean what they say
    if directory:
        info.external_attr = (0o40755 << 16) | 0x10
        info.compress_type = zipfile.ZIP_STORED
    else:
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


def write_jar(path: Path, trees: list[Path], attributes: dict[str, str]) -> Path:
    """Write a jar of every file under `trees` (later trees win on clashes), deterministically."""
    files: dict[str, Path] = {}
    for tree in trees:
        for file in tree.rglob("*"):
            if file.is_file():
                files[file.relative_to(tree).as_posix()] = file
    dirs = {"/".join(name.split("/")[:i]) + "/" for name in files for i in range(1, name.count("/") + 1)}
    names = sorted(set(files) | dirs - {"META-INF/"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w") as jar:
        jar.writestr(_zip_info("META-INF/", directory=True), b"")
        jar.writestr(_zip_info("META-INF/MANIFEST.MF"), manifest_bytes(attributes), compresslevel=9)
        for name in names:
            if name == "META-INF/MANIFEST.MF":
                continue
            if name.endswith("/"):
                jar.writestr(_zip_info(name, directory=True), b"")
            else:
                jar.writestr(_zip_info(name), files[name].read_bytes(), compresslevel=9)
    os.replace(tmp, path)
    return path


def _build_jar(spec: JarSpec, out_dir: Path, javac: Path, work: Path) -> Path:
    sources = sorted((SAMPLES_DIR / spec.sources).rglob("*.java"))
    if not sources:
        raise BuildError(f"no Java sources under {SAMPLES_DIR / spec.sources}")
    jar_path = out_dir / spec.out
    classes = work / spec.out.replace("/", "_")
    classes.mkdir(parents=True)
    cmd = [str(javac), "--release", JAVA_RELEASE, "-encoding", "UTF-8", "-nowarn", "-implicit:none",
           "-d", str(classes)]
    if spec.class_path:
        cmd += ["-cp", os.pathsep.join(str(jar_path.parent / entry) for entry in spec.class_path)]
    cmd += [str(s) for s in sources]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"javac failed for {spec.out}:\n{proc.stdout}{proc.stderr}")
    attributes = {"Manifest-Version": "1.0", "Created-By": "jvmkit samples/build.py"}
    if spec.main:
        attributes["Main-Class"] = spec.main
    if spec.class_path:
        attributes["Class-Path"] = " ".join(spec.class_path)
    trees = [classes] + ([SAMPLES_DIR / spec.resources] if spec.resources else [])
    return write_jar(jar_path, trees, attributes)


def build_samples(out_dir: str | os.PathLike, javac: str | os.PathLike | None = None,
                  names: list[str] | None = None) -> dict[str, Path]:
    """Build the samples (all, or `names`) into `out_dir`; returns {name: main jar path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    javac_path = find_javac(javac)
    chosen = list(SAMPLES) if names is None else names
    unknown = [n for n in chosen if n not in SAMPLES]
    if unknown:
        raise BuildError(f"unknown sample(s) {', '.join(unknown)}; the samples are {', '.join(SAMPLES)}")
    pending = [spec for name in chosen for spec in SAMPLES[name]]
    built: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="jvmkit-samples-") as tmp, ThreadPoolExecutor(4) as pool:
        while pending:  # waves: every jar whose class-path jars are built, compiled in parallel
            ready = [s for s in pending
                     if all(str(Path(s.out).parent / e) in built for e in s.class_path)]
            if not ready:
                raise BuildError(f"unbuildable jars (class path never built): {[s.out for s in pending]}")
            for spec, _ in zip(ready, pool.map(lambda s: _build_jar(s, out_dir, javac_path, Path(tmp)), ready)):
                built.add(str(Path(spec.out)))
            pending = [s for s in pending if s not in ready]
    return {name: out_dir / SAMPLES[name][-1].out for name in chosen}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build jvmkit's sample jars into OUT_DIR.")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--javac", help="javac to use [default: $JAVA_HOME/bin/javac, else javac on PATH]")
    parser.add_argument("names", nargs="*", metavar="SAMPLE", help=f"samples to build [default: all of {', '.join(SAMPLES)}]")
    args = parser.parse_intermixed_args(argv)
    try:
        jars = build_samples(args.out_dir, args.javac, args.names or None)
    except BuildError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    for name, jar in jars.items():
        print(f"{name}\t{jar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
