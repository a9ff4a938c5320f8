"""Debian's archive indexes: Release and Packages, their digests, the index cache, `open_archive`.

- the index of a suite: `dists/<suite>/InRelease` (or `Release` + `Release.gpg`), its signature
  checked by signature.py (gpgv, when it and a keyring are present), and
  `main/binary-amd64/Packages.{xz,gz}` verified against the Release file's SHA256 list; cached under
  `cache_dir("debian")` for `INDEX_MAX_AGE` (a stale cached index is used, with a warning, when the
  mirror can't be reached).
- `open_archive`: the indexes of a suite and its -updates/-security companions as one `Archive`
  (planned by sources.py), with one clear error when none can be read and nothing is cached.
No host name appears here: every URL comes from apt's configuration or the user.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from jvmkit import cache, fetch, fileio, ui
from jvmkit.errors import JvmkitError
from jvmkit.fetch import session
from jvmkit.packager.debian.signature import clearsigned_body, keyring_for, verify_signature
from jvmkit.packager.debian.sources import (OFFLINE_HINT, AptSource, MirrorUnreachable, Repo, choose_suite,
                                            parse_deb822, plan_slots, read_apt_sources, resolve_mirror)
from jvmkit.packager.debian.versions import Relation, parse_relations, satisfies, version_key

if TYPE_CHECKING:
    import requests

ARCH = "amd64"
COMPONENT = "main"
INDEX_MAX_AGE = 24 * 3600


class NotFound(JvmkitError):
    """The mirror answered 404."""


class ArchiveUnavailable(JvmkitError):
    """No mirror could be reached for the main suite and nothing is cached (the offline error)."""


class NotDebian(JvmkitError):
    """A source apt lists whose Release file does not say `Origin: Debian`."""


# ---- Release and Packages --------------------------------------------------------------------------------

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



def verify_digest(data: bytes, expected: tuple[int, str], what: str) -> None:
    """Check data against (size, sha256) from a Release file; raise JvmkitError naming both digests."""
    size, digest = expected
    actual = fileio.sha256_bytes(data)
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


# ---- HTTP ----------------------------------------------------------------------------------------------

def http_get(sess: requests.Session, url: str) -> bytes:
    """GET a small file into memory; NotFound on 404, MirrorUnreachable when there is no answer."""
    try:
        return fetch.get_bytes(url, what="the Debian mirror", session=sess,
                               hint="try again later or use another mirror with --mirror")
    except fetch.Unreachable as exc:
        raise MirrorUnreachable(url, exc.reason) from None
    except fetch.StatusError as exc:
        if exc.status == 404:
            raise NotFound(f"{url}: not found (404)") from None
        raise


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
    key = fileio.sha256_bytes(f"{repo.uri}\n{repo.suite}".encode())[:12]
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
    keyring = keyring_for(repo)
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
        for url in urls:  # by-hash first when the Release file offers it; the plain path is the fallback
            try:
                data = http_get(sess, url)
                verify_digest(data, expected, url)
                break
            except JvmkitError:
                if url == urls[-1]:
                    raise
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
            fileio.atomic_write_bytes(missing, json.dumps({"uri": repo.uri, "suite": repo.suite,
                                                           "checked": time.time()}).encode())
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

