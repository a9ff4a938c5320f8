"""Jar analysis: manifest, class path, modular and multi-release jars, jdeps -> `AppSpec`.

`analyze()` reads the app jar's manifest (Main-Class, Class-Path, Multi-Release, Add-Opens,
Add-Exports, Launcher-Agent-Class, Enable-Native-Access), resolves its class path (manifest
Class-Path entries, followed transitively like the JVM does, then `--lib` jars), checks the main
class is really there, and asks jdeps which JDK modules the jar and its class path use. Every bad
input becomes one `UsageError`/`JvmkitError` line naming the input. (One module of ~700 lines: the
class path, the main-class check and jdeps all read the same `JarFile` index; the class path part
could become its own module.)

Class-Path is read as the JVM reads it (jdk.internal.loader.URLClassPath; checked against a real
`java -jar` in tests/test_jar.py): each token is a URL resolved against the jar's own file: URL, so
it may be relative (`lib/a.jar`, `file:lib/a.jar`), absolute (`/usr/share/java/a.jar`,
`file:/...`, `file:///...`, `file://localhost/...`), %-encoded, and a directory when it ends in
"/". Non-file URLs are ignored by the JVM; missing files are skipped. Debian's jars name their
dependencies by absolute path (`Class-Path: /usr/share/java/commons-logging.jar`).

Guest placement (docs/architecture.md): the app jar is /app/app.jar, a relative Class-Path entry of
the app jar keeps its relative path under /app/ (so the manifest's Class-Path works as written),
`--lib` jars go to /app/lib/NAME. A jar or directory reached by an absolute host path H (and
everything reached from it) goes to /app/lib/host + H, e.g. /app/lib/host/usr/share/java/a.jar:
- stable: it depends on the path the manifest names, not on the traversal order, the other
  jars, the jar's content or a version behind a symlink (/usr/share/java/a.jar -> a-1.2.jar);
- collision-free: distinct host paths give distinct guest paths, and --lib jars are files directly
  in /app/lib, not under /app/lib/host/ (what is left, a --lib file named `host` or an app that
  ships its own lib/host/ tree, is refused with one line by `check_layout`, never silently merged);
- the jars' relative entries to each other (b.jar's `c.jar`) still resolve to the same files in
  the guest, so the guest JVM's own reading of the manifests finds nothing different.
The cost is length: OSv's whole boot command line is limited to 1023 bytes (osv_image.boot_cmdline
refuses more, with one line). A file reached twice (an absolute entry and a --lib naming the same
file, compared by resolved path; a cycle) is taken once, where it was reached first.
A class directory is put into the image file by file (`AppSpec.files`), so the image writers only
add files; empty subdirectories are not kept (they hold no class).

The guest runs `java ... -cp <guest class path> <main>`; because a jar on -cp does not
get its manifest's Add-Opens/Add-Exports/Enable-Native-Access honoured (only `java -jar` does),
those become JVM flags in `AppSpec.manifest_jvm_flags`.

jdeps runs as `jdeps -q -s --multi-release N --class-path <class path> <app jar> <class path entries>`
(jars and class directories, including everything taken in by absolute path): the summary form
(`-s`) lists each archive's module dependences and is about four times faster than
`--print-module-deps`, which computes a reduced module graph jlink does not need (jlink resolves
the closure itself). `parse_module_deps` reads either form. Parsing and the module-set
computation are pure functions.
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from jvmkit import proc, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.jdk import Jdk, JdkTools

GUEST_APP_DIR = "/app"
GUEST_APP_JAR = "/app/app.jar"
GUEST_LIB_DIR = "/app/lib"
GUEST_HOST_DIR = "/app/lib/host"  # + the host path of an absolute Class-Path entry
MANIFEST = "META-INF/MANIFEST.MF"
VERSIONS = "META-INF/versions/"
# Faster start for a short-lived tool; unknown options are ignored on non-HotSpot JVMs.
JDEPS_JVM_FLAGS = ("-J-XX:+IgnoreUnrecognizedVMOptions", "-J-XX:TieredStopAtLevel=1",
                   "-J-XX:+UseSerialGC", "-J-Xshare:auto")
JDEPS_TIMEOUT = 600

_CLASS_NAME = re.compile(r"^[^\W\d][\w$]*(\.[^\W\d][\w$]*)*$")
_MODULE_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


# ---------------------------------------------------------------------------------------------
# Manifest (pure)

def parse_manifest(data: bytes) -> dict[str, str]:
    """The main section of a jar manifest as {name: value} (pure).

    Lines end with CRLF, LF or CR; a line starting with one space continues the previous one
    (manifests wrap at 72 bytes, possibly inside a UTF-8 sequence, so lines are joined as bytes
    before decoding). The main section ends at the first blank line. Names keep their spelling;
    look them up with `manifest_value`, which ignores case as the jar spec says.
    """
    attrs: dict[str, str] = {}
    logical: list[bytearray] = []
    for raw in re.split(rb"\r\n|\r|\n", data):
        if raw.startswith(b" ") and logical:
            logical[-1] += raw[1:]
            continue
        if not raw.strip():
            if logical:
                break  # end of the main section
            continue
        logical.append(bytearray(raw))
    for line in logical:
        name, sep, value = bytes(line).partition(b":")
        if not sep:
            continue  # not an attribute line; the JVM would reject it, we just skip it
        text_name = name.decode("utf-8", "replace").strip()
        if text_name:
            attrs[text_name] = value.decode("utf-8", "replace").strip()
    return attrs


def manifest_value(manifest: dict[str, str], name: str) -> str | None:
    """An attribute of a parsed manifest, looked up without regard to case."""
    lowered = name.lower()
    for key, value in manifest.items():
        if key.lower() == lowered:
            return value
    return None


def parse_class_path(value: str | None) -> list[str]:
    """The entries of a Class-Path attribute: space-separated relative URLs, %-decoded (pure)."""
    return [unquote(part) for part in (value or "").split()]


def manifest_list(value: str | None) -> tuple[str, ...]:
    """A space-separated manifest list (Add-Opens, Add-Exports), de-duplicated, in order."""
    return tuple(dict.fromkeys((value or "").split()))


def manifest_jvm_flags(add_opens: tuple[str, ...], add_exports: tuple[str, ...],
                       enable_native_access: bool, release: int) -> tuple[str, ...]:
    """JVM flags for what the manifest asks of `java -jar` but `java -cp` ignores (pure).

    `Add-Opens: java.base/java.lang` -> `--add-opens=java.base/java.lang=ALL-UNNAMED`, likewise
    Add-Exports; `Enable-Native-Access: ALL-UNNAMED` -> `--enable-native-access=ALL-UNNAMED` on
    Java 22 and later (the attribute means nothing before). Launcher-Agent-Class has no flag
    equivalent; the guest launcher handles it (see AppSpec.launcher_agent).
    """
    flags = [f"--add-opens={item}=ALL-UNNAMED" for item in add_opens]
    flags += [f"--add-exports={item}=ALL-UNNAMED" for item in add_exports]
    if enable_native_access and release >= 22:
        flags.append("--enable-native-access=ALL-UNNAMED")
    return tuple(flags)


def normalize_class_name(name: str) -> str:
    """'a/b/C.class' or 'a.b.C' -> 'a.b.C' (pure)."""
    name = name.strip()
    if name.endswith(".class"):
        name = name[: -len(".class")]
    return name.replace("/", ".")


# ---------------------------------------------------------------------------------------------
# Jars

@dataclass(frozen=True)
class JarFile:
    """What analysis needs to know about one jar."""

    path: Path
    manifest: dict[str, str] | None   # None when the jar has no META-INF/MANIFEST.MF
    entries: frozenset[str]
    multi_release: bool
    modular: bool
    directory: bool = False           # a class directory (a Class-Path entry ending in "/"), not a jar

    def class_entry(self, class_name: str, release: int) -> str | None:
        """The entry a JVM of `release` loads `class_name` from, or None when it is absent."""
        base = class_name.replace(".", "/") + ".class"
        if self.multi_release:
            for version in range(release, 8, -1):
                versioned = f"{VERSIONS}{version}/{base}"
                if versioned in self.entries:
                    return versioned
        return base if base in self.entries else None


def is_modular(entries: frozenset[str] | set[str]) -> bool:
    """True when a jar holds module-info.class at its root or under META-INF/versions/N/ (pure)."""
    if "module-info.class" in entries:
        return True
    return any(re.fullmatch(r"META-INF/versions/\d+/module-info\.class", e) for e in entries)


def read_jar(path: Path, role: str = "") -> JarFile:
    """Open and index a jar; `role` prefixes its name in errors (e.g. "--lib")."""
    role = f"{role} " if role else ""
    if not path.exists():
        raise UsageError(f"{role}{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{role}{path} is not a file" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with zipfile.ZipFile(path) as zf:
            entries = frozenset(zf.namelist())
            names = {e.upper(): e for e in entries if e.upper() == MANIFEST}
            manifest = parse_manifest(zf.read(names[MANIFEST])) if MANIFEST in names else None
    except zipfile.BadZipFile:
        raise UsageError(f"{role}{path} is not a jar (not a zip file)") from None
    except (OSError, RuntimeError, NotImplementedError) as exc:  # unreadable, encrypted, odd compression
        raise UsageError(f"{role}{path} cannot be read as a jar: {exc}") from None
    multi_release = (manifest_value(manifest, "Multi-Release") or "").strip().lower() == "true" if manifest else False
    return JarFile(path=path, manifest=manifest, entries=entries, multi_release=multi_release,
                   modular=is_modular(entries))


def class_file_release(header: bytes) -> int | None:
    """The Java release a class file needs, from its first 8 bytes (major 61 -> 17) (pure)."""
    if len(header) < 8 or header[:4] != b"\xca\xfe\xba\xbe":
        return None
    major = int.from_bytes(header[6:8], "big")
    return major - 44 if major >= 45 else None


def newest_class(jar: JarFile, release: int) -> tuple[int, str] | None:
    """(release needed, entry) of the newest class the JVM of `release` would load from `jar`:
    base entries and the versioned entries up to `release`."""
    best: tuple[int, str] | None = None
    pattern = re.compile(r"META-INF/versions/(\d+)/")
    with zipfile.ZipFile(jar.path) as zf:
        for entry in sorted(jar.entries):
            if not entry.endswith(".class") or entry.endswith("module-info.class"):
                continue
            m = pattern.match(entry)
            if m and (not jar.multi_release or int(m.group(1)) > release):
                continue
            with zf.open(entry) as handle:
                needed = class_file_release(handle.read(8))
            if needed is not None and (best is None or needed > best[0]):
                best = (needed, entry)
    return best


# ---------------------------------------------------------------------------------------------
# Class path entries (pure)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True)
class Entry:
    """One Class-Path token as the JVM reads it (jdk.internal.loader.URLClassPath): a URL
    resolved against the jar's own file: URL.

    `kind` is "relative" (a path relative to the jar's directory), "absolute" (a host path), or
    "ignored" (the JVM never loads from it: `reason` says why). `path` is %-decoded; `directory`
    is True when the entry ends with "/" (the JVM then reads it as a directory of classes, else as
    a jar)."""

    raw: str
    kind: str
    path: str = ""
    directory: bool = False
    reason: str = ""


def class_path_tokens(value: str | None) -> list[str]:
    """The raw (still %-encoded) tokens of a Class-Path attribute (pure)."""
    return (value or "").split()


def parse_entry(raw: str) -> Entry:
    """Classify one Class-Path token the way the JVM resolves it against a local jar (pure).

    `lib/a.jar`, `file:lib/a.jar` -> relative; `/usr/share/java/a.jar`, `file:/usr/...`,
    `file:///usr/...`, `file://localhost/usr/...` -> absolute; `http://...`, `jar:...`,
    `file://otherhost/...` -> ignored (URLClassPath.tryResolveFile drops non-file URLs, and a file:
    URL naming another host is no local file). The scheme is read before %-decoding, as a URL is.
    """
    rest = raw
    scheme = _SCHEME.match(raw)
    if scheme:
        if scheme.group(1).lower() != "file":
            return Entry(raw, "ignored", reason=f"it is a {scheme.group(1)}: URL and the JVM loads only "
                                                f"local files from a jar's Class-Path")
        rest = raw[scheme.end():]
    if rest.startswith("//"):  # an authority: file://host/path (or a bare //host/path)
        host, slash, path = rest[2:].partition("/")
        if host.lower() not in ("", "localhost"):
            return Entry(raw, "ignored", reason=f"it names the host {unquote(host)!r}, not a local file")
        rest = slash + path
    directory = rest.endswith("/")
    path = unquote(rest)
    if not path.strip("/"):
        return Entry(raw, "ignored", reason="it is the host's root directory, which jvmkit does not pack"
                     if path else "it names no file")
    if path.startswith("/"):
        return Entry(raw, "absolute", posixpath.normpath(path), directory)
    return Entry(raw, "relative", path, directory)


def guest_path_for_host(host_path: str) -> str:
    """Where a jar or directory found at an absolute host path goes in the guest (pure):
    GUEST_HOST_DIR + the path as the manifest wrote it, lexically normalised (see the docstring
    at the top for why)."""
    return GUEST_HOST_DIR + posixpath.normpath("/" + host_path.lstrip("/"))


def _guest_path(guest_dir: str, entry: str) -> str | None:
    """Where a relative Class-Path entry lands in the guest, or None if it leaves /app (pure)."""
    path = posixpath.normpath(posixpath.join(guest_dir, entry))
    return path if path.startswith(GUEST_APP_DIR + "/") else None


# ---------------------------------------------------------------------------------------------
# Class path resolution

@dataclass(frozen=True)
class ClassPathJar:
    """One entry of the resolved class path: a jar, or a directory (`info.directory`).
    `files` are the (guest path, host file) pairs it puts into the image."""

    host: Path
    guest: str
    info: JarFile
    files: tuple[tuple[str, Path], ...] = ()
    anchored: str | None = None   # the absolute host path it was placed by (GUEST_HOST_DIR + it), else None


def read_dir(path: Path) -> tuple[JarFile, tuple[tuple[str, Path], ...]]:
    """A class directory as the JVM reads it: every regular file below it, symlinks followed (a
    directory reached twice through links is read once). Returns its index and (relative path,
    host file) pairs in sorted order."""
    files: dict[str, Path] = {}
    seen_dirs: set[str] = set()

    def walk(host: Path, rel: str) -> None:
        real = os.path.realpath(host)
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        try:
            children = sorted(os.scandir(host), key=lambda e: e.name)
        except OSError as exc:
            raise UsageError(f"cannot read the class directory {host}: {exc.strerror}") from None
        for child in children:
            name = f"{rel}{child.name}"
            if child.is_dir():
                walk(Path(child.path), name + "/")
            elif child.is_file():
                files[name] = Path(child.path)

    walk(path, "")
    entries = frozenset(files)
    info = JarFile(path=path, manifest=None, entries=entries, multi_release=False,
                   modular="module-info.class" in entries, directory=True)
    return info, tuple(sorted(files.items()))


@dataclass(frozen=True)
class _Owner:
    """A jar whose Class-Path is being followed: where its entries resolve from."""

    info: JarFile
    guest_dir: str               # its directory in the guest (relative entries placed by today's rule)
    anchored: str | None = None  # its absolute host path when it was placed by GUEST_HOST_DIR


def resolve_class_path(app: JarFile, libs: list[Path], *, strict: bool = False) -> list[ClassPathJar]:
    """The app's class path after the app jar, as the JVM builds it: each jar's Class-Path
    entries right after it (depth first), then each --lib jar (and its Class-Path entries).

    Relative entries of the app jar and of jars placed relative to it keep their relative path
    under /app/, --lib jars go to /app/lib/; absolute entries (and everything reached from them)
    go to GUEST_HOST_DIR + their host path. A file reached twice (compared by resolved path:
    an absolute entry and a --lib, a cycle) is taken once, where it was first reached.

    A missing relative entry of the app jar's own Class-Path is an error (a jar the app ships
    beside itself, not copied). Any other entry the JVM would skip (missing, not a local file) is
    skipped with one warning line per jar naming its entries, or with `strict` an error.
    """
    result: list[ClassPathJar] = []
    seen: dict[Path, str] = {app.path.resolve(): GUEST_APP_JAR}
    by_guest: dict[str, Path] = {GUEST_APP_JAR: app.path}

    def add(item: ClassPathJar) -> bool:
        key = item.host.resolve()
        if key in seen:
            return False
        if item.guest in by_guest:
            raise UsageError(f"two different class path entries would both be {item.guest} in the guest: "
                             f"{by_guest[item.guest]} and {item.host}", hint="rename one of them")
        if ":" in item.guest:
            raise UsageError(f"class path entry {item.host} would be {item.guest} in the guest, and ':' "
                             f"separates class path entries", hint="rename it without ':'")
        seen[key] = item.guest
        by_guest[item.guest] = item.host
        result.append(item)
        return True

    def skipped(owner: JarFile, missed: list[tuple[str, str]]) -> None:
        """One warning line per jar, naming it and each entry it skips."""
        if len(missed) == 1:
            raw, why = missed[0]
            ui.current().warn(f"skipping Class-Path entry {raw!r} of {owner.path}: {why} (the JVM skips it too)")
        elif missed:
            listed = "; ".join(f"{raw!r} ({why})" for raw, why in missed)
            ui.current().warn(f"skipping {len(missed)} Class-Path entries of {owner.path} (the JVM skips them too): "
                              f"{listed}")

    def follow(owner: _Owner) -> None:
        jar = owner.info
        value = manifest_value(jar.manifest, "Class-Path") if jar.manifest else None
        missed: list[tuple[str, str]] = []
        for entry in map(parse_entry, class_path_tokens(value)):
            where = f"Class-Path entry {entry.raw!r} of {jar.path}"
            if entry.kind == "ignored":
                if strict:
                    raise UsageError(f"{where} cannot be loaded: {entry.reason}",
                                     hint="fix the jar's manifest Class-Path, or pack without strict class path checking")
                missed.append((entry.raw, entry.reason))
                continue
            if entry.kind == "absolute" or owner.anchored:
                anchored = entry.path if entry.kind == "absolute" else \
                    posixpath.normpath(posixpath.join(posixpath.dirname(owner.anchored), entry.path))
                host, guest = Path(anchored), guest_path_for_host(anchored)
            else:
                anchored = None
                guest = _guest_path(owner.guest_dir, entry.path)
                if guest is None:
                    raise UsageError(f"{where} points outside the jar's directory; in the guest it would leave /app/",
                                     hint="move the jar beside (or below) the app jar, or pass it with --lib")
                host = jar.path.parent / entry.path
            present = host.is_dir() if entry.directory else host.exists()
            if not present:
                state = "is not a directory" if entry.directory and host.exists() else "does not exist"
                if (strict or (jar is app and entry.kind == "relative")):
                    raise UsageError(f"{where} is missing: {host} {state}",
                                     hint="put it there, or fix the jar's manifest Class-Path")
                missed.append((entry.raw, f"{host} {state}"))
                continue
            if entry.directory:
                info, tree = read_dir(host)
                files = tuple((f"{guest}/{rel}", file) for rel, file in tree)
                add(ClassPathJar(host, guest, info, files, anchored))  # a directory has no Class-Path
                continue
            info = read_jar(host, role=f"Class-Path jar {entry.raw!r} of {jar.path.name}:")
            if add(ClassPathJar(host, guest, info, ((guest, host),), anchored)):
                follow(_Owner(info, posixpath.dirname(guest), anchored))
        skipped(jar, missed)

    follow(_Owner(app, GUEST_APP_DIR))
    for lib in libs:
        lib = Path(lib)
        info = read_jar(lib, role="--lib")
        guest = f"{GUEST_LIB_DIR}/{lib.name}"
        if add(ClassPathJar(lib, guest, info, ((guest, lib),))):
            follow(_Owner(info, GUEST_LIB_DIR))
    check_layout([(GUEST_APP_JAR, app.path)] + [f for item in result for f in item.files])
    return result


def check_layout(files: list[tuple[str, Path]]) -> None:
    """Refuse an image layout where one guest path would be both a file and a directory, or two
    host files the same guest file (pure but for the error)."""
    by_path: dict[str, Path] = {}
    for guest, host in files:
        if guest in by_path and by_path[guest].resolve() != host.resolve():
            raise UsageError(f"{by_path[guest]} and {host} would both be {guest} in the guest",
                             hint="rename one of them")
        by_path.setdefault(guest, host)
    for guest, host in by_path.items():
        parent = posixpath.dirname(guest)
        while parent not in ("/", GUEST_APP_DIR):
            if parent in by_path:
                raise UsageError(f"{by_path[parent]} would be the file {parent} in the guest, but {host} "
                                 f"needs a directory there ({guest})", hint="rename one of them")
            parent = posixpath.dirname(parent)


# ---------------------------------------------------------------------------------------------
# Modules (pure)

def parse_module_deps(text: str, known: set[str] | frozenset[str] | None = None) -> list[str]:
    """The JDK modules in jdeps output, sorted and unique (pure).

    Reads `--print-module-deps`/`--list-reduced-deps` output (`java.base,java.logging`) and `-s`
    summaries (`app.jar -> java.logging`; lines pointing at jars, "not found" or "JDK internal
    API" are skipped). With `known` (the JDK's modules), other names (e.g. the module names of
    modular library jars) are dropped too.
    """
    found: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.lower().startswith(("warning", "error")):
            continue
        if "->" in line:
            target = line.split("->", 1)[1].strip()
            candidates = [target]
        else:
            candidates = [part.strip() for part in line.split(",")]
        for name in candidates:
            if not _MODULE_NAME.match(name) or name.endswith(".jar"):
                continue
            if known is None or name in known:
                found.add(name)
    return sorted(found)


def split_modules(items) -> list[str]:
    """Module lists as given on the command line ("a,b", "c") -> ["a", "b", "c"], in order, unique (pure)."""
    out: dict[str, None] = {}
    for item in items or ():
        for part in str(item).split(","):
            if part.strip():
                out[part.strip()] = None
    return list(out)


def required_modules(jdeps_modules, add_modules, agent_modules, profile_modules) -> tuple[str, ...]:
    """The module set to link: the union of what jdeps found, --add-modules, the guest agent's and
    the profile's modules, plus java.base; sorted and unique (pure)."""
    names = {"java.base"}
    for group in (jdeps_modules, add_modules, agent_modules, profile_modules):
        names.update(split_modules(group))
    return tuple(sorted(names))


def check_add_modules(add_modules, available, jdk_home: Path | str = "the JDK") -> list[str]:
    """Validate --add-modules against the JDK's modules; returns them split and unique.
    Unknown names raise a UsageError naming the module and suggesting close matches."""
    names = split_modules(add_modules)
    available = set(available)
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, sorted(available), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "`java --list-modules` lists the JDK's modules"
            raise UsageError(f"--add-modules: unknown module {name!r} (not in the JDK at {jdk_home})", hint=hint)
    return names


# ---------------------------------------------------------------------------------------------
# jdeps

def jdeps_command(jdeps: Path | str, jars: list[Path], release: int) -> list[str]:
    """The jdeps command line over the app jar (first) and its class path jars (pure)."""
    cmd = [str(jdeps), *JDEPS_JVM_FLAGS, "-q", "-s", "--multi-release", str(release)]
    if len(jars) > 1:
        cmd += ["--class-path", ":".join(str(j) for j in jars[1:])]
    return cmd + [str(j) for j in jars]


def explain_jdeps_failure(output: str) -> str:
    """One line out of jdeps's error output (pure): its `Error:` line, else the innermost
    exception's message, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Error:"):
            return line[len("Error:"):].strip()
    exceptions = [line for line in lines if line.startswith(("Caused by:", "Exception in thread"))]
    if exceptions:
        # 'Caused by: java.util.zip.ZipException: zip END header not found'
        #   -> 'ZipException: zip END header not found'
        text = re.sub(r'^(Caused by:|Exception in thread "[^"]*")\s*', "", exceptions[-1])
        name, sep, message = text.partition(": ")
        return f"{name.rsplit('.', 1)[-1]}{sep}{message}".strip()
    return lines[-1] if lines else "jdeps failed without a message"


def run_jdeps(jdk: Jdk, jars: list[Path]) -> list[str]:
    """The JDK modules the jars use, by jdeps of the given JDK (filtered to the JDK's modules)."""
    jdeps = jdk.require_tool("jdeps")
    cmd = jdeps_command(jdeps, jars, jdk.release)
    done = proc.run(cmd, what=f"jdeps on {jars[0]}", timeout=JDEPS_TIMEOUT, check=False,
                    hint="pass the modules with --add-modules and a profile without jdeps")
    if done.returncode != 0 or re.search(r"^Exception in thread", done.stderr, re.M):
        raise JvmkitError(f"jdeps failed on {jars[0]}: {explain_jdeps_failure(done.stderr or done.stdout)}",
                          hint="check that the jar and its class path jars are intact")
    return parse_module_deps(done.stdout, known=set(jdk.modules())) or ["java.base"]


# ---------------------------------------------------------------------------------------------
# The result

@dataclass(frozen=True)
class AppSpec:
    """The analysed application. `class_path[i]` is the host jar or class directory that becomes
    `guest_class_path[i]` in the guest; index 0 is the app jar (/app/app.jar). `files` are the
    (guest path, host file) pairs the image must hold for that class path, sorted by guest path:
    each jar, and each file below a class directory (so image writers only ever add files)."""

    jar: Path
    main_class: str
    class_path: tuple[Path, ...]
    guest_class_path: tuple[str, ...]
    modular: bool
    multi_release: bool
    add_opens: tuple[str, ...]            # manifest Add-Opens items, e.g. java.base/java.lang
    add_exports: tuple[str, ...]          # manifest Add-Exports items
    launcher_agent: str | None            # manifest Launcher-Agent-Class (handled by the guest launcher)
    enable_native_access: bool            # manifest Enable-Native-Access: ALL-UNNAMED
    jdeps_modules: tuple[str, ...]        # jdeps's finding, plus modules the manifest names
                                          # (Add-Opens/Add-Exports targets; java.instrument for an agent)
    manifest_jvm_flags: tuple[str, ...]   # JVM flags for the manifest attributes -cp ignores
    add_modules: tuple[str, ...] = ()     # --add-modules, validated and split
    jvm_args: tuple[str, ...] = ()
    app_args: tuple[str, ...] = ()
    main_class_source: str = "manifest"   # "manifest" or "--main"
    manifest: dict = field(default_factory=dict, compare=False, repr=False)
    files: tuple[tuple[str, Path], ...] = ()

    def to_dict(self) -> dict:
        """The app section of manifest.json. Host paths are left out (only the jar's file name),
        so the same inputs give the same bytes wherever they were packed from."""
        return {
            "jar": self.jar.name,
            "main_class": self.main_class,
            "main_class_source": self.main_class_source,
            "class_path": list(self.guest_class_path),
            "class_path_sources": [p.name for p in self.class_path],
            "modular": self.modular,
            "multi_release": self.multi_release,
            "add_opens": list(self.add_opens),
            "add_exports": list(self.add_exports),
            "launcher_agent": self.launcher_agent,
            "enable_native_access": self.enable_native_access,
            "jdeps_modules": list(self.jdeps_modules),
            "add_modules": list(self.add_modules),
            "manifest_jvm_flags": list(self.manifest_jvm_flags),
            "jvm_args": list(self.jvm_args),
        }


def analyze(jar: Path, *, main: str | None = None, libs: list[Path] = (), add_modules: list[str] = (),
            jvm_args: list[str] = (), app_args: list[str] = (), jdk: JdkTools,
            strict_class_path: bool = False) -> AppSpec:
    """Analyse an app jar and its class path with the given JDK; raises UsageError/JvmkitError
    with one line naming the bad input. `strict_class_path` turns every Class-Path entry the JVM
    would skip (missing, not a local file) into an error instead of a warning."""
    jar = Path(jar)
    app = read_jar(jar)
    if main is not None:
        main_class, source = normalize_class_name(main), "--main"
        if not _CLASS_NAME.match(main_class):
            raise UsageError(f"--main {main!r} is not a Java class name", hint="e.g. --main com.example.Main")
    else:
        if app.manifest is None:
            raise UsageError(f"{jar} has no manifest ({MANIFEST}), so it names no main class",
                             hint="pass --main CLASS")
        value = manifest_value(app.manifest, "Main-Class")
        if not value:
            raise UsageError(f"{jar} has no Main-Class in its manifest", hint="pass --main CLASS")
        main_class, source = normalize_class_name(value), "manifest"
        if not _CLASS_NAME.match(main_class):
            raise UsageError(f"Main-Class {value!r} in {jar}'s manifest is not a Java class name",
                             hint="fix the manifest, or pass --main CLASS")
    add = check_add_modules(add_modules, jdk.modules(), jdk.home)
    class_path = resolve_class_path(app, [Path(p) for p in libs], strict=strict_class_path)

    holder = next((j for j in [app] + [c.info for c in class_path] if j.class_entry(main_class, jdk.release)), None)
    if holder is None:
        entry = main_class.replace(".", "/") + ".class"
        where = f"{jar.name}" + (" or its class path" if class_path else "")
        if source == "--main":
            raise UsageError(f"--main {main_class}: there is no {entry} in {where}",
                             hint="check the class name, package included")
        raise UsageError(f"Main-Class {main_class} of {jar} is not there: no {entry} in {where}",
                         hint="fix the manifest, or pass --main CLASS")
    nested = sorted(e for e in app.entries if re.match(r"^(BOOT-INF|WEB-INF)/lib/[^/]+\.jar$", e))
    if nested:
        ui.current().warn(f"{jar.name} holds {len(nested)} nested jar(s) (e.g. {nested[0]}) that jdeps cannot "
                          f"see into; add the modules they need with --add-modules, or use a profile "
                          f"such as server")
    newest = newest_class(app, jdk.release)
    if newest and newest[0] > jdk.release:
        raise JvmkitError(f"{jar} needs Java {newest[0]} ({newest[1]} is a Java {newest[0]} class file) "
                          f"but the JDK at {jdk.home} is Java {jdk.release}",
                          hint=f"pass --jdk PATH to a JDK {newest[0]} or newer")

    manifest = app.manifest or {}
    add_opens = manifest_list(manifest_value(manifest, "Add-Opens"))
    add_exports = manifest_list(manifest_value(manifest, "Add-Exports"))
    launcher_agent = manifest_value(manifest, "Launcher-Agent-Class") or None
    native = (manifest_value(manifest, "Enable-Native-Access") or "").strip() == "ALL-UNNAMED"
    available = set(jdk.modules())
    named = {item.split("/", 1)[0] for item in add_opens + add_exports} & available
    if launcher_agent:
        named.add("java.instrument")
    modules = run_jdeps(jdk, [jar] + [c.host for c in class_path])

    return AppSpec(
        jar=jar,
        main_class=main_class,
        class_path=(jar, *(c.host for c in class_path)),
        guest_class_path=(GUEST_APP_JAR, *(c.guest for c in class_path)),
        modular=app.modular,
        multi_release=app.multi_release,
        add_opens=add_opens,
        add_exports=add_exports,
        launcher_agent=launcher_agent,
        enable_native_access=native,
        jdeps_modules=tuple(sorted(set(modules) | named)),
        manifest_jvm_flags=manifest_jvm_flags(add_opens, add_exports, native, jdk.release),
        add_modules=tuple(add),
        jvm_args=tuple(jvm_args),
        app_args=tuple(app_args),
        main_class_source=source,
        manifest=dict(manifest),
        files=image_files(jar, class_path),
    )


def image_files(jar: Path, class_path: list[ClassPathJar]) -> tuple[tuple[str, Path], ...]:
    """The (guest path, host file) pairs of the app jar and its class path, sorted by guest path,
    each guest path once (a jar that is also inside a class directory is the same file)."""
    files = {GUEST_APP_JAR: jar}
    for item in class_path:
        for guest, host in item.files:
            files.setdefault(guest, host)
    return tuple(sorted(files.items()))
