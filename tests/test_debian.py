"""Tests of the jvmkit.packager.debian package: apt sources (sources.py), versions (versions.py),
Release/Packages and the index cache (archive.py), gpgv (signature.py), ar/.deb and safe unpacking
(deb.py), and the download path against a fake archive served on 127.0.0.1 (no real mirror is
contacted). The public API is used through the package's re-exports (`debian.open_archive`, ...)
as callers use it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from jvmkit.errors import JvmkitError
from jvmkit.packager import debian
from jvmkit.packager.debian import sources as apt
from jvmkit.packager.debian import signature, versions
from support.servers import serve_directory

# Documentation addresses only (RFC 5737): no real host name appears in these tests.
MAIN = "http://192.0.2.10/debian"
SECURITY = "http://192.0.2.11/debian-security"


# A fresh cache, no mirror or keyring overrides, and a console whose output the test can read.
pytestmark = pytest.mark.usefixtures("isolated_cache")


# ---- helpers: .deb building ------------------------------------------------------------------------

def ar_archive(members: list[tuple[str, bytes]], style: str = "plain") -> bytes:
    """An ar archive; style plain (dpkg-deb), gnu (name/ and a // long-name table) or bsd (#1/N)."""
    out = bytearray(b"!<arch>\n")
    long_table = b""
    offsets = {}
    if style == "gnu":
        for name, _ in members:
            if len(name) > 15:
                offsets[name] = len(long_table)
                long_table += name.encode() + b"/\n"

    def header(name: str, size: int) -> bytes:
        return (name.encode().ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
                + str(size).encode().ljust(10) + b"`\n")

    def add(name_field: str, data: bytes, prefix: bytes = b"") -> None:
        out.extend(header(name_field, len(prefix) + len(data)))
        out.extend(prefix + data)
        if (len(prefix) + len(data)) % 2:
            out.extend(b"\n")

    if style == "gnu":
        add("/", b"\0\0\0\0")  # an (empty) symbol table, to be skipped
        if long_table:
            add("//", long_table)
    for name, data in members:
        if style == "gnu":
            add(f"/{offsets[name]}" if name in offsets else f"{name}/", data)
        elif style == "bsd":
            add(f"#1/{len(name)}", data, prefix=name.encode())
        else:
            add(name, data)
    return bytes(out)


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(data: bytes, comp: str) -> bytes:
    if comp == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ)
    if comp == "zst":
        return zstandard.ZstdCompressor().compress(data)
    if comp == "gz":
        return gzip.compress(data)
    return data


def tinfo(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.mtime = 1_700_000_000
    return info


def make_deb(data_entries: list[tuple[tarfile.TarInfo, bytes | None]], *, package: str = "demo",
             version: str = "1.0-1", comp: str = "xz", style: str = "plain") -> bytes:
    control = f"Package: {package}\nVersion: {version}\nArchitecture: amd64\nDescription: test\n".encode()
    control_tar = tar_bytes([(tinfo("./"), None), (tinfo("./control"), control)])
    ext = "" if comp == "none" else f".{comp}"
    return ar_archive([("debian-binary", b"2.0\n"), (f"control.tar{ext}", compress(control_tar, comp)),
                       (f"data.tar{ext}", compress(tar_bytes(data_entries), comp))], style=style)


def simple_deb(**kw) -> bytes:
    return make_deb([
        (tinfo("./", tarfile.DIRTYPE, 0o755), None),
        (tinfo("./usr/bin/", tarfile.DIRTYPE, 0o755), None),
        (tinfo("./usr/bin/tool", mode=0o4755), b"#!/bin/sh\necho hi\n"),
        (tinfo("./usr/share/doc/demo/README"), b"read me\n"),
        (tinfo("./bin", tarfile.SYMTYPE, linkname="usr/bin"), None),
        (tinfo("./usr/bin/tool-abs", tarfile.SYMTYPE, linkname="/usr/bin/tool"), None),
        (tinfo("./usr/bin/tool-hard", tarfile.LNKTYPE, linkname="./usr/bin/tool"), None),
        (tinfo("./dev/null", tarfile.CHRTYPE), None),
    ], **kw)


# ---- apt sources ------------------------------------------------------------------------------------

ONE_LINE = f"""\
# comment
deb {MAIN} bookworm main contrib # trailing comment
deb-src {MAIN} bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] {MAIN}/ bookworm-updates main
deb http://192.0.2.20/apt cloud-sdk-bookworm main
deb {SECURITY} bookworm-security main
deb http://192.0.2.21/flat ./
deb [enabled=no] http://192.0.2.22/debian trixie main
"""

DEB822 = f"""\
Types: deb deb-src
# a comment line inside the stanza
URIs: {MAIN} http://192.0.2.12/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY}
Suites: bookworm-security
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 abc
 -----END PGP PUBLIC KEY BLOCK-----

Types: deb
URIs: http://192.0.2.30/node_20.x
Suites: nodistro
Components: main

Types: deb
Enabled: no
URIs: http://192.0.2.31/debian
Suites: sid
Components: main

Types: deb-src
URIs: http://192.0.2.32/debian
Suites: sid
Components: main
"""


def test_parse_one_line_sources():
    sources = apt.parse_sources_list(ONE_LINE, origin="sources.list")
    assert [(s.uri, s.suites, s.components) for s in sources] == [
        (MAIN, ("bookworm",), ("main", "contrib")),
        (MAIN, ("bookworm-updates",), ("main",)),
        ("http://192.0.2.20/apt", ("cloud-sdk-bookworm",), ("main",)),
        (SECURITY, ("bookworm-security",), ("main",)),
    ]
    assert sources[1].signed_by == "/usr/share/keyrings/x.gpg"
    assert sources[0].origin == "sources.list"


def test_parse_deb822_sources():
    sources = apt.parse_sources_deb822(DEB822)
    assert [(s.uri, s.suites) for s in sources] == [
        (MAIN, ("bookworm", "bookworm-updates")),
        ("http://192.0.2.12/debian", ("bookworm", "bookworm-updates")),
        (SECURITY, ("bookworm-security",)),
        ("http://192.0.2.30/node_20.x", ("nodistro",)),
    ]
    assert sources[0].signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert sources[2].signed_by is None  # an inline key is not a path


def test_read_apt_sources_reads_list_and_sources_files_only(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(f"deb {MAIN} bookworm main\n")
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    (etc / "sources.list.d" / "extra.list").write_text(f"deb {SECURITY} bookworm-security main\n")
    (etc / "sources.list.d" / "old.list.disabled-by-admin").write_text("deb http://192.0.2.40/x bookworm main\n")
    (etc / "sources.list.d" / "x.sources.save").write_text("Types: deb\nURIs: http://192.0.2.41/y\n")
    uris = [s.uri for s in apt.read_apt_sources(etc)]
    assert "http://192.0.2.40/x" not in uris and "http://192.0.2.41/y" not in uris
    assert uris[0] == MAIN and SECURITY in uris and "http://192.0.2.30/node_20.x" in uris


@pytest.mark.parametrize("line, expected", [
    (f"deb {MAIN} bookworm main", True),
    (f"deb {SECURITY} bookworm-security main", True),
    ("deb http://192.0.2.1/anything stable main contrib", True),
    ("deb http://192.0.2.1/debian trixie-backports main", True),
    ("deb http://192.0.2.1/apt cloud-sdk-bookworm main", False),        # google-style
    ("deb http://192.0.2.1/node_20.x nodistro main", False),            # nodesource
    ("deb http://192.0.2.1/linux/debian bookworm stable", False),       # docker: component 'stable'
    ("deb http://192.0.2.1/apt bookworm-pgdg main", False),             # postgresql
    ("deb http://192.0.2.1/apt/debian bookworm/mongodb-org/7.0 main", False),
    ("deb http://192.0.2.1/ubuntu jammy main", False),
])
def test_is_debian_source(line, expected):
    (source,) = apt.parse_sources_list(line)
    assert apt.is_debian_source(source) is expected


def test_plan_slots_from_apt_sources():
    sources = (apt.parse_sources_deb822(DEB822)
               + apt.parse_sources_list("deb http://192.0.2.1/apt cloud-sdk-bookworm main"))
    slots = apt.plan_slots("bookworm", sources)
    assert [(s.suite, [r.uri for r in s.repos], s.required) for s in slots] == [
        ("bookworm", [MAIN, "http://192.0.2.12/debian"], True),
        ("bookworm-updates", [MAIN, "http://192.0.2.12/debian"], False),
        ("bookworm-security", [SECURITY], False),
    ]
    # another suite than apt's: same mirrors; a suffixed suite alone
    assert [s.suite for s in apt.plan_slots("trixie", sources)] == ["trixie", "trixie-updates", "trixie-security"]
    assert [s.suite for s in apt.plan_slots("bookworm-backports", sources)] == ["bookworm-backports"]


def test_plan_slots_explicit_mirror_and_no_debian_source():
    slots = apt.plan_slots("bookworm", [], mirror="http://127.0.0.1:1/debian/")
    assert [(s.suite, s.repos[0].uri, s.required) for s in slots] == [
        ("bookworm", "http://127.0.0.1:1/debian", True), ("bookworm-updates", "http://127.0.0.1:1/debian", False)]
    with pytest.raises(JvmkitError, match="--mirror"):
        apt.plan_slots("bookworm", apt.parse_sources_list("deb http://192.0.2.1/node nodistro main"))


def test_host_suite(tmp_path, monkeypatch):
    osr = tmp_path / "os-release"
    osr.write_text('ID=debian\nVERSION_CODENAME=trixie\nPRETTY_NAME="Debian"\n')
    assert apt.host_suite(osr) == "trixie"
    osr.write_text("ID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=jammy\n")
    assert apt.host_suite(osr) is None
    assert apt.host_suite(tmp_path / "missing") is None
    monkeypatch.setattr(apt, "host_suite", lambda *a: "trixie")  # choose_suite looks it up in sources.py
    assert apt.choose_suite(None) == "trixie"
    monkeypatch.setattr(apt, "host_suite", lambda *a: None)
    assert apt.choose_suite(None) == apt.DEFAULT_SUITE == "bookworm"
    assert apt.choose_suite("sid") == "sid"


# ---- Release and Packages ---------------------------------------------------------------------------

PACKAGES = """\
Package: busybox-static
Version: 1:1.35.0-4+b1
Architecture: amd64
Depends: libc6 (>= 2.34)
Description: a long
 description over
 .
 several lines
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+b1_amd64.deb
Size: 928188
SHA256: 3D3FDBE91D4660C873E14B092C213FE81C1DA6362DAA236EB25D0171EB108744

Package: linux-image-cloud-amd64
Version: 6.1.176-1
Architecture: amd64
Provides: wireguard-modules (= 1.0.0)
Pre-Depends: dpkg (>= 1.19)
Depends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)
Filename: pool/main/l/linux-signed-amd64/linux-image-cloud-amd64_6.1.176-1_amd64.deb
Size: 1500
SHA256: 6f32a25a6ee7b58852de01577ba261fda873c3002c736a2148bf0a6593bd93c8

Package: no-digest
Version: 1
Filename: pool/x.deb
"""


def test_parse_packages():
    pkgs = debian.parse_packages(PACKAGES, base_uri=MAIN, suite="bookworm")
    assert [p.name for p in pkgs] == ["busybox-static", "linux-image-cloud-amd64"]
    bb, meta = pkgs
    assert bb.version == "1:1.35.0-4+b1" and bb.size == 928188 and bb.sha256.startswith("3d3fdbe9")
    assert bb.url == f"{MAIN}/pool/main/b/busybox/busybox-static_1.35.0-4+b1_amd64.deb"
    assert meta.depends == "dpkg (>= 1.19), linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)"
    assert meta.relations()[1] == [debian.Relation("linux-image-6.1.0-50-cloud-amd64", "=", "6.1.176-1")]
    assert meta.provided() == [debian.Relation("wireguard-modules", "=", "1.0.0")]
    only = debian.parse_packages(PACKAGES, want=lambda n: n.startswith("linux-"))
    assert [p.name for p in only] == ["linux-image-cloud-amd64"]


def test_parse_relations_and_satisfies():
    rels = versions.parse_relations("libc6:any (>= 2.34) | libc6.1 [amd64], foo (<< 2~), bar")
    assert rels == [[versions.Relation("libc6", ">=", "2.34"), versions.Relation("libc6.1")],
                    [versions.Relation("foo", "<<", "2~")], [versions.Relation("bar")]]
    assert versions.satisfies("2.36-9", ">=", "2.34")
    assert not versions.satisfies("2", "<<", "2~")
    assert versions.satisfies("1.9", "<<", "2~")
    assert versions.satisfies("1:0", ">>", "9")
    assert versions.satisfies("anything", None, None)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_release_clearsigned_and_digest_verification():
    packages_xz = lzma.compress(b"Package: a\n")
    body = (f"Origin: Debian\nSuite: stable\nCodename: bookworm\nAcquire-By-Hash: yes\nSHA256:\n"
            f" {sha(packages_xz)} {len(packages_xz):>8} main/binary-amd64/Packages.xz\n"
            f" {'0' * 64}        0 main/binary-amd64/Packages\n"
            f" not-a-digest 12 junk\n"
            f"- dash-escaped: not a real field\n")
    signed = ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
              + body.replace("- dash", "- - dash")
              + "-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n"
              + "Origin: Attacker\n")
    rel = debian.parse_release(signed)
    assert rel.origin == "Debian" and rel.codename == "bookworm" and rel.suite == "stable" and rel.by_hash
    assert rel.sha256["main/binary-amd64/Packages.xz"] == (len(packages_xz), sha(packages_xz))
    assert set(rel.sha256) == {"main/binary-amd64/Packages.xz", "main/binary-amd64/Packages"}
    debian.verify_digest(packages_xz, rel.sha256["main/binary-amd64/Packages.xz"], "Packages.xz")
    with pytest.raises(JvmkitError) as err:
        debian.verify_digest(packages_xz + b"x", rel.sha256["main/binary-amd64/Packages.xz"], "Packages.xz")
    assert sha(packages_xz + b"x") in str(err.value) and sha(packages_xz) in str(err.value)
    assert debian.parse_release(body).origin == "Debian"  # an unsigned Release reads the same


# ---- versions -----------------------------------------------------------------------------------------

VERSIONS = [
    ("1.0", "1.0", 0),
    ("1.0", "1.1", -1),
    ("1.1", "1.0", 1),
    ("1.0~rc1", "1.0", -1),
    ("1.0~~", "1.0~", -1),
    ("1.0~~a", "1.0~~", 1),
    ("1.0", "1.0+b1", -1),
    ("1.0a", "1.0", 1),
    ("1.0.", "1.0", 1),
    ("1.0", "1.0-0", 0),
    ("1.002", "1.2", 0),
    ("2.30", "2.3", 1),
    ("2.9", "2.10", -1),
    ("1:0.1", "2.0", 1),
    ("0:1.0", "1.0", 0),
    ("1.0-1", "1.0-2", -1),
    ("1.0-1~bpo12+1", "1.0-1", -1),
    ("1.0-10", "1.0-9", 1),
    ("1.0a-1", "1.0+-1", -1),
    ("6.1.176-1", "6.1.192-2", -1),
    ("6.12.57-1~bpo12+1", "6.1.192-2", 1),
    ("1:1.35.0-4+deb12u1+b1", "1:1.35.0-4+deb12u1", 1),
    ("1:1.35.0-4", "1.36.0-1", 1),
    ("3.0-1", "3.0-1.1", -1),
    ("a", "b", -1),
]


@pytest.mark.parametrize("a, b, expected", VERSIONS)
def test_version_compare(a, b, expected):
    assert versions.version_compare(a, b) == expected
    assert versions.version_compare(b, a) == -expected


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="dpkg not installed (cross-check of the table only)")
def test_version_table_agrees_with_dpkg():
    for a, b, expected in VERSIONS:
        op = {0: "eq", -1: "lt", 1: "gt"}[expected]
        assert subprocess.run(["dpkg", "--compare-versions", a, op, b]).returncode == 0, (a, op, b)


def test_newest_by_version_key():
    assert max(["6.1.176-1", "6.1.192-2", "6.1.99-1", "6.1.192-2~bpo"], key=versions.version_key) == "6.1.192-2"


# ---- ar and .deb -------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["plain", "gnu", "bsd"])
def test_read_ar_name_styles(style):
    members = [("debian-binary", b"2.0\n"), ("odd", b"abc"), ("data.tar.xz", b"xy")]
    if style != "plain":  # ar's 16-byte name field: longer names need the GNU table or BSD #1/N
        members.append(("a-very-long-member-name.txt", b"long"))
    data = ar_archive(members, style=style)
    found = debian.read_ar(io.BytesIO(data))
    assert [m.name for m in found] == [m[0] for m in members]
    for member, (_name, content) in zip(found, members):
        assert data[member.offset:member.offset + member.size] == content


def test_read_ar_rejects_garbage():
    with pytest.raises(JvmkitError, match="not an ar archive"):
        debian.read_ar(io.BytesIO(b"PK\x03\x04 not an ar"))
    with pytest.raises(JvmkitError, match="corrupt"):
        debian.read_ar(io.BytesIO(b"!<arch>\n" + b"x" * 60))


@pytest.mark.parametrize("comp", ["xz", "zst", "gz", "none"])
def test_deb_unpack(tmp_path, comp):
    path = tmp_path / "demo.deb"
    path.write_bytes(simple_deb(comp=comp, style="gnu" if comp == "gz" else "plain"))
    deb = debian.Deb(path)
    assert deb.control["package"] == "demo" and deb.control["version"] == "1.0-1"
    dest = tmp_path / "out"
    written = deb.extract(dest)
    assert "usr/bin/tool" in written and "dev/null" not in written
    tool = dest / "usr/bin/tool"
    assert tool.read_text() == "#!/bin/sh\necho hi\n"
    assert oct(tool.stat().st_mode & 0o7777) == oct(0o755)  # setuid dropped
    assert (dest / "usr/share/doc/demo/README").stat().st_mode & 0o777 == 0o644
    assert os.readlink(dest / "bin") == "usr/bin"
    assert os.readlink(dest / "usr/bin/tool-abs") == "tool"  # absolute link made relative to dest
    assert (dest / "usr/bin/tool-hard").read_text() == tool.read_text()
    assert not (dest / "dev/null").exists()
    assert (dest / "bin/tool").read_text() == tool.read_text()


def test_deb_extract_select(tmp_path):
    path = tmp_path / "demo.deb"
    path.write_bytes(simple_deb())
    written = debian.extract_deb(path, tmp_path / "out", select=lambda p: p.startswith("usr/share/"))
    assert written == ["usr/share/doc/demo/README"]
    assert not (tmp_path / "out/usr/bin/tool").exists()


def test_not_a_deb(tmp_path):
    path = tmp_path / "x.deb"
    path.write_bytes(ar_archive([("control.tar.xz", b"")]))
    with pytest.raises(JvmkitError, match="debian-binary"):
        debian.Deb(path)


@pytest.mark.parametrize("entry, message", [
    ((tinfo("/etc/passwd"), b"x"), "absolute"),
    ((tinfo("../evil"), b"x"), r"'\.\.'"),
    ((tinfo("./usr/../../evil"), b"x"), r"'\.\.'"),
    ((tinfo("./link", tarfile.SYMTYPE, linkname="../../outside"), None), "outside"),
    ((tinfo("./usr/link", tarfile.SYMTYPE, linkname="../../etc"), None), "outside"),
    ((tinfo("./hard", tarfile.LNKTYPE, linkname="../outside"), None), r"'\.\.'"),
])
def test_unsafe_members_are_refused(tmp_path, entry, message):
    path = tmp_path / "evil.deb"
    path.write_bytes(make_deb([(tinfo("./usr/", tarfile.DIRTYPE, 0o755), None), entry]))
    dest = tmp_path / "dest" / "out"
    with pytest.raises(JvmkitError, match=message):
        debian.extract_deb(path, dest)
    assert not (tmp_path / "dest" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not (tmp_path / "dest" / "outside").exists()


def test_symlink_chains_cannot_escape(tmp_path):
    """`b -> .` then `a -> b/../x` looks inside lexically but resolves outside: refused."""
    path = tmp_path / "evil.deb"
    path.write_bytes(make_deb([
        (tinfo("./b", tarfile.SYMTYPE, linkname="."), None),
        (tinfo("./a", tarfile.SYMTYPE, linkname="b/../x"), None),
    ]))
    with pytest.raises(JvmkitError, match="outside"):
        debian.extract_deb(path, tmp_path / "out")


def test_writing_through_a_symlinked_directory_stays_inside(tmp_path):
    path = tmp_path / "ok.deb"
    path.write_bytes(make_deb([
        (tinfo("./real/", tarfile.DIRTYPE, 0o755), None),
        (tinfo("./alias", tarfile.SYMTYPE, linkname="real"), None),
        (tinfo("./alias/file"), b"data"),
    ]))
    debian.extract_deb(path, tmp_path / "out")
    assert (tmp_path / "out/real/file").read_bytes() == b"data"


def test_corrupt_data_member(tmp_path):
    path = tmp_path / "bad.deb"
    path.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.xz", b""),
                                 ("data.tar.xz", b"\xfd7zXZ\x00garbage")]))
    with pytest.raises(JvmkitError, match="corrupt"):
        debian.extract_deb(path, tmp_path / "out")


# ---- a fake archive on 127.0.0.1 --------------------------------------------------------------------

class FakeArchive:
    def __init__(self, root: Path, url: str, seen: list[str]):
        self.root, self.url, self.seen = root, url, seen

    def add_suite(self, suite: str, debs: list[tuple[str, str, bytes]], *, origin: str = "Debian",
                  codename: str | None = None, by_hash: bool = False, bad_digest: bool = False,
                  inrelease: str | None = None) -> dict[str, debian.Package]:
        stanzas = []
        for name, version, data in debs:
            filename = f"pool/main/{name[0]}/{name}/{name}_{version.split(':')[-1]}_amd64.deb"
            (self.root / filename).parent.mkdir(parents=True, exist_ok=True)
            (self.root / filename).write_bytes(data)
            stanzas.append(f"Package: {name}\nVersion: {version}\nArchitecture: amd64\nFilename: {filename}\n"
                           f"Size: {len(data)}\nSHA256: {sha(data)}\nDescription: x\n")
        text = "\n".join(stanzas).encode()
        xz = lzma.compress(text)
        dists = self.root / "dists" / suite
        binary = dists / "main/binary-amd64"
        binary.mkdir(parents=True, exist_ok=True)
        listed = sha(b"tampered") if bad_digest else sha(xz)
        if by_hash:
            (binary / "by-hash/SHA256").mkdir(parents=True, exist_ok=True)
            (binary / "by-hash/SHA256" / sha(xz)).write_bytes(xz)
        else:
            (binary / "Packages.xz").write_bytes(xz)
        release = (f"Origin: {origin}\nLabel: Debian\nSuite: {suite}\nCodename: {codename or suite}\n"
                   f"Acquire-By-Hash: {'yes' if by_hash else 'no'}\nSHA256:\n"
                   f" {listed} {len(xz):>9} main/binary-amd64/Packages.xz\n"
                   f" {sha(text)} {len(text):>9} main/binary-amd64/Packages\n")
        if inrelease is not None:
            (dists / "InRelease").write_text(inrelease.replace("@BODY@", release))
        else:
            (dists / "Release").write_text(release)
        return {p.name: p for p in debian.parse_packages(text.decode(), base_uri=self.url, suite=suite)}

    def requests_for(self, fragment: str) -> int:
        return sum(fragment in path for path in self.seen)

    def requests_ending(self, suffix: str) -> int:
        return sum(path.endswith(suffix) for path in self.seen)


@pytest.fixture
def fake_archive(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with serve_directory(root) as (base, seen):
        yield FakeArchive(root, f"{base}/debian", seen)


@pytest.fixture
def fake_archive_root(fake_archive):
    # the archive lives under /debian on the server
    real = fake_archive.root / "debian"
    real.mkdir()
    fake_archive.root = real
    return fake_archive


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/debian"


def test_open_archive_downloads_verifies_and_caches(fake_archive_root, isolated_cache):
    fa = fake_archive_root
    deb_v1 = simple_deb(version="1.0-1")
    deb_v2 = simple_deb(version="1.0-2")
    fa.add_suite("bookworm", [("demo", "1.0-1", deb_v1), ("other", "3", b"x")])
    fa.add_suite("bookworm-updates", [("demo", "1.0-2", deb_v2)], by_hash=True)
    archive = debian.open_archive("bookworm", fa.url)
    assert [i.repo.suite for i in archive.indexes] == ["bookworm", "bookworm-updates"]
    assert not archive.verified and "not verified" in archive.indexes[0].signature
    newest = archive.newest("demo")
    assert newest.version == "1.0-2" and newest.suite == "bookworm-updates"
    assert archive.find(debian.Relation("demo", "<<", "1.0-2")).version == "1.0-1"
    assert fa.requests_for("by-hash/SHA256/") == 1

    # second time: from the cache, no requests at all
    before = len(fa.seen)
    again = debian.open_archive("bookworm", fa.url)
    assert len(fa.seen) == before and all(i.from_cache for i in again.indexes)
    # refresh: downloaded again
    debian.open_archive("bookworm", fa.url, refresh=True)
    assert fa.requests_ending("/dists/bookworm/Release") == 2
    # an index older than INDEX_MAX_AGE is downloaded again
    age_index_cache()
    debian.open_archive("bookworm", fa.url)
    assert fa.requests_ending("/dists/bookworm/Release") == 3


def age_index_cache() -> None:
    for meta_path in Path(os.environ["JVMKIT_CACHE"]).glob("debian/indexes/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["fetched"] = time.time() - 2 * debian.INDEX_MAX_AGE
        meta_path.write_text(json.dumps(meta))


def test_open_archive_env_mirror_and_want_filter(fake_archive_root, monkeypatch):
    fa = fake_archive_root
    fa.add_suite("trixie", [("demo", "2", b"a"), ("other", "1", b"b")])
    monkeypatch.setenv("JVMKIT_DEBIAN_MIRROR", fa.url)
    archive = debian.open_archive("trixie", want=lambda n: n == "demo")
    assert [p.name for p in archive.indexes[0].packages] == ["demo"]


def test_packages_digest_mismatch_is_refused(fake_archive_root):
    fa = fake_archive_root
    fa.add_suite("bookworm", [("demo", "1", b"x")], bad_digest=True)
    with pytest.raises(JvmkitError) as err:
        debian.open_archive("bookworm", fa.url)
    assert "does not match" in str(err.value) and sha(b"tampered") in str(err.value)
    assert not list(Path(os.environ["JVMKIT_CACHE"]).glob("debian/indexes/*/meta.json"))


def test_wrong_suite_and_missing_suite(fake_archive_root):
    fa = fake_archive_root
    fa.add_suite("bookworm", [("demo", "1", b"x")], codename="bookworm")
    (fa.root / "dists/bookworm/Release").replace(fa.root / "dists/bookworm/Release.tmp")
    (fa.root / "dists/trixie").mkdir(parents=True)
    (fa.root / "dists/bookworm/Release.tmp").replace(fa.root / "dists/trixie/Release")
    with pytest.raises(JvmkitError, match="not trixie"):
        debian.open_archive("trixie", fa.url)
    with pytest.raises(JvmkitError, match="'sid' was not found"):
        debian.open_archive("sid", fa.url)


def test_apt_sources_skip_a_non_debian_origin(fake_archive, tmp_path):
    fa = fake_archive
    other, real = fa.root / "other", fa.root / "debian"
    fa.root = other
    fa.add_suite("bookworm", [("demo", "9", b"evil")], origin="Unofficial Multimedia Packages")
    fa.root = real
    base = fa.url.rsplit("/", 1)[0]
    fa.add_suite("bookworm", [("demo", "1", b"good")])
    sources = debian.parse_sources_list(f"deb {base}/other bookworm main\ndeb {base}/debian bookworm main\n")
    archive = debian.open_archive("bookworm", sources=sources)
    assert archive.indexes[0].repo.uri == f"{base}/debian"
    assert archive.newest("demo").version == "1"


@pytest.mark.skipif(shutil.which("gpgv") is None or not debian.DEFAULT_KEYRING.is_file(),
                    reason="needs gpgv and the Debian archive keyring")
def test_bad_inrelease_signature_is_refused(fake_archive_root):
    fa = fake_archive_root
    fake = ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n@BODY@-----BEGIN PGP SIGNATURE-----\n\n"
            "iQIzBAEBCAAdFiEEAAAAAAAAAAAAAAAAAAAAAAAAAAAWBQJlAAAAAAoJEAAAAAAAAAAAAAA=\n=AAAA\n"
            "-----END PGP SIGNATURE-----\n")
    fa.add_suite("bookworm", [("demo", "1", b"x")], inrelease=fake)
    with pytest.raises(JvmkitError, match="did not verify"):
        debian.open_archive("bookworm", fa.url)


def host_inrelease() -> Path | None:
    """An InRelease apt downloaded on this host (really signed by Debian), if any."""
    return next(iter(sorted(Path("/var/lib/apt/lists").glob("*_dists_*_InRelease"))), None)


@pytest.mark.skipif(shutil.which("gpgv") is None or not debian.DEFAULT_KEYRING.is_file() or host_inrelease() is None,
                    reason="needs gpgv, the Debian archive keyring and an InRelease file apt downloaded")
def test_a_real_inrelease_verifies_and_tampering_is_refused(tmp_path):
    real, keyring = host_inrelease(), debian.DEFAULT_KEYRING
    assert signature.verify_signature(real, None, keyring, "InRelease") == f"verified (gpgv, {keyring})"
    text = real.read_text()
    changed = tmp_path / "InRelease"
    changed.write_text(text.replace("Origin: Debian", "Origin: Debiam", 1))
    with pytest.raises(JvmkitError, match="did not verify"):
        signature.verify_signature(changed, None, keyring, "InRelease")
    changed.write_text("Origin: Attacker\n\n" + text)  # gpgv accepts text before the signed block; we don't
    with pytest.raises(JvmkitError, match="signed text differs"):
        signature.verify_signature(changed, None, keyring, "InRelease")


def test_keyring_none_skips_verification(fake_archive_root, monkeypatch):
    fa = fake_archive_root
    fa.add_suite("bookworm", [("demo", "1", b"x")],
                 inrelease="-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n@BODY@"
                           "-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n")
    monkeypatch.setenv("JVMKIT_DEBIAN_KEYRING", "none")
    archive = debian.open_archive("bookworm", fa.url)
    assert "disabled" in archive.indexes[0].signature and archive.newest("demo").version == "1"


def test_offline_with_nothing_cached_is_one_clear_error():
    with pytest.raises(debian.ArchiveUnavailable) as err:
        debian.open_archive("bookworm", closed_port_url())
    text = str(err.value)
    assert "not reachable" in text and "--mirror" in text and "JVMKIT_DEBIAN_MIRROR" in text
    assert "jvmkit kernel import" in text


def test_offline_uses_a_stale_cached_index(fake_archive_root, isolated_cache, monkeypatch):
    fa = fake_archive_root
    fa.add_suite("bookworm", [("demo", "1", b"x")])
    debian.open_archive("bookworm", fa.url)
    age_index_cache()
    monkeypatch.setattr(debian.archive, "session", lambda: _Unreachable())  # where open_archive looks it up
    archive = debian.open_archive("bookworm", fa.url)
    assert archive.newest("demo").version == "1" and archive.indexes[0].from_cache
    assert "using the cached index" in isolated_cache.stream.getvalue()


class _Unreachable:
    headers: dict = {}

    def get(self, url, **kw):
        import requests

        raise requests.ConnectionError(f"Connection refused: {url}")


def test_fetch_deb_progress_cache_and_reuse(fake_archive_root, isolated_cache):
    fa = fake_archive_root
    data = simple_deb() + b"\0" * 300_000
    pkgs = fa.add_suite("bookworm", [("demo", "1.0-1", data)])
    path = debian.fetch_deb(pkgs["demo"])
    assert path.read_bytes() == data and path.name == f"{sha(data)}.deb"
    assert "demo 1.0-1" in isolated_cache.stream.getvalue()  # the progress bar's label
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f".{path.stem}.lock"])  # no temporaries
    n = fa.requests_for("pool/")
    assert debian.fetch_deb(pkgs["demo"]) == path and fa.requests_for("pool/") == n  # reused
    path.write_bytes(b"corrupted")  # a damaged cache file is replaced
    assert debian.fetch_deb(pkgs["demo"]).read_bytes() == data and fa.requests_for("pool/") == n + 1


def test_fetch_deb_digest_mismatch_deletes_and_refuses(fake_archive_root):
    fa = fake_archive_root
    pkgs = fa.add_suite("bookworm", [("demo", "1.0-1", b"the real bytes")])
    (fa.root / pkgs["demo"].filename).write_bytes(b"something else")
    with pytest.raises(JvmkitError) as err:
        debian.fetch_deb(pkgs["demo"])
    text = str(err.value)
    assert "demo" in text and sha(b"something else") in text and sha(b"the real bytes") in text
    debs = Path(os.environ["JVMKIT_CACHE"]) / "debian" / "debs"
    assert not [p for p in debs.iterdir() if not p.name.endswith(".lock")]


def test_fetch_deb_404_and_unreachable(fake_archive_root):
    fa = fake_archive_root
    pkgs = fa.add_suite("bookworm", [("demo", "1", b"x")])
    (fa.root / pkgs["demo"].filename).unlink()
    with pytest.raises(JvmkitError, match="HTTP 404"):
        debian.fetch_deb(pkgs["demo"])
    gone = debian.Package(**{**pkgs["demo"].__dict__, "base_uri": closed_port_url()})
    with pytest.raises(debian.MirrorUnreachable, match="not reachable"):
        debian.fetch_deb(gone)


def test_no_host_name_is_hard_coded():
    from jvmkit import fetch
    from jvmkit.packager.kernels import bzimage, linux, modules, store

    files = sorted(Path(debian.__file__).parent.glob("*.py")) + [Path(m.__file__) for m in (fetch, linux, store, bzimage, modules)]
    assert len(files) >= 10
    for path in files:
        source = path.read_text()
        assert "debian.org" not in source and not re.search(r"https?://", source), path
