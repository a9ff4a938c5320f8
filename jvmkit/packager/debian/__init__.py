"""Debian's archive: where to get packages, which versions exist, verified downloads, safe unpacking.

Everything jvmkit takes from a Debian archive (the `linux` target's kernel and busybox), by concern:
- `sources`: the mirror and suites, read from the host's apt sources (one-line `sources.list` and
  deb822 `*.sources`), overridable with `--mirror URL` / `JVMKIT_DEBIAN_MIRROR` and `--suite`; the
  `-updates` and `-security` suites are consulted too when apt uses them.
- `versions`: dpkg's version order and relation (`Depends`, `Provides`) parsing.
- `archive`: Release/InRelease and Packages (checked against the Release file's SHA-256), the
  index cache, and `open_archive`; `signature`: the Release file's OpenPGP signature (gpgv).
- `deb`: `.deb` downloads (jvmkit.fetch) verified against the index and cached by digest, the `ar`
  reader, and a tar extractor that refuses absolute paths, `..` and links leaving the destination.
No host name appears here: every URL comes from apt's configuration or the user.

This module re-exports the names code outside the package uses (`debian.open_archive`, ...).
"""

from jvmkit.fetch import session
from jvmkit.packager.debian.archive import (INDEX_MAX_AGE, Archive, ArchiveUnavailable, Index, Package, Release,
                                            open_archive, parse_packages, parse_release, verify_digest)
from jvmkit.packager.debian.deb import Deb, extract_deb, fetch_deb, read_ar
from jvmkit.packager.debian.signature import DEFAULT_KEYRING
from jvmkit.packager.debian.sources import (DEFAULT_SUITE, MirrorUnreachable, Repo, choose_suite, host_suite,
                                            is_debian_source, parse_sources_deb822, parse_sources_list, plan_slots,
                                            read_apt_sources)
from jvmkit.packager.debian.versions import Relation, parse_relations, satisfies, version_compare, version_key

__all__ = [
    "Archive", "ArchiveUnavailable", "DEFAULT_KEYRING", "DEFAULT_SUITE", "Deb", "INDEX_MAX_AGE", "Index",
    "MirrorUnreachable", "Package", "Relation", "Release", "Repo", "choose_suite", "extract_deb", "fetch_deb",
    "host_suite", "is_debian_source", "open_archive", "parse_packages", "parse_relations", "parse_release",
    "parse_sources_deb822", "parse_sources_list", "plan_slots", "read_apt_sources", "read_ar", "satisfies",
    "session", "verify_digest", "version_compare", "version_key",
]
