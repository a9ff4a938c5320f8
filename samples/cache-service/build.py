"""Build the balloon showcase: samples/cache-service → cache-service.jar, deterministically.

    python3 samples/cache-service/build.py OUT_DIR [--javac PATH]

writes OUT_DIR/cache-service.jar (Main-Class io.jvmkit.samples.cache.CacheService) and copies
jvmkit's guest agent jars beside it: OUT_DIR/shrinker-api.jar (the io.jvmkit Shrinker API the
sample is compiled against) and OUT_DIR/agent.jar (the whole guest agent). Both come from jvmkit's
own agent build (jvmkit.balloon.agent_build, cached under $JVMKIT_CACHE), so the sample always
compiles against the API that jvmkit puts in its images. Importable too:
`build_cache_service(out_dir, javac=None)` returns {"jar": ..., "api_jar": ..., "agent_jar": ...}.

cache-service.jar does not contain the API classes and has no Class-Path: in a jvmkit image the
agent (on the system class path through -javaagent) provides them. On the host, run it with
either of
    java -javaagent:OUT_DIR/agent.jar -jar OUT_DIR/cache-service.jar --port 8080
    java -cp OUT_DIR/cache-service.jar:OUT_DIR/shrinker-api.jar io.jvmkit.samples.cache.CacheService
(with plain `java -jar` the service runs too, without a shrinker hook).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MAIN_CLASS = "io.jvmkit.samples.cache.CacheService"
JAVA_RELEASE = 17  # the Shrinker API uses records; jvmkit's agent needs 17 too

try:  # jvmkit installed (or run from a checkout: fall back to the repo's own package)
    from jvmkit.balloon import agent_build
except ImportError:  # pragma: no cover - depends on how the sample is run
    sys.path.insert(0, str(REPO))
    from jvmkit.balloon import agent_build


class BuildError(Exception):
    """javac is missing or failed."""


def find_javac(javac: str | os.PathLike | None = None) -> Path:
    if javac:
        return Path(javac)
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "javac").is_file():
        return Path(home) / "bin" / "javac"
    found = shutil.which("javac")
    if not found:
        raise BuildError("javac not found: pass --javac, set JAVA_HOME, or install a JDK (openjdk-17-jdk-headless)")
    return Path(found)


def javac_release(javac: Path) -> int:
    try:
        out = subprocess.run([str(javac), "-version"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise BuildError(f"cannot run {javac}") from None
    m = re.search(r"javac (\d+)", out.stdout + out.stderr)
    if not m:
        raise BuildError(f"cannot tell the release of {javac}: {(out.stdout + out.stderr).strip()!r}")
    return int(m.group(1))


def build_cache_service(out_dir: str | os.PathLike, javac: str | os.PathLike | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    javac_path = find_javac(javac)
    release = javac_release(javac_path)
    if release < JAVA_RELEASE:
        raise BuildError(f"{javac_path} is Java {release}; the cache-service sample needs Java {JAVA_RELEASE}+")
    agent = agent_build.build_agent(javac_path, release)
    api_jar, agent_jar = out / "shrinker-api.jar", out / "agent.jar"
    shutil.copyfile(agent.api_jar, api_jar)
    shutil.copyfile(agent.agent_jar, agent_jar)

    sources = sorted((HERE / "src").rglob("*.java"), key=lambda p: p.relative_to(HERE).as_posix())
    with tempfile.TemporaryDirectory(prefix="cache-service-") as tmp:
        classes = Path(tmp) / "classes"
        argv = [str(javac_path), "--release", str(JAVA_RELEASE), "-encoding", "UTF-8", "-g:source,lines",
                "-implicit:none", "-cp", str(api_jar), "-d", str(classes), *map(str, sources)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise BuildError(f"javac failed:\n{proc.stdout}{proc.stderr}")
        manifest = ("Manifest-Version: 1.0\r\nCreated-By: jvmkit samples\r\n"
                    f"Main-Class: {MAIN_CLASS}\r\n\r\n")
        jar = out / "cache-service.jar"
        agent_build.write_jar(jar, manifest, classes, lambda rel: True)
    return {"jar": jar, "api_jar": api_jar, "agent_jar": agent_jar}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--javac", help="javac to use [default: $JAVA_HOME/bin/javac, else javac on PATH]")
    args = parser.parse_args(argv)
    try:
        built = build_cache_service(args.out_dir, args.javac)
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    for name, path in built.items():
        print(f"{name:<10} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
