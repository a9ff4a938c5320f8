"""OSv kernels: release pulls against a local HTTP server (digests, progress, caching, refusals),
imports of fake kernels (PVH note, version, balloon driver, loader images), and the order in which
`pack` picks a kernel. No network beyond 127.0.0.1. One test reads a real OSv kernel when there is
one ($JVMKIT_OSV_KERNEL, or a bootable kernel in the cache) and checks it against readelf."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import re
import shutil
import socket
import struct
import threading
from functools import partial
from pathlib import Path

import pytest

from jvmkit import cache, proc, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import elf as elfs
from jvmkit.packager.kernels import osv, store
from support.vms import osv_kernel_path
from jvmkit.packager.kernels.osv import (
    ELF_ASSET, LOADER_ASSET, import_osv, list_osv_kernels, pull_osv, resolve_osv_kernel,
)

TAG = "v9.9.9"


REAL_KERNEL = osv_kernel_path()  # read at import, before the fixtures switch caches


def fake_kernel(pvh: bool = True, version: str | None = "v9.9.9-1-gabcdef0", balloon: bool = False,
                filler: int = 70000) -> bytes:
    """A little-endian ELF64 with (optionally) a PT_NOTE holding a Xen PVH entry note, the version
    banner OSv prints at boot, and the virtio-balloon driver's message."""
    notes = b""
    if pvh:
        notes += struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x20101C)
    notes += struct.pack("<III", 4, 4, 6) + b"Xen\0" + b"osv\0"  # another Xen note, not the entry
    body = b"\x90" * filler
    if version:
        body += b"OSv " + version.encode() + b"\n\0"
    if balloon:
        body += b"virtio-balloon: ready\n\0"
    phnum = 2
    note_off = 64 + 56 * phnum
    total = note_off + len(notes) + len(body)
    ehdr = (b"\x7fELF\x02\x01\x01" + b"\0" * 9
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x200000, 64, 0, 0, 64, 56, phnum, 64, 0, 0))
    load = struct.pack("<IIQQQQQQ", 1, 7, 0, 0x200000, 0x200000, total, total, 0x1000)
    note = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    return ehdr + load + note + notes + body


def fake_loader_image(kernel_version: str | None = "v9.9.9-1-gabcdef0") -> bytes:
    boot = bytearray(512)
    boot[510:512] = b"\x55\xaa"
    lz = fake_kernel(pvh=False, version=kernel_version, filler=3000)
    return bytes(boot) + b"\0" * (128 * 512 - 512) + lz


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(osv.URL_ENV, raising=False)
    monkeypatch.delenv(osv.KERNEL_ENV, raising=False)
    monkeypatch.setattr(osv, "KNOWN_RELEASES", {})
    stream = io.StringIO()
    monkeypatch.setattr(ui, "_current", ui.Console(stream=stream))
    return stream


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        return super().do_GET()


@pytest.fixture
def server(tmp_path):
    """A release server on 127.0.0.1: tmp/srv/<tag>/{assets, SHA256SUMS}."""
    root = tmp_path / "srv"
    (root / TAG).mkdir(parents=True)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield type("Server", (), {"root": root, "dir": root / TAG, "requests": httpd.requests,
                              "url": f"http://127.0.0.1:{httpd.server_address[1]}/{{tag}}/"})
    httpd.shutdown()
    httpd.server_close()


def publish(server, elf: bytes, loader: bytes | None = None, sums: bool = True, sums_override: dict | None = None):
    gz = gzip.compress(elf, mtime=0)
    (server.dir / ELF_ASSET).write_bytes(gz)
    digests = {ELF_ASSET: sha(gz)}
    if loader is not None:
        (server.dir / LOADER_ASSET).write_bytes(loader)
        digests[LOADER_ASSET] = sha(loader)
    digests.update(sums_override or {})
    if sums:
        (server.dir / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in digests.items()))
    return gz


def kernel_dirs() -> list[Path]:
    base = cache.cache_root() / "kernels" / "osv"
    return sorted(p for p in base.iterdir() if not p.name.startswith(".")) if base.is_dir() else []


# ---- pure ---------------------------------------------------------------------------------------------

def test_inspect_and_detect():
    elf = fake_kernel(balloon=True)
    assert elfs.pvh_entry(elf) == 0x20101C
    assert osv.inspect_elf(elf) == {"has_pvh": True, "pvh_entry": "0x20101c",
                                    "version": "v9.9.9-1-gabcdef0", "has_balloon": True}
    plain = fake_kernel(pvh=False, version=None)
    assert osv.inspect_elf(plain) == {"has_pvh": False, "pvh_entry": None, "version": None,
                                      "has_balloon": False}
    assert osv.detect_kind(elf) == "elf"
    assert osv.detect_kind(gzip.compress(elf)) == "gzip"
    assert osv.detect_kind(fake_loader_image()) == "loader-image"
    assert osv.detect_kind(b"\0" * 70000) is None
    assert osv.osv_version(b"xx\0OSv v0.57.0-398-g0e34e4dc\n\0OSv options:\n") == "v0.57.0-398-g0e34e4dc"
    assert osv.osv_version(b"OSv options:\n") is None


def test_parse_sha256sums_and_urls(monkeypatch):
    a, b = "a" * 64, "B" * 64
    assert osv.parse_sha256sums(f"{a}  osv-loader.elf.x86_64.gz\n{b} *dir/x.img\nbad line\n\n") == {
        "osv-loader.elf.x86_64.gz": a, "x.img": b.lower()}
    assert osv.release_url("v0.57.0") == \
        "https://github.com/cloudius-systems/osv/releases/download/v0.57.0/"
    assert osv.release_url("v1", "http://127.0.0.1:9/r/{tag}") == "http://127.0.0.1:9/r/v1/"
    assert osv.release_url("v1", "http://127.0.0.1:9/mirror/") == "http://127.0.0.1:9/mirror/"
    monkeypatch.setenv(osv.URL_ENV, "http://127.0.0.1:9/env/{tag}/")
    assert osv.release_url("v2") == "http://127.0.0.1:9/env/v2/"
    with pytest.raises(UsageError):
        osv.check_digest("abc", "--sha256")
    assert osv.check_digest("sha256:" + "C" * 64, "--sha256") == "c" * 64


# ---- pull ---------------------------------------------------------------------------------------------

def test_pull_with_sha256sums(server, isolated):
    elf = fake_kernel(balloon=False)
    loader = fake_loader_image()
    gz = publish(server, elf, loader)
    kernel = pull_osv(TAG, base_url=server.url)
    assert kernel.elf.read_bytes() == elf and kernel.loader_image.read_bytes() == loader
    assert kernel.sha256 == sha(elf) and kernel.size == len(elf)
    assert kernel.has_pvh and kernel.has_balloon is False and kernel.source == "release" and kernel.tag == TAG
    assert kernel.version == "v9.9.9-1-gabcdef0"
    info = kernel.describe()
    assert info["name"] == "osv" and info["sha256"] == sha(elf) and info["loader_image"] is True
    assert info["path"] == str(kernel.path) and kernel.path.name == f"release-{TAG}-{sha(gz)[:12]}"
    meta = json.loads((kernel.path / "kernel.json").read_text())
    assert meta["assets"][ELF_ASSET]["sha256"] == sha(gz) and meta["digest_origin"] == "SHA256SUMS"
    assert not (kernel.path / ELF_ASSET).exists()  # only the gunzipped loader is kept
    out = isolated.getvalue()
    assert f"OSv {TAG} {ELF_ASSET}" in out and "MiB" in out  # the progress bar
    assert "integrity, not authenticity" in out
    (row,) = list_osv_kernels()
    assert row["target"] == "osv" and row["sha256"] == sha(elf) and row["version"] == kernel.version
    assert row["size"] == len(elf) and row["path"] == str(kernel.path)


def test_pull_is_cached(server, isolated):
    publish(server, fake_kernel())
    first = pull_osv(TAG, base_url=server.url)
    assert first.loader_image is None  # no loader asset published: not needed, not fetched
    downloads = [r for r in server.requests if r.endswith(ELF_ASSET)]
    requests_before = len(server.requests)
    second = pull_osv(TAG, base_url=server.url)
    assert second == first
    assert len(server.requests) == requests_before  # no network for a release pulled before
    assert "already in the cache" in isolated.getvalue()
    gz = (server.dir / ELF_ASSET).read_bytes()
    third = pull_osv(TAG, base_url=server.url, sha256=sha(gz))  # a given digest finds the same entry
    assert third == first
    assert [r for r in server.requests if r.endswith(ELF_ASSET)] == downloads


def test_pull_with_explicit_digest_and_no_sums(server):
    gz = publish(server, fake_kernel(), sums=False)
    with pytest.raises(JvmkitError) as refused:
        pull_osv(TAG, base_url=server.url)
    message = str(refused.value)
    assert "no SHA-256 digest" in message and "--sha256" in message and "jvmkit kernel import osv" in message
    assert kernel_dirs() == []
    kernel = pull_osv(TAG, base_url=server.url, sha256=sha(gz).upper())
    assert kernel.has_pvh and json.loads((kernel.path / "kernel.json").read_text())["digest_origin"] == "given"


def test_pull_pinned_digest(server, monkeypatch):
    gz = publish(server, fake_kernel(), sums=False)
    monkeypatch.setitem(osv.KNOWN_RELEASES, TAG, {ELF_ASSET: sha(gz)})
    kernel = pull_osv(TAG, base_url=server.url)
    assert json.loads((kernel.path / "kernel.json").read_text())["digest_origin"] == "pinned"


def test_pull_digest_mismatch_leaves_nothing(server):
    publish(server, fake_kernel(), sums_override={ELF_ASSET: "0" * 64})
    with pytest.raises(JvmkitError, match="does not match its SHA-256"):
        pull_osv(TAG, base_url=server.url)
    assert kernel_dirs() == [] and list_osv_kernels() == []
    with pytest.raises(JvmkitError, match="does not match"):
        pull_osv(TAG, base_url=server.url, sha256="1" * 64)
    assert kernel_dirs() == []


def test_pull_loader_mismatch_leaves_nothing(server):
    publish(server, fake_kernel(), fake_loader_image(), sums_override={LOADER_ASSET: "2" * 64})
    with pytest.raises(JvmkitError, match=LOADER_ASSET):
        pull_osv(TAG, base_url=server.url)
    assert kernel_dirs() == []


def test_pull_kernel_without_pvh_is_refused(server):
    publish(server, fake_kernel(pvh=False))
    with pytest.raises(JvmkitError, match="PVH"):
        pull_osv(TAG, base_url=server.url)
    assert kernel_dirs() == []


def test_pull_missing_release(server):
    (server.root / "v0.0.1").mkdir()
    (server.root / "v0.0.1" / "SHA256SUMS").write_text(f"{'a' * 64}  {ELF_ASSET}\n")
    with pytest.raises(JvmkitError, match="404"):
        pull_osv("v0.0.1", base_url=server.url)


def test_pull_env_url(server, monkeypatch):
    publish(server, fake_kernel())
    monkeypatch.setenv(osv.URL_ENV, server.url)
    assert pull_osv(TAG).source == "release"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pull_unreachable():
    with pytest.raises(JvmkitError) as refused:
        pull_osv(TAG, base_url=f"http://127.0.0.1:{closed_port()}/{{tag}}/", sha256="a" * 64)
    assert "was not reachable" in str(refused.value) and "jvmkit kernel import osv" in str(refused.value)
    assert kernel_dirs() == []


def test_pull_bad_version():
    with pytest.raises(UsageError):
        pull_osv("../x")


# ---- import -------------------------------------------------------------------------------------------

def test_import_elf_with_pvh_and_balloon(tmp_path):
    build = tmp_path / "osv" / "build" / "last"
    build.mkdir(parents=True)
    elf = fake_kernel(balloon=True)
    (build / "loader-stripped.elf").write_bytes(elf)
    kernel = import_osv(build / "loader-stripped.elf")
    assert kernel.source == "import" and kernel.has_pvh and kernel.has_balloon is True
    assert kernel.sha256 == sha(elf) and kernel.version == "v9.9.9-1-gabcdef0"
    assert kernel.loader_image is None and kernel.elf.read_bytes() == elf
    again = import_osv(build / "loader-stripped.elf")
    assert again.path == kernel.path and len(kernel_dirs()) == 1
    info = kernel.describe()
    assert {k: info[k] for k in ("name", "version", "sha256", "size", "has_pvh", "has_balloon", "source")} == {
        "name": "osv", "version": "v9.9.9-1-gabcdef0", "sha256": sha(elf), "size": len(elf), "has_pvh": True,
        "has_balloon": True, "source": "import"}


def test_import_pairs_the_loader_image_of_a_build(tmp_path):
    build = tmp_path / "last"
    build.mkdir()
    elf, loader = fake_kernel(), fake_loader_image()
    (build / "loader-stripped.elf").write_bytes(elf)
    (build / "loader.img").write_bytes(loader)
    kernel = import_osv(build)  # the build directory itself
    assert kernel.elf.read_bytes() == elf and kernel.loader_image.read_bytes() == loader
    assert kernel.loader_image_sha256 == sha(loader)
    from_image = import_osv(build / "loader.img")
    assert from_image.path == kernel.path


def test_import_without_pvh_warns_and_is_not_used_by_pack(tmp_path, isolated):
    path = tmp_path / "loader.elf"
    path.write_bytes(fake_kernel(pvh=False))
    kernel = import_osv(path)
    assert kernel.has_pvh is False and not kernel.bootable
    assert "no PVH entry note" in isolated.getvalue()
    assert osv.cached_osv_kernel() is None
    with pytest.raises(UsageError, match="PVH"):
        resolve_osv_kernel(path)


def test_import_gzip_and_loader_image_only(tmp_path):
    gz = tmp_path / ELF_ASSET
    elf = fake_kernel()
    gz.write_bytes(gzip.compress(elf))
    assert import_osv(gz).elf.read_bytes() == elf
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "disk-loader.img").write_bytes(fake_loader_image("v1.2.3"))
    only = import_osv(alone / "disk-loader.img")
    assert only.elf is None and only.loader_image is not None and only.version == "v1.2.3"
    assert only.has_balloon is None and not only.bootable
    with pytest.raises(UsageError, match="loader ELF"):
        resolve_osv_kernel(alone / "disk-loader.img")


def test_import_refuses_other_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        import_osv(tmp_path / "nope.elf")
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"MZ" + b"\0" * 1000)
    with pytest.raises(UsageError, match="not an OSv kernel"):
        import_osv(junk)
    bad_gz = tmp_path / "x.gz"
    bad_gz.write_bytes(gzip.compress(b"not an elf"))
    with pytest.raises(UsageError, match="not of an ELF"):
        import_osv(bad_gz)
    assert kernel_dirs() == []


def test_kernels_ls_sees_osv_entries(tmp_path):
    path = tmp_path / "loader-stripped.elf"
    path.write_bytes(fake_kernel())
    kernel = import_osv(path)
    rows = [r for r in store.list_kernels() if r["target"] == "osv"]
    assert [(r["version"], r["sha256"]) for r in rows] == [(kernel.version, kernel.sha256)]


# ---- which kernel pack uses ------------------------------------------------------------------------------

def test_resolve_order(tmp_path, monkeypatch, server):
    explicit = tmp_path / "explicit" / "loader-stripped.elf"
    explicit.parent.mkdir()
    explicit.write_bytes(fake_kernel(version="v1.0.0-explicit"))
    from_env = tmp_path / "env" / "loader-stripped.elf"
    from_env.parent.mkdir()
    from_env.write_bytes(fake_kernel(version="v2.0.0-env"))

    # nothing cached, pulling impossible (the release server is unreachable): how to get one
    monkeypatch.setenv(osv.URL_ENV, f"http://127.0.0.1:{closed_port()}/{{tag}}/")
    with pytest.raises(JvmkitError) as none:
        resolve_osv_kernel(None)
    text = str(none.value)
    for advice in ("jvmkit kernel pull osv", "jvmkit kernel import osv", "--kernel", "--target linux"):
        assert advice in text

    # ... or pulling refused for want of a digest
    monkeypatch.setenv(osv.URL_ENV, server.url.replace("{tag}", "nothing-here"))
    with pytest.raises(JvmkitError, match="no SHA-256 digest"):
        resolve_osv_kernel(None)

    # a pull works when the server has a verified release
    publish(server, fake_kernel(version="v9.9.9-pulled"))
    monkeypatch.setenv(osv.URL_ENV, server.url)
    monkeypatch.setattr(osv, "DEFAULT_VERSION", TAG)
    assert resolve_osv_kernel(None).version == "v9.9.9-pulled"

    # the explicit --kernel wins over everything, and is imported into the cache by digest
    assert resolve_osv_kernel(explicit).version == "v1.0.0-explicit"
    # then JVMKIT_OSV_KERNEL
    monkeypatch.setenv(osv.KERNEL_ENV, str(from_env))
    assert resolve_osv_kernel(None).version == "v2.0.0-env"
    assert resolve_osv_kernel(explicit).version == "v1.0.0-explicit"
    monkeypatch.delenv(osv.KERNEL_ENV)
    # then the most recently used cached kernel (the explicit one was used last)
    assert resolve_osv_kernel(None).version == "v1.0.0-explicit"
    # a cache entry directory works as --kernel too, and counts as a use
    entry = import_osv(from_env).path
    assert resolve_osv_kernel(entry).path == entry
    assert resolve_osv_kernel(None).version == "v2.0.0-env"
    assert {r["version"] for r in list_osv_kernels()} == {"v1.0.0-explicit", "v2.0.0-env", "v9.9.9-pulled"}


# ---- a real kernel --------------------------------------------------------------------------------

@pytest.mark.osv
@pytest.mark.skipif(REAL_KERNEL is None, reason="no OSv kernel: set JVMKIT_OSV_KERNEL=.../build/last/"
                    "loader-stripped.elf or `jvmkit kernel import osv PATH`")
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_a_real_kernel_agrees_with_readelf():
    kernel = resolve_osv_kernel(REAL_KERNEL)  # imported into this test's empty cache by digest
    assert kernel.bootable and kernel.elf.is_file() and re.fullmatch(r"v\d+\.\d+(\.\d+)?(-[\w.+]+)*", kernel.version)
    data = kernel.elf.read_bytes()
    assert kernel.sha256 == sha(data) and kernel.has_balloon == (b"virtio-balloon: ready" in data)
    out = proc.run(["readelf", "-nW", str(kernel.elf)], what="readelf", timeout=60).stdout
    theirs = [(owner, bytes.fromhex(desc)) for owner, desc in
              re.findall(r"^\s+(Xen)\s+0x[0-9a-f]+\s.*?description data: ([0-9a-f ]+?)\s*$", out, re.M)]
    ours = [(name, desc) for name, _type, desc in elfs.elf_notes(data) if name == "Xen"]
    assert ours == theirs and ours
    entry = re.search(r"^\s+Xen\s+0x[0-9a-f]+\s+Unknown note type: \(0x00000012\)\s+description data: ([0-9a-f ]+?)\s*$",
                      out, re.M)
    assert entry and elfs.pvh_entry(data) == int.from_bytes(bytes.fromhex(entry.group(1)), "little")
    assert json.loads((kernel.path / "kernel.json").read_text())["pvh_entry"] == f"{elfs.pvh_entry(data):#x}"
