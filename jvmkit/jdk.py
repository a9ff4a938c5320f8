"""The build JDK: where it is, which release it is, its tools, jmods and modules.

`find_jdk(explicit)` looks at `--jdk PATH` (a JDK home, or its `bin/java`), else `$JAVA_HOME`,
else the `java` on PATH (resolved through symlinks, e.g. Debian's /usr/bin/java alternatives) and
returns a frozen `Jdk`. Finding a JDK does not demand that it can trim a runtime: `doctor` reports
on JREs and JDKs without jmods too. `Jdk.require_jmods()` is what `pack` calls before jlink, and it
raises a `JvmkitError` that says which package or `--jdk` fixes it.

A JDK without jmods can still link when it was built with a linkable run-time image (JEP 493, JDK
24 and later, e.g. Temurin 25); `Jdk.linkable_runtime` finds out by asking its jlink.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from jvmkit import proc
from jvmkit.errors import JvmkitError, UsageError

MIN_RELEASE = 11  # jlink, jdeps --multi-release and the guest launcher need at least this


def feature_release(version: str) -> int | None:
    """The feature release of a Java version string: '17.0.15' -> 17, '1.8.0_392' -> 8,
    '25-ea' -> 25, '21+35' -> 21 (pure). None when it is not a version."""
    m = re.match(r"\s*(\d+)(?:\.(\d+))?", version)
    if not m:
        return None
    major = int(m.group(1))
    if major == 1 and m.group(2) is not None:  # the pre-9 scheme 1.N
        return int(m.group(2))
    return major


def parse_release_file(text: str) -> dict[str, str]:
    """KEY="value" lines of a JDK's `release` file (pure)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            out[key.strip()] = value
    return out


def parse_java_version_output(text: str) -> tuple[str | None, str | None]:
    """(version, runtime version) from `java -version` output (pure):
    'openjdk version "17.0.15" 2025-04-15 ... (build 17.0.15+6-Debian-1deb12u1)'
    -> ('17.0.15', '17.0.15+6-Debian-1deb12u1')."""
    version = runtime = None
    m = re.search(r'version "([^"]+)"', text)
    if m:
        version = m.group(1)
    m = re.search(r"Runtime Environment[^\n]*\(build ([^)\s]+)\)", text)
    if m:
        runtime = m.group(1)
    return version, runtime


@dataclass(frozen=True)
class Jdk:
    """A JDK (or JRE) installation. Tool paths are where the tools would be; they may be missing
    (a JRE), which `require_tool`/`require_jmods` turn into a clear error."""

    home: Path
    release: int              # the feature release, e.g. 17
    version: str              # the full runtime version, e.g. 17.0.15+6-Debian-1deb12u1
    jmods: Path | None        # home/jmods when it holds java.base.jmod
    java: Path
    javac: Path
    jlink: Path
    jdeps: Path
    source: str = "--jdk"     # how it was found: --jdk, JAVA_HOME or PATH

    @property
    def java_home(self) -> Path:
        return self.home

    @property
    def is_jre(self) -> bool:
        """True when jlink or javac is missing: a runtime, not a development kit."""
        return not (_is_exe(self.jlink) and _is_exe(self.javac))

    @property
    def linkable_runtime(self) -> bool:
        """True when jlink can link from this JDK's own run-time image, without jmods (JEP 493)."""
        if self.release < 24 or not _is_exe(self.jlink):
            return False
        return _jlink_links_runtime(str(self.jlink))

    def modules(self) -> list[str]:
        """The JDK's modules, sorted: from its jmods, else its `release` file, else `java --list-modules`."""
        return list(_modules(str(self.home), str(self.jmods) if self.jmods else None, str(self.java)))

    def require_tool(self, name: str) -> Path:
        """The path of a JDK tool (java, javac, jlink, jdeps); raises when it is missing."""
        path = getattr(self, name)
        if not _is_exe(path):
            raise JvmkitError(
                f"the Java at {self.home} has no {name} (it is a JRE, not a full JDK)",
                hint=f"apt-get install openjdk-{self.release}-jdk-headless (and openjdk-{self.release}-jmods on Debian 13+), "
                     f"or pass --jdk PATH to a full JDK")
        return path

    def require_jmods(self) -> Path | None:
        """Check that jlink can trim a runtime from this JDK; returns the jmods directory (None for
        a JDK that links from its run-time image). Raises JvmkitError naming the fix otherwise."""
        if self.is_jre:
            missing = ", ".join(t for t in ("jlink", "javac") if not _is_exe(getattr(self, t)))
            raise JvmkitError(
                f"the Java at {self.home} is a JRE (no {missing}); jvmkit needs a full JDK with jmods",
                hint=f"on Debian/Ubuntu: apt-get install openjdk-{self.release}-jdk-headless "
                     f"openjdk-{self.release}-jmods; or pass --jdk PATH to a JDK with jmods")
        if self.jmods is None and not self.linkable_runtime:
            raise JvmkitError(
                f"the JDK at {self.home} (Java {self.release}) has no jmods, so jlink cannot build a trimmed runtime",
                hint=f"on Debian/Ubuntu: apt-get install openjdk-{self.release}-jmods (Debian 13+) or openjdk-{self.release}-jdk-headless (Debian 12); "
                     f"or pass --jdk PATH to a JDK that has jmods")
        return self.jmods

    def describe(self) -> dict:
        return {"home": str(self.home), "release": self.release, "version": self.version,
                "jmods": str(self.jmods) if self.jmods else None, "source": self.source}


# The name the rest of jvmkit uses for "the JDK tools analysis runs with".
JdkTools = Jdk


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _run(argv: list[str], timeout: float = 60) -> proc.CompletedProcess:
    return proc.run(argv, timeout=timeout, check=False)


@functools.lru_cache(maxsize=None)
def _jlink_links_runtime(jlink: str) -> bool:
    try:
        done = proc.run([jlink, "--help"], timeout=60, check=False)
    except JvmkitError:
        return False
    return "Linking from run-time image enabled" in done.stdout + done.stderr


@functools.lru_cache(maxsize=None)
def _modules(home: str, jmods: str | None, java: str) -> tuple[str, ...]:
    if jmods:
        names = [p.name[: -len(".jmod")] for p in Path(jmods).glob("*.jmod")]
        if names:
            return tuple(sorted(names))
    try:
        release = parse_release_file((Path(home) / "release").read_text(errors="replace"))
    except OSError:
        release = {}
    if release.get("MODULES", "").strip():
        return tuple(sorted(set(release["MODULES"].split())))
    done = proc.run([java, "--list-modules"], what=f"{java} --list-modules", timeout=60)
    names = {line.strip().split("@", 1)[0] for line in done.stdout.splitlines() if line.strip()}
    return tuple(sorted(names))


def _version_of(home: Path, java: Path) -> tuple[int, str]:
    """(feature release, full runtime version) from the `release` file, else `java -version`."""
    try:
        info = parse_release_file((home / "release").read_text(errors="replace"))
    except OSError:
        info = {}
    version = info.get("JAVA_VERSION")
    runtime = info.get("JAVA_RUNTIME_VERSION") or info.get("FULL_VERSION")
    if not version:
        done = _run([str(java), "-version"])
        version, runtime = parse_java_version_output(done.stderr + done.stdout)
        if not version:
            raise JvmkitError(f"cannot tell which Java {java} is: `java -version` printed no version",
                              hint="pass --jdk PATH to a working JDK")
    release = feature_release(version)
    if release is None:
        raise JvmkitError(f"cannot tell which Java {home} is: unrecognised version {version!r}")
    return release, runtime or version


def jdk_at(home: Path, source: str = "--jdk") -> Jdk:
    """The JDK installed at `home` (no search). Raises when there is no bin/java."""
    home = Path(home)
    java = home / "bin" / "java"
    if not _is_exe(java):
        what = {"--jdk": f"--jdk {home}", "JAVA_HOME": f"JAVA_HOME={home}"}.get(source, str(home))
        raise UsageError(f"{what} is not a JDK: there is no bin/java in it",
                         hint="point it at a JDK's home directory, e.g. /usr/lib/jvm/java-17-openjdk-amd64")
    release, version = _version_of(home, java)
    if release < MIN_RELEASE:
        raise JvmkitError(f"the Java at {home} is Java {release}; jvmkit needs JDK {MIN_RELEASE} or newer",
                          hint="pass --jdk PATH to a newer JDK, e.g. apt-get install openjdk-17-jdk-headless")
    jmods = home / "jmods"
    has_jmods = (jmods / "java.base.jmod").is_file()
    bin_dir = home / "bin"
    return Jdk(home=home, release=release, version=version, jmods=jmods if has_jmods else None,
               java=java, javac=bin_dir / "javac", jlink=bin_dir / "jlink", jdeps=bin_dir / "jdeps",
               source=source)


def find_jdk(explicit: Path | None = None) -> Jdk:
    """The build JDK: `--jdk PATH` (a home, or a java binary in one), else $JAVA_HOME, else the
    `java` on PATH resolved through symlinks."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise UsageError(f"--jdk {explicit}: no such directory")
        if path.is_file():  # a java binary: its home is two levels up
            path = path.resolve().parent.parent
        elif path.name == "bin" and (path / "java").is_file():
            path = path.parent
        return jdk_at(path, "--jdk")
    env = os.environ.get("JAVA_HOME", "").strip()
    if env:
        return jdk_at(Path(env).expanduser(), "JAVA_HOME")
    found = shutil.which("java")
    if not found:
        raise JvmkitError("no JDK found: no --jdk, JAVA_HOME is not set and there is no java on PATH",
                          hint="apt-get install openjdk-17-jdk-headless, or pass --jdk PATH")
    return jdk_at(Path(found).resolve().parent.parent, "PATH")
