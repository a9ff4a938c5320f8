"""Debian's archive: where to get packages, which versions exist, verified downloads, safe unpacking.

This module owns everything jvmkit takes from a Debian archive (the `linux` target's kernel and busybox):
- the mirror and suites: read from the host's apt sources (one-line `sources.list` and deb822
  `*.sources`), overridable with `--mirror URL` / `JVMKIT_DEBIAN_MIRROR` and `--suite`. The suite is
  the host's release codename when the host is Debian, else `DEFAULT_SUITE`. The `-updates` and
  `-security` suites are consulted too when apt uses them, so the newest kernel is found.
- the index: `dists/<suite>/InRelease` (or `Release` + `Release.gpg`), its signature checked with
  `gpgv` when gpgv and a keyring are present, and `main/binary-amd64/Packages.{xz,gz}` verified
  against the Release file's SHA256 list; cached under `cache_dir("debian")` for `INDEX_MAX_AGE`.
- `.deb` downloads (requests, streamed, progress bar), verified against the index's SHA-256 and
  kept in the cache keyed by that digest.
- dpkg's version comparison, and relation (`Depends`) parsing.
- unpacking `.deb` files in pure Python: an `ar` reader and a tar extractor that refuses absolute
  paths, `..`, and links leaving the destination, and never creates device nodes.
No host name appears here: every URL comes from apt's configuration or the user.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator
from urllib.parse import urlsplit

import requests
import zstandard

from jvmkit import __version__, cache, ui
from jvmkit.errors import JvmkitError

DEFAULT_SUITE = "bookworm"
ARCH = "amd64"
COMPONENT = "main"
INDEX_MAX_AGE = 24 * 3600
MIRROR_ENV = "JVMKIT_DEBIAN_MIRROR"
KEYRING_ENV = "JVMKIT_DEBIAN_KEYRING"  # a keyring path, or "none" to skip signature checks
DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
TIMEOUT = (15, 60)  # connect, read (seconds)
CHUNK = 1 << 16

# Debian's release names and aliases: a source whose suites are these (optionally with one of
# SUITE_SUFFIXES) and that carries the `main` component is taken to be Debian's archive. The
# Release file's `Origin: Debian` then confirms it before anything is used.
DEBIAN_RELEASES = frozenset({
    "stable", "testing", "unstable", "oldstable", "oldoldstable", "experimental", "sid",
    "jessie", "stretch", "buster", "bullseye", "bookworm", "trixie", "forky", "duke",
})
SUITE_SUFFIXES = ("-updates", "-security", "-backports", "-backports-sloppy", "-proposed-updates")
DEBIAN_COMPONENTS = frozenset({"main", "contrib", "non-free", "non-free-firmware"})

OFFLINE_HINT = (f"check the network, or pass --mirror URL / set {MIRROR_ENV} to a reachable Debian "
                "mirror, or bring your own kernel with `jvmkit kernel import linux PATH`")


class MirrorUnreachable(JvmkitError):
    """The mirror could not be contacted at all (as opposed to answering with an error)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"the Debian mirror was not reachable: {url} ({reason})", hint=OFFLINE_HINT)
        self.url = url
        self.reason = reason


class NotFound(JvmkitError):
    """The mirror answered 404."""


class ArchiveUnavailable(JvmkitError):
    """No mirror could be reached for the main suite and nothing is cached (the offline error)."""


# ---- apt sources ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AptSource:
    """One `deb` line of apt's configuration (deb822 stanzas are split into one per URI)."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None
    origin: str = ""  # the file it came from, for messages


def _split_options(line: str) -> tuple[dict[str, str], str]:
    options: dict[str, str] = {}
    line = line.strip()
    if line.startswith("["):
        end = line.find("]")
        if end < 0:
            return options, ""
        for item in line[1:end].split():
            key, _, value = item.partition("=")
            options[key.strip().lower()] = value.strip()
        line = line[end + 1:]
    return options, line.strip()


def parse_sources_list(text: str, origin: str = "") -> list[AptSource]:
    """Parse one-line-style apt sources (`deb [options] URI SUITE [COMPONENT...]`); `deb` lines only."""
    result = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind != "deb":
            continue
        options, rest = _split_options(rest)
        parts = rest.split()
        if len(parts) < 2 or parts[1].endswith("/"):  # flat repositories have no dists/
            continue
        if options.get("enabled", "yes").lower() == "no":
            continue
        result.append(AptSource(uri=parts[0].rstrip("/"), suites=(parts[1],), components=tuple(parts[2:]),
                                signed_by=options.get("signed-by") or None, origin=origin))
    return result


def parse_deb822(text: str) -> list[dict[str, str]]:
    """Split deb822 text into stanzas of {field (lower case): value}; comments and continuations handled."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None:
                current[last] += "\n" + line.strip()
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        last = key.strip().lower()
        current[last] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def parse_sources_deb822(text: str, origin: str = "") -> list[AptSource]:
    """Parse deb822-style apt sources (`*.sources`): one AptSource per URI of each enabled `deb` stanza."""
    result = []
    for stanza in parse_deb822(text):
        if "deb" not in stanza.get("types", "").split():
            continue
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        suites = tuple(stanza.get("suites", "").split())
        if not suites or any(s.endswith("/") for s in suites):
            continue
        signed_by = stanza.get("signed-by", "").strip()
        if "\n" in signed_by or signed_by.startswith("-----"):  # an inline key block, not a path
            signed_by = ""
        for uri in stanza.get("uris", "").split():
            result.append(AptSource(uri=uri.rstrip("/"), suites=suites,
                                    components=tuple(stanza.get("components", "").split()),
                                    signed_by=signed_by or None, origin=origin))
    return result


def read_apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """All `deb` sources apt is configured with on this host (unreadable files are skipped)."""
    files: list[Path] = [etc_apt / "sources.list"]
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    result = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        parse = parse_sources_deb822 if path.suffix == ".sources" else parse_sources_list
        result += parse(text, origin=str(path))
    return result


def suite_base(suite: str) -> str:
    """`bookworm-security` -> `bookworm`; names without a known suffix are returned unchanged."""
    for suffix in SUITE_SUFFIXES:
        if suite.endswith(suffix):
            return suite[: -len(suffix)]
    return suite


def is_debian_source(source: AptSource) -> bool:
    """The rule for picking Debian's archive out of apt's sources (pure): every suite is a Debian
    release name (with an optional -updates/-security/... suffix) and a Debian component is used.

    Third-party repositories use their own suite names (nodistro, cloud-sdk-bookworm, bookworm-pgdg,
    bookworm/mongodb-org/7.0) or components (docker's `stable`). The Release file's `Origin: Debian`
    is checked as well before an index is used, which catches look-alikes."""
    if not source.suites or not all(suite_base(s) in DEBIAN_RELEASES for s in source.suites):
        return False
    return any(c in DEBIAN_COMPONENTS for c in source.components)


def is_security_source(source: AptSource) -> bool:
    return any(s.endswith("-security") for s in source.suites)


def host_suite(os_release: Path = Path("/etc/os-release")) -> str | None:
    """The host's Debian codename (VERSION_CODENAME) when the host is Debian, else None."""
    try:
        text = os_release.read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    if values.get("ID") == "debian" and values.get("VERSION_CODENAME"):
        return values["VERSION_CODENAME"]
    return None


def choose_suite(explicit: str | None = None) -> str:
    return explicit or host_suite() or DEFAULT_SUITE


@dataclass(frozen=True)
class Repo:
    """One place to read an index from: archive base URI + suite (+ the keyring apt names for it)."""

    uri: str
    suite: str
    keyring: str | None = None
    from_apt: bool = True


@dataclass(frozen=True)
class Slot:
    """One suite to consult, with candidate repos tried in order; optional slots may be missing."""

    suite: str
    repos: tuple[Repo, ...]
    required: bool


def _unique_repos(sources: Iterable[AptSource], suite: str) -> tuple[Repo, ...]:
    seen: dict[str, Repo] = {}
    for s in sources:
        seen.setdefault(s.uri, Repo(uri=s.uri, suite=suite, keyring=s.signed_by))
    # Mirrors whose path is the classic `/debian` first (a stable sort keeps apt's order otherwise).
    return tuple(sorted(seen.values(), key=lambda r: not urlsplit(r.uri).path.rstrip("/").endswith("/debian")))


def plan_slots(suite: str, sources: list[AptSource], mirror: str | None = None) -> list[Slot]:
    """Which suites to read from where (pure).

    With an explicit mirror: the suite and its `-updates` there. Otherwise from apt's Debian sources:
    the suite at the main archive, `-updates` there when apt uses an -updates suite, and `-security`
    at the security archive when apt has one. Suites that already carry a suffix (e.g. a backports
    suite given with --suite) are read alone."""
    plain = "-" not in suite
    if mirror:
        repo = Repo(uri=mirror.rstrip("/"), suite=suite, from_apt=False)
        slots = [Slot(suite, (repo,), True)]
        if plain:
            slots.append(Slot(f"{suite}-updates", (Repo(repo.uri, f"{suite}-updates", from_apt=False),), False))
        return slots
    debian = [s for s in sources if is_debian_source(s)]
    security = [s for s in debian if is_security_source(s)]
    main = [s for s in debian if not is_security_source(s)]
    if not main:
        raise JvmkitError("no Debian archive found in apt's sources (/etc/apt/sources.list, sources.list.d)",
                          hint=f"pass --mirror URL or set {MIRROR_ENV} to a Debian mirror "
                               "(the URL that holds dists/ and pool/)")
    slots = [Slot(suite, _unique_repos(main, suite), True)]
    if plain and any(x.endswith("-updates") for s in main for x in s.suites):
        slots.append(Slot(f"{suite}-updates", _unique_repos(main, f"{suite}-updates"), False))
    if plain and security:
        slots.append(Slot(f"{suite}-security", _unique_repos(security, f"{suite}-security"), False))
    return slots


# ---- versions and relations ----------------------------------------------------------------------------

def _order(c: str) -> int:
    if "0" <= c <= "9":
        return 0
    if ("a" <= c <= "z") or ("A" <= c <= "Z"):
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    """dpkg's verrevcmp: alternate non-digit parts (~ sorts first, letters before other signs) and numbers."""
    i = j = 0
    la, lb = len(a), len(b)
    while i < la or j < lb:
        first_diff = 0
        while (i < la and not a[i].isdigit()) or (j < lb and not b[j].isdigit()):
            ac = _order(a[i]) if i < la else 0
            bc = _order(b[j]) if j < lb else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < la and a[i] == "0":
            i += 1
        while j < lb and b[j] == "0":
            j += 1
        while i < la and a[i].isdigit() and j < lb and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < la and a[i].isdigit():
            return 1
        if j < lb and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def split_version(version: str) -> tuple[int, str, str]:
    """(epoch, upstream, revision) of a Debian version string."""
    version = version.strip()
    epoch = 0
    if ":" in version:
        head, version = version.split(":", 1)
        try:
            epoch = int(head)
        except ValueError:
            raise JvmkitError(f"bad Debian version epoch in {head}:{version!r}") from None
    upstream, sep, revision = version.rpartition("-")
    if not sep:
        upstream, revision = version, ""
    return epoch, upstream, revision


def version_compare(a: str, b: str) -> int:
    """Compare two Debian versions like `dpkg --compare-versions`: -1, 0 or 1."""
    ea, ua, ra = split_version(a)
    eb, ub, rb = split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    result = _verrevcmp(ua, ub) or _verrevcmp(ra, rb)
    return (result > 0) - (result < 0)


version_key = functools.cmp_to_key(version_compare)


@dataclass(frozen=True)
class Relation:
    name: str
    op: str | None = None
    version: str | None = None


_REL = re.compile(r"^\s*([a-z0-9][a-z0-9+.\-]*)(?::[a-z0-9\-]+)?\s*(?:\(\s*(<<|<=|=|>=|>>|<|>)\s*([^)\s]+)\s*\))?")


def parse_relations(value: str) -> list[list[Relation]]:
    """`a (>= 1) | b, c` -> [[a>=1, b], [c]] (architecture qualifiers and restrictions dropped)."""
    groups = []
    for group in value.split(","):
        alts = []
        for alt in group.split("|"):
            m = _REL.match(alt.strip().lower())
            if m:
                alts.append(Relation(m.group(1), m.group(2), m.group(3)))
        if alts:
            groups.append(alts)
    return groups


def satisfies(version: str, op: str | None, ref: str | None) -> bool:
    if op is None or ref is None:
        return True
    c = version_compare(version, ref)
    return {"<<": c < 0, "<": c <= 0, "<=": c <= 0, "=": c == 0, ">=": c >= 0, ">": c >= 0, ">>": c > 0}[op]


# ---- Release and Packages --------------------------------------------------------------------------------

def clearsigned_body(text: str) -> str:
    """The signed text of an OpenPGP clear-signed message (dash-escaping undone); other text unchanged."""
    if not text.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        return text
    lines = text.splitlines()
    i = 1
    while i < len(lines) and lines[i].strip():  # armor headers (Hash: ...)
        i += 1
    body = []
    for line in lines[i + 1:]:
        if line.startswith("-----BEGIN PGP SIGNATURE-----"):
            break
        body.append(line[2:] if line.startswith("- ") else line)
    return "\n".join(body) + "\n"


@dataclass(frozen=True)
class Release:
    fields: dict[str, str]
    sha256: dict[str, tuple[int, str]]  # path -> (size, digest)

    @property
    def origin(self) -> str:
        return self.fields.get("origin", "")

    @property
    def suite(self) -> str:
        return self.fields.get("suite", "")

    @property
    def codename(self) -> str:
        return self.fields.get("codename", "")

    @property
    def by_hash(self) -> bool:
        return self.fields.get("acquire-by-hash", "").lower() == "yes"


def parse_release(text: str) -> Release:
    """Parse a Release/InRelease file (the signed body only)."""
    stanzas = parse_deb822(clearsigned_body(text))
    if not stanzas:
        raise JvmkitError("the archive's Release file is empty")
    fields = stanzas[0]
    sums: dict[str, tuple[int, str]] = {}
    for line in fields.get("sha256", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and re.fullmatch(r"[0-9a-f]{64}", parts[0]) and parts[1].isdigit():
            sums[parts[2]] = (int(parts[1]), parts[0])
    return Release(fields=fields, sha256=sums)


@dataclass(frozen=True)
class Package:
    """One binary package stanza from a Packages index, with where it can be downloaded from."""

    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str
    depends: str = ""
    provides: str = ""
    base_uri: str = ""
    suite: str = ""

    @property
    def url(self) -> str:
        return f"{self.base_uri.rstrip('/')}/{self.filename}"

    def relations(self) -> list[list[Relation]]:
        return parse_relations(self.depends)

    def provided(self) -> list[Relation]:
        return [alt for group in parse_relations(self.provides) for alt in group]

    def to_dict(self) -> dict:
        return {"package": self.name, "version": self.version, "sha256": self.sha256, "size": self.size,
                "url": self.url, "suite": self.suite}


_WANTED_FIELDS = {"package", "version", "architecture", "filename", "size", "sha256", "depends", "pre-depends",
                  "provides"}


def parse_packages(text: str, *, base_uri: str = "", suite: str = "",
                   want: Callable[[str], bool] | None = None) -> list[Package]:
    """Parse a Packages index. `want(name)` keeps only some packages (parsing all 60k takes ~1 s)."""
    result = []
    for stanza in text.split("\n\n"):
        stanza = stanza.strip("\n")
        if not stanza:
            continue
        if want is not None and stanza.startswith("Package:"):
            name = stanza[8:stanza.find("\n") if "\n" in stanza else None].strip()
            if not want(name):
                continue
        values: dict[str, str] = {}
        for line in stanza.split("\n"):
            if not line or line[0] in " \t":
                continue
            key, _, value = line.partition(":")
            key = key.lower()
            if key in _WANTED_FIELDS:
                values[key] = value.strip()
        if "package" not in values or "filename" not in values or "sha256" not in values:
            continue
        if want is not None and not want(values["package"]):
            continue
        depends = ", ".join(v for v in (values.get("pre-depends"), values.get("depends")) if v)
        try:
            size = int(values.get("size", "0"))
        except ValueError:
            size = 0
        result.append(Package(name=values["package"], version=values.get("version", "0"),
                              architecture=values.get("architecture", ""), filename=values["filename"],
                              size=size, sha256=values["sha256"].lower(), depends=depends,
                              provides=values.get("provides", ""), base_uri=base_uri, suite=suite))
    return result


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


from jvmkit.packager.bundle import sha256_file  # noqa: E402  (one implementation for the package)


def verify_digest(data: bytes, expected: tuple[int, str], what: str) -> None:
    """Check data against (size, sha256) from a Release file; raise JvmkitError naming both digests."""
    size, digest = expected
    actual = sha256_bytes(data)
    if len(data) != size or actual != digest:
        raise JvmkitError(f"{what}: SHA-256 {actual} ({len(data)} bytes) does not match the Release file's "
                          f"{digest} ({size} bytes)", hint="try again with --refresh; if it persists the mirror "
                                                           "is inconsistent, use another with --mirror")


def decompress_index(name: str, data: bytes) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".bz2"):
        return bz2.decompress(data)
    return data


# ---- signatures ----------------------------------------------------------------------------------------

def _keyring_for(repo: Repo) -> Path | None:
    env = os.environ.get(KEYRING_ENV)
    if env:
        return None if env.lower() == "none" else Path(env)
    if repo.keyring and Path(repo.keyring).is_file():
        return Path(repo.keyring)
    return DEFAULT_KEYRING


def verify_signature(signed: Path, detached: Path | None, keyring: Path | None, what: str) -> str:
    """Check an OpenPGP signature with gpgv; returns a status line, raises JvmkitError on a bad one.

    For a clear-signed file (no `detached`) the text gpgv verified must be exactly the text
    `clearsigned_body` reads, so nothing outside the signature can sneak into what is parsed."""
    if keyring is None:
        return f"not verified (signature checks disabled by {KEYRING_ENV}=none)"
    if not keyring.is_file():
        return f"not verified (no keyring at {keyring})"
    if keyring.suffix == ".asc":
        return f"not verified (armored keyring {keyring} is not supported by gpgv)"
    gpgv = shutil.which("gpgv")
    if not gpgv:
        return "not verified (gpgv is not installed)"
    argv = [gpgv, "--keyring", str(keyring)]
    argv += [str(detached), str(signed)] if detached else ["--output", "-", str(signed)]
    proc = subprocess.run(argv, capture_output=True)
    if proc.returncode != 0:
        last = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["gpgv failed"])[-1]
        raise JvmkitError(f"the signature of {what} did not verify against {keyring}: {last}",
                          hint=f"use a Debian mirror, or set {KEYRING_ENV} to the keyring that signs this one")
    if detached is None:
        ours = clearsigned_body(signed.read_text(errors="replace")).rstrip("\n")
        if proc.stdout.decode("utf-8", "replace").rstrip("\n") != ours:
            raise JvmkitError(f"{what}: the signed text differs from the text around it; refusing it")
    return f"verified (gpgv, {keyring})"


# ---- HTTP ----------------------------------------------------------------------------------------------

def session() -> requests.Session:
    s = requests.Session()
    s.headers["User-Agent"] = f"jvmkit/{__version__}"
    return s


def http_get(sess: requests.Session, url: str) -> bytes:
    """GET a small file into memory; NotFound on 404, MirrorUnreachable when there is no answer."""
    try:
        resp = sess.get(url, timeout=TIMEOUT)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise MirrorUnreachable(url, _reason(exc)) from None
    except requests.RequestException as exc:
        raise JvmkitError(f"could not download {url}: {exc}") from None
    if resp.status_code == 404:
        raise NotFound(f"{url}: not found (404)")
    if resp.status_code != 200:
        raise JvmkitError(f"{url}: the mirror answered HTTP {resp.status_code}",
                          hint="try again later or use another mirror with --mirror")
    return resp.content


def _reason(exc: Exception) -> str:
    text = str(exc)
    for pattern in (r"Name or service not known", r"Temporary failure in name resolution", r"Connection refused",
                    r"timed out", r"Network is unreachable", r"No route to host"):
        if re.search(pattern, text, re.I):
            return pattern.lower()
    return type(exc).__name__


# ---- the index -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Index:
    """A verified Packages index of one suite."""

    repo: Repo
    release: Release
    packages: tuple[Package, ...]
    signature: str
    fetched: float
    from_cache: bool

    @property
    def verified(self) -> bool:
        return self.signature.startswith("verified")

    def describe(self) -> dict:
        return {"uri": self.repo.uri, "suite": self.repo.suite, "signature": self.signature,
                "fetched": self.fetched, "from_cache": self.from_cache}


def index_dir(repo: Repo) -> Path:
    key = hashlib.sha256(f"{repo.uri}\n{repo.suite}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9.-]+", "_", repo.suite)
    return cache.cache_dir("debian", "indexes", f"{safe}-{key}")


def _packages_candidates(release: Release) -> list[str]:
    base = f"{COMPONENT}/binary-{ARCH}/Packages"
    return [base + ext for ext in (".xz", ".gz", "") if base + ext in release.sha256]


def _check_release(release: Release, repo: Repo, url: str) -> None:
    if repo.suite not in (release.suite, release.codename):
        raise JvmkitError(f"{url} describes suite {release.suite or '?'} ({release.codename or '?'}), "
                          f"not {repo.suite}", hint="check --suite and the mirror URL")
    if release.origin != "Debian":
        if repo.from_apt:
            raise NotDebian(f"{url} is not Debian's archive (Origin: {release.origin or 'none'})")
        ui.current().warn(f"{url} says Origin: {release.origin or 'none'}, not Debian; using it as you asked")


class NotDebian(JvmkitError):
    pass


def _load_cached(repo: Repo, directory: Path, want) -> Index | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        release_path = directory / meta["release_file"]
        release = parse_release(release_path.read_text())
        name = meta["packages_path"]
        data = (directory / Path(name).name).read_bytes()
    except (OSError, ValueError, KeyError, JvmkitError):
        return None
    if meta.get("uri") != repo.uri or meta.get("suite") != repo.suite or name not in release.sha256:
        return None
    try:
        verify_digest(data, release.sha256[name], f"cached {name}")
        packages = parse_packages(decompress_index(name, data).decode("utf-8", "replace"), base_uri=repo.uri,
                                  suite=repo.suite, want=want)
    except (JvmkitError, lzma.LZMAError, OSError, EOFError):
        return None
    return Index(repo=repo, release=release, packages=tuple(packages), signature=meta.get("signature", "?"),
                 fetched=float(meta.get("fetched", 0)), from_cache=True)


def _fetch(repo: Repo, directory: Path, sess: requests.Session, want) -> Index:
    dists = f"{repo.uri}/dists/{repo.suite}"
    keyring = _keyring_for(repo)
    staging = Path(tempfile.mkdtemp(prefix=".fetch.", dir=directory))
    try:
        try:
            raw = http_get(sess, f"{dists}/InRelease")
            (staging / "InRelease").write_bytes(raw)
            release_file = "InRelease"
            signature = verify_signature(staging / "InRelease", None, keyring, f"{dists}/InRelease")
        except NotFound:
            raw = http_get(sess, f"{dists}/Release")
            (staging / "Release").write_bytes(raw)
            release_file = "Release"
            try:
                (staging / "Release.gpg").write_bytes(http_get(sess, f"{dists}/Release.gpg"))
                signature = verify_signature(staging / "Release", staging / "Release.gpg", keyring,
                                             f"{dists}/Release")
            except NotFound:
                signature = "not verified (the mirror has no signature for this suite)"
        release = parse_release(raw.decode("utf-8", "replace"))
        _check_release(release, repo, f"{dists}/{release_file}")
        candidates = _packages_candidates(release)
        if not candidates:
            raise JvmkitError(f"{dists}/{release_file} lists no {COMPONENT}/binary-{ARCH}/Packages index")
        name = candidates[0]
        expected = release.sha256[name]
        urls = [f"{dists}/{name}"]
        if release.by_hash:
            urls.insert(0, f"{dists}/{Path(name).parent}/by-hash/SHA256/{expected[1]}")
        data = None
        for i, url in enumerate(urls):
            try:
                data = http_get(sess, url)
                verify_digest(data, expected, url)
                break
            except (NotFound, JvmkitError):
                if i == len(urls) - 1:
                    raise
                data = None
        assert data is not None
        packages = parse_packages(decompress_index(name, data).decode("utf-8", "replace"), base_uri=repo.uri,
                                  suite=repo.suite, want=want)
        fetched = time.time()
        (staging / Path(name).name).write_bytes(data)
        (staging / "meta.json").write_text(json.dumps(
            {"uri": repo.uri, "suite": repo.suite, "release_file": release_file, "packages_path": name,
             "signature": signature, "fetched": fetched}, indent=2))
        (directory / "meta.json").unlink(missing_ok=True)  # meta.json goes last: it vouches for the rest
        for item in staging.iterdir():
            if item.name != "meta.json":
                os.replace(item, directory / item.name)
        os.replace(staging / "meta.json", directory / "meta.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Index(repo=repo, release=release, packages=tuple(packages), signature=signature, fetched=fetched,
                 from_cache=False)


def load_index(repo: Repo, *, refresh: bool = False, sess: requests.Session | None = None,
               want: Callable[[str], bool] | None = None, max_age: float = INDEX_MAX_AGE) -> Index:
    """The Packages index of one suite: from the cache when younger than `max_age`, else downloaded and
    verified. When the mirror can't be reached a stale cached index is used (with a warning)."""
    directory = index_dir(repo)
    missing = directory / "missing.json"  # a suite the mirror doesn't have (remembered like an index)
    with cache.file_lock(directory / ".lock"):
        cached = _load_cached(repo, directory, want)
        if cached and not refresh and time.time() - cached.fetched < max_age:
            return cached
        if not cached and not refresh and missing.is_file() and time.time() - missing.stat().st_mtime < max_age:
            raise NotFound(f"{repo.uri}/dists/{repo.suite}: not found (remembered)")
        try:
            index = _fetch(repo, directory, sess or session(), want)
            missing.unlink(missing_ok=True)
            return index
        except NotFound:
            missing.write_text(json.dumps({"uri": repo.uri, "suite": repo.suite, "checked": time.time()}))
            raise
        except MirrorUnreachable as exc:
            if cached:
                age = (time.time() - cached.fetched) / 3600
                ui.current().warn(f"{exc.url} not reachable; using the cached index of {repo.suite} "
                                  f"({age:.0f} h old)")
                return cached
            raise


@dataclass
class Archive:
    """The indexes of all suites consulted (e.g. bookworm, bookworm-updates, bookworm-security)."""

    suite: str
    indexes: list[Index] = field(default_factory=list)

    def packages(self, name: str) -> list[Package]:
        return [p for index in self.indexes for p in index.packages if p.name == name]

    def newest(self, name: str) -> Package | None:
        found = self.packages(name)
        return max(found, key=lambda p: version_key(p.version)) if found else None

    def find(self, relation: Relation) -> Package | None:
        """The newest package that satisfies a relation (by name; virtual packages via Provides)."""
        found = [p for p in self.packages(relation.name) if satisfies(p.version, relation.op, relation.version)]
        if not found and relation.op is None:
            found = [p for index in self.indexes for p in index.packages
                     if any(r.name == relation.name for r in p.provided())]
        return max(found, key=lambda p: version_key(p.version)) if found else None

    @property
    def verified(self) -> bool:
        return bool(self.indexes) and all(i.verified for i in self.indexes)

    def describe(self) -> list[dict]:
        return [i.describe() for i in self.indexes]


def resolve_mirror(mirror: str | None) -> str | None:
    return mirror or os.environ.get(MIRROR_ENV) or None


def open_archive(suite: str | None = None, mirror: str | None = None, *, refresh: bool = False,
                 want: Callable[[str], bool] | None = None, sources: list[AptSource] | None = None) -> Archive:
    """Load (or reuse from the cache) the indexes of `suite` and its -updates/-security companions.

    `mirror` (or JVMKIT_DEBIAN_MIRROR) replaces apt's sources. Raises JvmkitError when the main
    suite can't be read from any candidate mirror and nothing is cached."""
    suite = choose_suite(suite)
    mirror = resolve_mirror(mirror)
    slots = plan_slots(suite, read_apt_sources() if sources is None and not mirror else (sources or []), mirror)
    console = ui.current()
    sess = session()
    archive = Archive(suite=suite)
    for slot in slots:
        errors: list[JvmkitError] = []
        for repo in slot.repos:
            try:
                index = load_index(repo, refresh=refresh, sess=sess, want=want)
            except (NotFound, NotDebian, MirrorUnreachable) as exc:  # try the next candidate
                errors.append(exc)
                continue
            archive.indexes.append(index)
            state = "cached" if index.from_cache else "downloaded"
            console.info(f"  debian: {repo.suite} from {repo.uri} ({state}, signature {index.signature})")
            break
        else:
            if slot.required:
                unreachable = [e for e in errors if isinstance(e, MirrorUnreachable)]
                if unreachable and len(unreachable) == len(errors):
                    first = unreachable[0]
                    raise ArchiveUnavailable(f"the Debian mirror was not reachable ({first.url}: {first.reason}) "
                                             f"and no index of {slot.suite} is cached", hint=OFFLINE_HINT)
                if errors and all(isinstance(e, NotFound) for e in errors):
                    raise JvmkitError(f"Debian suite {slot.suite!r} was not found at "
                                      f"{', '.join(r.uri for r in slot.repos)}",
                                      hint="check --suite (a codename such as bookworm or trixie, or stable)")
                raise errors[0] if errors else JvmkitError(f"no Debian mirror for {slot.suite}")
            if errors and not all(isinstance(e, NotFound) for e in errors):
                console.warn(f"skipping {slot.suite}: {errors[0].message}")
    return archive


# ---- .deb downloads -----------------------------------------------------------------------------------

def deb_cache_path(sha256: str) -> Path:
    return cache.cache_dir("debian", "debs") / f"{sha256}.deb"


def fetch_deb(pkg: Package, *, sess: requests.Session | None = None) -> Path:
    """The verified .deb of `pkg` in the cache (downloaded with a progress bar if missing)."""
    if not re.fullmatch(r"[0-9a-f]{64}", pkg.sha256):
        raise JvmkitError(f"{pkg.name} {pkg.version}: the index has no usable SHA-256 for it")
    dest = deb_cache_path(pkg.sha256)
    with cache.file_lock(dest.parent / f".{pkg.sha256}.lock"):
        if dest.exists():
            if sha256_file(dest) == pkg.sha256:
                return dest
            dest.unlink()  # corrupt cache entry: fetch again
        _download(pkg, dest, sess or session())
    return dest


def _download(pkg: Package, dest: Path, sess: requests.Session) -> None:
    url = pkg.url
    fd, tmp_name = tempfile.mkstemp(prefix=f".{pkg.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with sess.get(url, stream=True, timeout=TIMEOUT) as resp:
                    if resp.status_code != 200:
                        raise JvmkitError(f"{url}: the mirror answered HTTP {resp.status_code} for {pkg.name}",
                                          hint="the index may be stale: try again with --refresh")
                    total = int(resp.headers.get("Content-Length") or pkg.size or 0) or None
                    with ui.current().progress(f"{pkg.name} {pkg.version}", total) as bar:
                        for chunk in resp.iter_content(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise MirrorUnreachable(url, _reason(exc)) from None
            except requests.RequestException as exc:
                raise JvmkitError(f"could not download {url}: {exc}") from None
        actual = digest.hexdigest()
        if actual != pkg.sha256:
            raise JvmkitError(f"{pkg.name} {pkg.version}: downloaded SHA-256 {actual} does not match the index's "
                              f"{pkg.sha256}; the download was deleted",
                              hint="try again with --refresh; if it persists use another mirror (--mirror)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- ar and .deb ---------------------------------------------------------------------------------------

AR_MAGIC = b"!<arch>\n"


@dataclass(frozen=True)
class ArMember:
    name: str
    offset: int  # of the data in the archive file
    size: int
    mode: int
    mtime: int


def read_ar(handle: BinaryIO, what: str = "archive") -> list[ArMember]:
    """The members of an `ar` archive (GNU long names via `//`, BSD `#1/N` names); symbol tables skipped."""
    handle.seek(0)
    if handle.read(8) != AR_MAGIC:
        raise JvmkitError(f"{what} is not an ar archive (a .deb starts with !<arch>)")
    members: list[ArMember] = []
    long_names = b""
    pos = 8
    while True:
        handle.seek(pos)
        header = handle.read(60)
        if not header:
            break
        if len(header) < 60 or header[58:60] != b"`\n":
            raise JvmkitError(f"{what}: corrupt ar member header at byte {pos}")
        raw_name = header[0:16].decode("ascii", "replace").rstrip(" ")
        try:
            size = int(header[48:58].decode().strip() or 0)
            mtime = int(header[16:28].decode().strip() or 0)
            mode = int(header[40:48].decode().strip() or "0", 8)
        except ValueError:
            raise JvmkitError(f"{what}: corrupt ar member header at byte {pos}") from None
        data_at = pos + 60
        name = raw_name
        if raw_name.startswith("#1/"):  # BSD: the name precedes the data
            n = int(raw_name[3:])
            name = handle.read(n).rstrip(b"\0").decode("utf-8", "replace")
            data_at += n
            size -= n
        elif raw_name == "//":  # GNU long-name table
            long_names = handle.read(size)
            name = ""
        elif raw_name in ("/", "/SYM64/", "__.SYMDEF", "__.SYMDEF SORTED"):
            name = ""
        elif raw_name.startswith("/") and raw_name[1:].isdigit():
            start = int(raw_name[1:])
            end = long_names.find(b"/\n", start)
            name = long_names[start:end if end >= 0 else None].decode("utf-8", "replace")
        elif raw_name.endswith("/"):
            name = raw_name[:-1]
        if name:
            members.append(ArMember(name=name, offset=data_at, size=size, mode=mode, mtime=mtime))
        pos = data_at + size
        pos += pos % 2
    return members


class _Slice(io.RawIOBase):
    """A read-only window [offset, offset+size) of a file."""

    def __init__(self, handle: BinaryIO, offset: int, size: int):
        self._h, self._start, self._size, self._pos = handle, offset, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._h.seek(self._start + self._pos)
        data = self._h.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _decompressed(stream: BinaryIO, name: str) -> BinaryIO:
    if name.endswith(".xz") or name.endswith(".lzma"):
        return lzma.LZMAFile(stream)  # type: ignore[return-value]
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=stream)  # type: ignore[return-value]
    if name.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)  # type: ignore[return-value]
    if name.endswith(".bz2"):
        return bz2.BZ2File(stream)  # type: ignore[return-value]
    if name.endswith(".tar"):
        return stream
    raise JvmkitError(f"unsupported .deb member compression: {name}")


class Deb:
    """A .deb file: `debian-binary`, `control.tar.*` and `data.tar.*` members, read in pure Python."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            self.members = {m.name: m for m in read_ar(handle, str(self.path))}
        binary = self.members.get("debian-binary")
        if binary is None:
            raise JvmkitError(f"{self.path} is not a .deb (no debian-binary member)")
        with open(self.path, "rb") as handle:
            handle.seek(binary.offset)
            fmt = handle.read(binary.size).decode("ascii", "replace").strip()
        if not fmt.startswith("2."):
            raise JvmkitError(f"{self.path}: unsupported .deb format {fmt!r}")

    def _member(self, prefix: str) -> ArMember:
        for name, member in self.members.items():
            if name == prefix or name.startswith(prefix + "."):
                return member
        raise JvmkitError(f"{self.path}: no {prefix}.* member")

    @functools.cached_property
    def control(self) -> dict[str, str]:
        """The package's control stanza (field names in lower case)."""
        member = self._member("control.tar")
        with open(self.path, "rb") as handle:
            stream = _decompressed(io.BufferedReader(_Slice(handle, member.offset, member.size)), member.name)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    if _normalize(info.name) == "control" and info.isfile():
                        data = tar.extractfile(info)
                        stanzas = parse_deb822(data.read().decode("utf-8", "replace")) if data else []
                        return stanzas[0] if stanzas else {}
        return {}

    @contextmanager
    def data_tar(self) -> Iterator[tarfile.TarFile]:
        member = self._member("data.tar")
        with open(self.path, "rb") as handle:
            stream = _decompressed(io.BufferedReader(_Slice(handle, member.offset, member.size)), member.name)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                yield tar

    def extract(self, dest: Path, select: Callable[[str], bool] | None = None) -> list[str]:
        """Extract data.tar members (all, or those `select(path)` accepts) safely under `dest`."""
        try:
            with self.data_tar() as tar:
                return safe_extract(tar, Path(dest), select=select, what=str(self.path))
        except (tarfile.TarError, lzma.LZMAError, zstandard.ZstdError, EOFError, gzip.BadGzipFile,
                zlib.error) as exc:
            raise JvmkitError(f"{self.path}: corrupt data archive ({exc})") from None


def _normalize(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _safe_name(name: str, what: str) -> str:
    """The member path made relative (leading ./ removed); JvmkitError for absolute paths and `..`."""
    norm = _normalize(name)
    if norm.startswith("/"):
        raise JvmkitError(f"{what}: refusing member {name!r}: absolute path")
    if any(part == ".." for part in norm.split("/")):
        raise JvmkitError(f"{what}: refusing member {name!r}: '..' in the path")
    return "/".join(p for p in norm.split("/") if p not in ("", "."))


def _within(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _make_parents(dest: Path, root: str, rel: str, what: str) -> Path:
    target = dest / rel
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not _within(root, os.path.realpath(parent)):
        raise JvmkitError(f"{what}: refusing member {rel!r}: its directory leads outside the destination")
    return target


def _clear(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()


def safe_extract(tar: tarfile.TarFile, dest: Path, *, select: Callable[[str], bool] | None = None,
                 what: str = "archive") -> list[str]:
    """Extract a (streamed) tar under `dest`, refusing anything that would land outside it.

    Absolute paths and `..` raise JvmkitError; symlinks with absolute targets are rewritten relative to
    `dest` (a package's `/` is `dest`), relative ones that leave `dest` raise; hard links are copied;
    device nodes and FIFOs are skipped. Files get 0644 or 0755 (no setuid), directories 0755.
    Returns the relative paths written."""
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    written: list[str] = []
    for info in tar:
        rel = _safe_name(info.name, what)
        if not rel or (select is not None and not select(rel)):
            continue
        if info.ischr() or info.isblk() or info.isfifo():
            continue
        target = _make_parents(dest, root, rel, what)
        if info.isdir():
            if target.is_symlink():
                target.unlink()
            target.mkdir(exist_ok=True)
            os.chmod(target, 0o755)
        elif info.issym():
            link = info.linkname
            if link.startswith("/"):  # absolute within the package: make it relative to dest
                link = os.path.relpath("/" + link.lstrip("/"), "/" + os.path.dirname(rel))
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), link))
            if resolved == ".." or resolved.startswith("../") or os.path.isabs(resolved):
                raise JvmkitError(f"{what}: refusing symlink {rel!r} -> {info.linkname!r}: it points outside "
                                  "the destination")
            _clear(target)
            os.symlink(link, target)
            if not _within(root, os.path.realpath(target)):
                target.unlink()
                raise JvmkitError(f"{what}: refusing symlink {rel!r} -> {info.linkname!r}: it points outside "
                                  "the destination")
        elif info.islnk():
            source_rel = _safe_name(info.linkname, what)
            source = dest / source_rel
            if not source_rel or not source.is_file() or not _within(root, os.path.realpath(source)):
                continue  # the link target was not extracted (not selected); nothing to copy
            _clear(target)
            shutil.copyfile(source, target, follow_symlinks=True)
            os.chmod(target, stat.S_IMODE(os.stat(source).st_mode))
        elif info.isreg():
            _clear(target)
            data = tar.extractfile(info)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "wb") as out:
                if data is not None:
                    shutil.copyfileobj(data, out, CHUNK)
            os.chmod(target, 0o755 if info.mode & 0o111 else 0o644)
        else:
            continue
        if not info.issym():
            try:
                os.utime(target, (info.mtime, info.mtime), follow_symlinks=False)
            except OSError:
                pass
        written.append(rel)
    return written


def extract_deb(path: Path, dest: Path, select: Callable[[str], bool] | None = None) -> list[str]:
    """Unpack a .deb's data (all of it, or what `select(relative_path)` accepts) under `dest`."""
    return Deb(path).extract(dest, select)
