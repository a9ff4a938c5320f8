"""OSv kernels in jvmkit's cache: `jvmkit kernel pull osv`, `jvmkit kernel import osv PATH`, and the
choice of kernel `pack --target osv` makes (`resolve_osv_kernel`).

An OSv kernel is the loader ELF (`loader-stripped.elf` in OSv's build, the release asset
`osv-loader.elf.x86_64.gz` once gunzipped). It carries a PVH entry note (ELF note "Xen", type 18),
so QEMU boots it directly with `-kernel` and the command line through `-append`. Optionally an entry
also holds OSv's classic loader image (`loader.img`, release asset `osv-loader.qemu.x86_64`: boot
sector + compressed loader at sector 128), which `jvmkit export` needs for single-file disks.

Cache entries (in the one kernel cache, `store`, so `jvmkit kernel ls` and `cache ls` see them):
    kernels/osv/<id>/loader.elf    the ELF QEMU boots (absent for a loader-image-only import)
    kernels/osv/<id>/loader.img    the classic loader image, when there is one
    kernels/osv/<id>/kernel.json   target, version, sha256 (of loader.elf), size, has_pvh,
                                   has_balloon, source (release|import), assets and their digests
`<id>` is `release-<tag>-<sha256[:12]>` or `import-<version>-<sha256[:12]>[-img<sha256[:8]>]`.

Downloads are verified before anything lands in the cache. A digest comes from, in this order:
the caller (`--sha256`), `KNOWN_RELEASES` pinned here, or a `SHA256SUMS` file beside the assets
(integrity only: it comes from the same server). A download with no digest to check is refused.
What a kernel offers is read from its bytes: the PVH note, the version string OSv prints at boot
(`OSv v0.57.0-...`), and the virtio-balloon driver, told by the message its constructor logs,
`virtio-balloon: ready` (drivers/virtio-balloon.cc), present in a kernel built with the driver.

Over the ~450-line guide: pull, import and resolve read the same module constants
(KNOWN_RELEASES, DEFAULT_VERSION, URL_ENV, which callers and tests patch here), so they stay in one
module. Downloads go through `jvmkit.fetch` (streamed, verified before they appear, one error mapping).
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from jvmkit import cache, fetch, fileio, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import elf as elfs
from jvmkit.packager.kernels import store

TARGET = "osv"
ELF_FILE = "loader.elf"
LOADER_IMAGE_FILE = "loader.img"

ELF_ASSET = "osv-loader.elf.x86_64.gz"
LOADER_ASSET = "osv-loader.qemu.x86_64"
SUMS_FILE = "SHA256SUMS"
DEFAULT_VERSION = "v0.57.0"  # the newest upstream release tag jvmkit knows of
UPSTREAM_URL = "https://github.com/cloudius-systems/osv/releases/download/{tag}/"
URL_ENV = "JVMKIT_OSV_RELEASES_URL"
KERNEL_ENV = "JVMKIT_OSV_KERNEL"

# Release tag -> {asset name: SHA-256 of the file as downloaded}. Only digests someone verified
# against the real upstream asset belong here; none could be from this machine (GitHub is not
# reachable), so the table is empty and pulls need --sha256 or a SHA256SUMS file.
KNOWN_RELEASES: dict[str, dict[str, str]] = {}

BALLOON_MARK = b"virtio-balloon: ready"
VERSION_RE = re.compile(rb"OSv (v\d+\.\d+(?:\.\d+)?(?:-[0-9A-Za-z.+]+)*)[\n\0]")
MAX_KERNEL_BYTES = 256 << 20  # refuse to gunzip anything larger (an OSv kernel is ~6 MiB)
LOADER_ELF_OFFSET = 128 * 512  # where loader.img holds the compressed loader (an ELF)
_DIGEST_RE = re.compile(r"[0-9a-f]{64}\Z")

HOW_TO_GET = ("get one with `jvmkit kernel pull osv --version TAG --sha256 DIGEST`, build OSv and "
              "`jvmkit kernel import osv PATH/TO/osv/build/last/loader-stripped.elf`, pass "
              "`--kernel PATH`, set JVMKIT_OSV_KERNEL=PATH, or use `--target linux`")


# ---- pure: what a kernel file is and offers ------------------------------------------------------

def detect_kind(head: bytes) -> str | None:
    """"elf", "gzip", "loader-image" (OSv's classic boot sector + loader), or None (pure)."""
    if elfs.is_elf(head):
        return "elf"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if len(head) >= LOADER_ELF_OFFSET + 4 and head[510:512] == b"\x55\xaa" \
            and head[LOADER_ELF_OFFSET:LOADER_ELF_OFFSET + 4] == b"\x7fELF":
        return "loader-image"
    return None


def osv_version(data: bytes) -> str | None:
    """The version OSv prints first at boot ("OSv v0.57.0-398-g0e34e4dc" -> "v0.57.0-398-g0e34e4dc")."""
    found = VERSION_RE.search(data)
    return found.group(1).decode() if found else None


def has_balloon_driver(data: bytes) -> bool:
    """Whether the kernel has OSv's virtio-balloon driver (its "virtio-balloon: ready" log message)."""
    return BALLOON_MARK in data


def inspect_elf(data: bytes) -> dict:
    """What jvmkit records about an OSv loader ELF (pure)."""
    entry = elfs.pvh_entry(data)
    return {"has_pvh": entry is not None, "pvh_entry": f"{entry:#x}" if entry is not None else None,
            "version": osv_version(data), "has_balloon": has_balloon_driver(data)}


def gunzip_bounded(data: bytes, what: str, limit: int = MAX_KERNEL_BYTES) -> bytes:
    """Decompress a gzip file, refusing more than `limit` bytes of output."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise JvmkitError(f"{what} is not a valid gzip file ({exc})") from None
    if len(out) > limit:
        raise JvmkitError(f"{what} decompresses to more than {limit >> 20} MiB; that is not an OSv kernel")
    if not d.eof:
        raise JvmkitError(f"{what} is a truncated gzip file")
    return out


def parse_sha256sums(text: str) -> dict[str, str]:
    """`sha256sum` output ("<hex>  name" or "<hex> *name" lines) -> {name: hex} (pure)."""
    sums = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            continue
        digest, name = parts[0].lower(), parts[1].strip().lstrip("*")
        if _DIGEST_RE.match(digest):
            sums[os.path.basename(name)] = digest
    return sums


def release_url(tag: str, base_url: str | None = None) -> str:
    """The directory URL of a release's assets: `base_url` (may hold `{tag}`), else $JVMKIT_OSV_RELEASES_URL,
    else OSv's GitHub releases (pure but for the environment)."""
    base = base_url or os.environ.get(URL_ENV) or UPSTREAM_URL
    url = base.replace("{tag}", tag)
    return url if url.endswith("/") else url + "/"


def check_digest(value: str, what: str) -> str:
    digest = value.strip().lower()
    if digest.startswith("sha256:"):
        digest = digest[len("sha256:"):]
    if not _DIGEST_RE.match(digest):
        raise UsageError(f"{what} {value!r} is not a SHA-256 digest (64 hex digits)")
    return digest


# ---- the cache ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OsvKernel:
    """An OSv kernel in jvmkit's cache."""

    path: Path                      # the cache entry
    id: str
    version: str
    sha256: str                     # of the loader ELF (of the loader image for an image-only entry)
    size: int
    elf: Path | None                # what QEMU boots with -kernel
    loader_image: Path | None       # classic loader image, for `jvmkit export`
    loader_image_sha256: str | None
    has_pvh: bool
    has_balloon: bool | None        # None: can't be told (compressed loader image only)
    source: str                     # "release" or "import"
    tag: str | None = None
    imported_from: str | None = None

    target = TARGET
    name = "osv"

    @property
    def bootable(self) -> bool:
        return self.elf is not None and self.has_pvh

    def describe(self) -> dict:
        return {"target": TARGET, "name": "osv", "id": self.id, "version": self.version,
                "sha256": self.sha256, "size": self.size, "has_pvh": self.has_pvh,
                "has_balloon": self.has_balloon, "balloon_detection": BALLOON_MARK.decode(),
                "path": str(self.path), "source": self.source, "tag": self.tag,
                "loader_image": self.loader_image is not None,
                "loader_image_sha256": self.loader_image_sha256}


def load_osv_kernel(entry: Path) -> OsvKernel:
    """The OsvKernel recorded in a cache entry (or a copy of one) by its kernel.json."""
    meta = store.read_meta(entry, TARGET)
    try:
        return OsvKernel(
            path=entry, id=entry.name, version=meta["version"], sha256=meta["sha256"], size=int(meta["size"]),
            elf=entry / meta["elf"] if meta.get("elf") else None,
            loader_image=entry / meta["loader_image"] if meta.get("loader_image") else None,
            loader_image_sha256=meta.get("loader_image_sha256"), has_pvh=bool(meta.get("has_pvh")),
            has_balloon=meta.get("has_balloon"), source=meta.get("source", "import"), tag=meta.get("tag"),
            imported_from=meta.get("imported_from"))
    except (ValueError, KeyError, TypeError) as exc:
        raise store.bad_entry(entry, TARGET, exc) from None


def list_osv_kernels() -> list[dict]:
    """Every cached OSv kernel: target, id, version, sha256, size, path, source, what it offers."""
    rows = []
    for entry in store.current_entries(TARGET):
        meta = entry.meta
        rows.append({"target": TARGET, "id": entry.path.name, "version": str(meta.get("version", "?")),
                     "sha256": str(meta.get("sha256", "")), "size": int(meta.get("size", 0)),
                     "path": str(entry.path), "source": meta.get("source", ""), "has_pvh": bool(meta.get("has_pvh")),
                     "has_balloon": meta.get("has_balloon"), "loader_image": bool(meta.get("loader_image")),
                     "last_used": entry.last_used})
    return rows


def cached_osv_kernel() -> OsvKernel | None:
    """The bootable cached OSv kernel most recently pulled, imported or used, or None."""
    best = store.most_recent(TARGET, lambda e: bool(e.meta.get("elf") and e.meta.get("has_pvh")
                                                    and (e.path / e.meta["elf"]).is_file()))
    return load_osv_kernel(best.path) if best else None


# ---- pull -----------------------------------------------------------------------------------------

PULL_HINT = ("check the network, --version and --url (JVMKIT_OSV_RELEASES_URL); offline, import a kernel you "
             "built: `jvmkit kernel import osv PATH`")


def _fetch_sums(session, base: str) -> dict[str, str]:
    """The SHA256SUMS beside the assets, {} when there is none (404)."""
    try:
        text = fetch.get_bytes(base + SUMS_FILE, what=f"the release's {SUMS_FILE}", session=session, hint=PULL_HINT)
    except fetch.StatusError as exc:
        if exc.status == 404:
            return {}
        raise
    return parse_sha256sums(text.decode("utf-8", "replace"))


def _download(session, url: str, dest: Path, expected: str, label: str) -> int:
    """One release asset, streamed and verified against `expected` before it appears at `dest`
    (jvmkit.fetch); returns its size."""
    return fetch.download(url, dest, sha256=expected, max_size=MAX_KERNEL_BYTES, what=label, session=session,
                          hint=PULL_HINT).size


def pull_osv(version: str | None = None, base_url: str | None = None, *, sha256: str | None = None,
             loader_sha256: str | None = None) -> OsvKernel:
    """Download an OSv release's loader ELF (and its classic loader image when a digest for it is
    known) into the cache, verified by SHA-256. `sha256` is the digest of `osv-loader.elf.x86_64.gz`
    as downloaded; without it the pinned table, then the server's SHA256SUMS, are used."""
    console = ui.current()
    tag = (version or DEFAULT_VERSION).strip()
    if not tag or "/" in tag or tag.startswith("."):
        raise UsageError(f"--version {version!r} is not a release tag (like {DEFAULT_VERSION})")
    base = release_url(tag, base_url)
    pinned = KNOWN_RELEASES.get(tag, {})
    elf_digest = check_digest(sha256, "--sha256") if sha256 else pinned.get(ELF_ASSET)
    img_digest = check_digest(loader_sha256, "--loader-sha256") if loader_sha256 else pinned.get(LOADER_ASSET)
    if elf_digest is None:  # a release pulled before (verified then) needs no network now
        for entry in store.current_entries(TARGET):
            if entry.meta.get("source") == "release" and entry.meta.get("tag") == tag and entry.meta.get("elf"):
                console.info(f"  OSv {tag}: already in the cache")
                cache.touch_entry(entry.path)
                return load_osv_kernel(entry.path)
    with fetch.session() as session:
        origin = "given" if sha256 else "pinned"
        if elf_digest is None or img_digest is None:
            try:
                sums = _fetch_sums(session, base)
            except JvmkitError:
                if elf_digest is None:
                    raise
                sums = {}
            if elf_digest is None and ELF_ASSET in sums:
                elf_digest, origin = sums[ELF_ASSET], SUMS_FILE
            img_digest = img_digest or sums.get(LOADER_ASSET)
        if elf_digest is None:
            raise JvmkitError(
                f"no SHA-256 digest to verify OSv {tag}'s {ELF_ASSET} against: this jvmkit pins none for {tag} "
                f"and {base} has no {SUMS_FILE}; refusing an unverified kernel",
                hint=f"give the digest you trust: `jvmkit kernel pull osv --version {tag} --sha256 DIGEST`, "
                     "or build OSv and `jvmkit kernel import osv PATH/TO/loader-stripped.elf`")
        if origin == SUMS_FILE:
            console.warn(f"verifying against {SUMS_FILE} from the same server ({base}): that checks integrity, "
                         "not authenticity; pin a digest with --sha256 to be sure")
        key = f"release-{store.safe_name(tag)}-{elf_digest[:12]}"

        def build(tmp: Path) -> None:
            gz = tmp / ELF_ASSET
            gz_size = _download(session, base + ELF_ASSET, gz, elf_digest, f"OSv {tag} {ELF_ASSET}")
            elf = gunzip_bounded(gz.read_bytes(), ELF_ASSET)
            gz.unlink()
            if detect_kind(elf) != "elf":
                raise JvmkitError(f"{ELF_ASSET} of OSv {tag} does not hold an ELF kernel")
            facts = inspect_elf(elf)
            if not facts["has_pvh"]:
                raise JvmkitError(f"OSv {tag}'s loader ELF has no PVH entry note; QEMU can't boot it directly",
                                  hint="use a newer OSv release, or import a kernel you built")
            store.write_file(tmp / ELF_FILE, elf)
            assets = {ELF_ASSET: {"sha256": elf_digest, "size": gz_size, "url": base + ELF_ASSET}}
            loader = None
            if img_digest:
                img = tmp / LOADER_IMAGE_FILE
                img_size = _download(session, base + LOADER_ASSET, img, img_digest, f"OSv {tag} {LOADER_ASSET}")
                with open(img, "rb") as f:
                    if detect_kind(f.read(LOADER_ELF_OFFSET + 4)) != "loader-image":
                        raise JvmkitError(f"{LOADER_ASSET} of OSv {tag} is not an OSv loader image")
                assets[LOADER_ASSET] = {"sha256": img_digest, "size": img_size, "url": base + LOADER_ASSET}
                loader = LOADER_IMAGE_FILE
            else:
                console.info(f"  {LOADER_ASSET}: no digest to verify it, not downloaded "
                             "(only `jvmkit export` needs it)")
            store.write_meta(tmp, TARGET, {
                "source": "release", "tag": tag,
                "version": facts["version"] or tag, "elf": ELF_FILE, "sha256": fileio.sha256_bytes(elf), "size": len(elf),
                "has_pvh": True, "pvh_entry": facts["pvh_entry"], "has_balloon": facts["has_balloon"],
                "loader_image": loader, "loader_image_sha256": img_digest if loader else None,
                "digest_origin": origin, "assets": assets})

        entry, built = store.kernel_entry(TARGET, key, build, version=tag)
    kernel = load_osv_kernel(entry)
    if not built:
        console.info(f"  OSv {tag}: already in the cache")
    return kernel


# ---- import ---------------------------------------------------------------------------------------

ELF_NAMES = ("loader-stripped.elf", "loader.elf")


def _read(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KERNEL_BYTES:
            raise UsageError(f"{what} {path} is {size >> 20} MiB; that is not an OSv kernel")
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"can't read {what} {path}: {exc.strerror}") from None


def _sibling(path: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        candidate = path.parent / name
        if candidate != path and candidate.is_file():
            return candidate
    return None


def import_osv(path: str | os.PathLike, loader_image: str | os.PathLike | None = None) -> OsvKernel:
    """Add an OSv kernel you built to the cache (kept by digest; importing it again is a no-op).

    `path`: the loader ELF (`build/last/loader-stripped.elf` or `loader.elf`, optionally gzipped, as
    the release asset is), a classic loader image (`build/last/loader.img`), or OSv's build directory.
    The other file of the pair is taken from beside it when OSv's build left it there (or from
    `loader_image`)."""
    console = ui.current()
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"OSv kernel {path} does not exist", hint="give loader-stripped.elf from OSv's build/last/")
    if path.is_dir():
        elf_path = next((path / n for n in ELF_NAMES if (path / n).is_file()), None)
        img_path = path / "loader.img" if (path / "loader.img").is_file() else None
        if elf_path is None and img_path is None:
            raise UsageError(f"{path} holds neither loader-stripped.elf, loader.elf nor loader.img",
                             hint="give OSv's build/last directory or one of those files")
        path = elf_path or img_path
    raw = _read(path, "OSv kernel")
    kind = detect_kind(raw)
    elf: bytes | None = None
    img_path: Path | None = Path(loader_image).expanduser() if loader_image else None
    if kind == "gzip":
        elf = gunzip_bounded(raw, str(path))
        if detect_kind(elf) != "elf":
            raise UsageError(f"{path} is gzip, but not of an ELF kernel")
    elif kind == "elf":
        elf = raw
    elif kind == "loader-image":
        if img_path is not None:
            raise UsageError(f"{path} is a loader image and so is --loader {img_path}; give the loader ELF as PATH")
        img_path = path
        sibling = _sibling(path, ELF_NAMES)
        if sibling is not None:
            console.info(f"  taking the loader ELF from beside it: {sibling}")
            elf = _read(sibling, "OSv loader ELF")
            if detect_kind(elf) != "elf":
                elf = None
    else:
        raise UsageError(f"{path} is not an OSv kernel (neither an ELF, a gzipped ELF nor an OSv loader image)",
                         hint="give loader-stripped.elf from OSv's build/last/ or the release's osv-loader.elf.x86_64.gz")
    if img_path is None and kind != "loader-image" and path.name in ELF_NAMES:
        img_path = _sibling(path, ("loader.img",))
        if img_path is not None:
            console.info(f"  taking the classic loader image from beside it: {img_path}")
    img: bytes | None = None
    if img_path is not None:
        img = _read(img_path, "OSv loader image")
        if detect_kind(img[:LOADER_ELF_OFFSET + 4]) != "loader-image":
            raise UsageError(f"{img_path} is not an OSv loader image (boot sector + loader at sector 128)")
    facts = inspect_elf(elf) if elf is not None else {
        "has_pvh": False, "pvh_entry": None, "version": osv_version(img or b""), "has_balloon": None}
    if elf is not None and facts["version"] is None and img is not None:
        facts["version"] = osv_version(img)
    if elf is not None and not facts["has_pvh"]:
        console.warn(f"{path.name} has no PVH entry note (ELF note Xen/18); QEMU can't boot it with -kernel, "
                     "so `pack --target osv` won't use it (OSv's loader-stripped.elf has one)")
    if elf is None:
        console.warn(f"{path.name} is a classic loader image only; `pack` needs the loader ELF as well "
                     "(import loader-stripped.elf from the same build)")
    version = facts["version"] or "unknown"
    main = elf if elf is not None else img
    digest = fileio.sha256_bytes(main)
    img_digest = fileio.sha256_bytes(img) if img is not None else None
    key = f"import-{store.safe_name(version)}-{digest[:12]}"
    if elf is not None and img_digest:
        key += f"-img{img_digest[:8]}"

    def build(tmp: Path) -> None:
        if elf is not None:
            store.write_file(tmp / ELF_FILE, elf)
        if img is not None:
            store.write_file(tmp / LOADER_IMAGE_FILE, img)
        store.write_meta(tmp, TARGET, {
            "source": "import", "imported_from": str(path.resolve()), "version": version,
            "elf": ELF_FILE if elf is not None else None, "sha256": digest, "size": len(main),
            "has_pvh": facts["has_pvh"], "pvh_entry": facts["pvh_entry"], "has_balloon": facts["has_balloon"],
            "loader_image": LOADER_IMAGE_FILE if img is not None else None, "loader_image_sha256": img_digest})

    entry, _built = store.kernel_entry(TARGET, key, build, version=version)
    return load_osv_kernel(entry)


# ---- which kernel pack uses -----------------------------------------------------------------------

def _from_path(value: str | os.PathLike, origin: str) -> OsvKernel:
    path = Path(value).expanduser()
    in_this_cache = path.resolve().is_relative_to(cache.cache_root().resolve())
    if path.is_dir() and (path / store.KERNEL_JSON).is_file() and in_this_cache:
        kernel = load_osv_kernel(path)
        if (path / cache.ENTRY_FILE).is_file():
            cache.touch_entry(path)
    elif path.is_dir() and (path / store.KERNEL_JSON).is_file():  # an entry of another cache: import its files
        entry = load_osv_kernel(path)
        kernel = import_osv(entry.elf or entry.loader_image, loader_image=entry.loader_image if entry.elf else None)
    else:
        kernel = import_osv(path)
    if kernel.elf is None:
        raise UsageError(f"{origin} {path} is a classic loader image; jvmkit boots OSv's loader ELF directly",
                         hint="give loader-stripped.elf from the same OSv build (build/last/)")
    if not kernel.has_pvh:
        raise UsageError(f"{origin} {path} has no PVH entry note, so QEMU can't boot it directly",
                         hint="use OSv's build/last/loader-stripped.elf or a release's osv-loader.elf.x86_64.gz")
    return kernel


def resolve_osv_kernel(explicit_path: str | os.PathLike | None = None) -> OsvKernel:
    """The kernel `pack --target osv` uses: `--kernel PATH`, else $JVMKIT_OSV_KERNEL (each imported
    into the cache by digest, or a cache entry directory), else the most recently used cached kernel,
    else a release pull (which needs a digest and the network); otherwise a JvmkitError saying how
    to get one."""
    if explicit_path:
        return _from_path(explicit_path, "--kernel")
    env = os.environ.get(KERNEL_ENV)
    if env:
        return _from_path(env, KERNEL_ENV)
    kernel = cached_osv_kernel()
    if kernel is not None:
        cache.touch_entry(kernel.path)
        return kernel
    try:
        return pull_osv()
    except JvmkitError as exc:
        raise JvmkitError(f"no OSv kernel is cached and pulling OSv {DEFAULT_VERSION} did not work ({exc.message})",
                          hint=HOW_TO_GET) from None

