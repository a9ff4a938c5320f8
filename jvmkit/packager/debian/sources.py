"""Where Debian's archive is: apt's sources, the suite to read, and which suites to read from where.

- apt sources: one-line `sources.list` and deb822 `*.sources` files (`deb` entries only), and the
  deb822 stanza parser the Release file and a .deb's control file use as well.
- which sources are Debian's archive (`is_debian_source`): Debian release names as suites, Debian
  components; the Release file's `Origin: Debian` is checked later (archive.py).
- the suite: the host's release codename when the host is Debian, else `DEFAULT_SUITE`; the
  `-updates` and `-security` suites are planned too when apt uses them (`plan_slots`).
- the mirror: `--mirror URL` / `JVMKIT_DEBIAN_MIRROR` replace apt's sources (`resolve_mirror`).
All of it is pure but `read_apt_sources` and `host_suite`, which read /etc.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

from jvmkit import fetch
from jvmkit.errors import JvmkitError

DEFAULT_SUITE = "bookworm"
MIRROR_ENV = "JVMKIT_DEBIAN_MIRROR"

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


class MirrorUnreachable(fetch.Unreachable):
    """The mirror could not be contacted at all (as opposed to answering with an error)."""

    def __init__(self, url: str, reason: str):
        super().__init__(url, "the Debian mirror", reason, hint=OFFLINE_HINT)


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


def resolve_mirror(mirror: str | None) -> str | None:
    return mirror or os.environ.get(MIRROR_ENV) or None
