"""Compiling the guest agent with the build JDK, cached.

Owns turning the Java sources under `jvmkit/balloon/guest/src/` (shipped inside the wheel) into two
jars, built once per (sources, Java release, format) and kept in the cache under `agents/<key>/`:

- `agent.jar`: the whole agent (`-javaagent:`; Premain-Class/Agent-Class io.jvmkit.agent.Agent),
  which also holds `io.jvmkit.agent.Launcher` and the Shrinker API;
- `shrinker-api.jar`: only the `io.jvmkit` package (Shrinker, ShrinkHook), for apps to compile
  against.

The sources are compiled with `javac --release N` (N = the runtime's Java release, at least 17)
and `--limit-modules AGENT_MODULES`, so the agent provably needs no module beyond those the
trimmed runtime adds for it. The jars are written with zipfile, entries sorted, stored
(uncompressed: no dependence on the zlib build), fixed timestamps and modes: the same sources and
javac give the same bytes.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jvmkit import proc
from jvmkit.cache import ensure_entry
from jvmkit.errors import JvmkitError

# Bump when the jar layout, manifest or compiler options change (it is part of the cache key).
FORMAT_VERSION = 1
MIN_RELEASE = 17

# The modules the trimmed runtime must contain for the agent (jlink adds what they require, e.g.
# java.rmi and java.naming for java.management.rmi). java.instrument is what -javaagent itself
# needs; jdk.management provides HotSpotDiagnosticMXBean and the DiagnosticCommand MBean.
AGENT_MODULES = ("java.base", "java.instrument", "java.management", "java.management.rmi", "jdk.management")

AGENT_MAIN = "io.jvmkit.agent.Agent"
LAUNCHER_MAIN = "io.jvmkit.agent.Launcher"
WARMUP_MAIN = "io.jvmkit.agent.Warmup"  # an empty main: the Launcher's path with no app code
API_PACKAGE = "io/jvmkit/"

SOURCE_ROOT = Path(__file__).resolve().parent / "guest" / "src"

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o644
_DIR_MODE = 0o755

_AGENT_MANIFEST = (
    "Manifest-Version: 1.0\r\n"
    "Created-By: jvmkit\r\n"
    f"Premain-Class: {AGENT_MAIN}\r\n"
    f"Agent-Class: {AGENT_MAIN}\r\n"
    "Implementation-Title: jvmkit guest agent\r\n"
    "\r\n"
)
_API_MANIFEST = (
    "Manifest-Version: 1.0\r\n"
    "Created-By: jvmkit\r\n"
    "Automatic-Module-Name: io.jvmkit.shrinker\r\n"
    "Implementation-Title: jvmkit Shrinker API\r\n"
    "\r\n"
)


@dataclass(frozen=True)
class AgentJars:
    agent_jar: Path
    api_jar: Path
    key: str


def source_files(root: Path = SOURCE_ROOT) -> list[Path]:
    """The agent's .java files, in a fixed order."""
    files = sorted(root.rglob("*.java"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise JvmkitError(f"the guest agent sources are missing under {root} (a broken jvmkit install?)")
    return files


def agent_key(release: int, root: Path = SOURCE_ROOT) -> str:
    """The cache key: a hash of the sources, the Java release and FORMAT_VERSION."""
    digest = hashlib.sha256()
    digest.update(f"jvmkit-agent format={FORMAT_VERSION} release={release}\n".encode())
    for path in source_files(root):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()} {len(data)}\n".encode())
        digest.update(data)
    return f"agent-{release}-{digest.hexdigest()[:20]}"


def build_agent(javac: Path, release: int) -> AgentJars:
    """Compile and package the guest agent for Java `release` with `javac`, or reuse the cached jars."""
    if release < MIN_RELEASE:
        raise JvmkitError(f"the guest agent needs Java {MIN_RELEASE} or newer; the runtime is Java {release}")
    key = agent_key(release)

    def build(tmp: Path) -> None:
        classes = tmp / "classes"
        _compile(Path(javac), release, classes)
        write_jar(tmp / "agent.jar", _AGENT_MANIFEST, classes, lambda rel: True)
        write_jar(tmp / "shrinker-api.jar", _API_MANIFEST, classes, _is_api_class)
        shutil.rmtree(classes)  # the jars are all the entry keeps

    entry, _ = ensure_entry("agents", key, build, release=release)
    return AgentJars(agent_jar=entry / "agent.jar", api_jar=entry / "shrinker-api.jar", key=key)


def _is_api_class(rel: str) -> bool:
    return rel.startswith(API_PACKAGE) and "/" not in rel[len(API_PACKAGE):]


def _compile(javac: Path, release: int, out: Path) -> None:
    sources = source_files()
    out.mkdir(parents=True)
    argv = [
        str(javac),
        "--release", str(release),
        "--limit-modules", ",".join(AGENT_MODULES),
        "-encoding", "UTF-8",
        "-g:source,lines",
        "-nowarn",
        "-d", str(out),
        *(str(p) for p in sources),
    ]
    done = proc.run(argv, what=f"javac ({javac}) compiling the guest agent", timeout=300, check=False,
                    hint="point --jdk or JAVA_HOME at a full JDK")
    if done.returncode != 0:
        lines = [l.strip() for l in (done.stderr + done.stdout).splitlines() if l.strip()]
        first = next((l for l in lines if "error" in l.lower()), lines[0] if lines else "no output")
        raise JvmkitError(
            f"compiling the guest agent with {javac} --release {release} failed: {first}"
        )


def write_jar(jar: Path, manifest: str, classes: Path, include) -> None:
    """A deterministic jar: META-INF/ and the manifest first, then directories and files sorted."""
    files = sorted(
        p.relative_to(classes).as_posix() for p in classes.rglob("*") if p.is_file()
    )
    files = [f for f in files if include(f)]
    dirs = sorted({"/".join(f.split("/")[:i]) + "/" for f in files for i in range(1, f.count("/") + 1)})
    with zipfile.ZipFile(jar, "w", compression=zipfile.ZIP_STORED) as zf:
        _add(zf, "META-INF/", b"", _DIR_MODE)
        _add(zf, "META-INF/MANIFEST.MF", manifest.encode("utf-8"), _FILE_MODE)
        for d in dirs:
            _add(zf, d, b"", _DIR_MODE)
        for f in files:
            _add(zf, f, (classes / f).read_bytes(), _FILE_MODE)


def _add(zf: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.create_system = 3  # unix, so the mode bits below are what readers see
    info.external_attr = ((0o040000 if name.endswith("/") else 0o100000) | mode) << 16
    if name.endswith("/"):
        info.external_attr |= 0x10  # MS-DOS directory flag
    info.compress_type = zipfile.ZIP_STORED
    zf.writestr(info, data)
