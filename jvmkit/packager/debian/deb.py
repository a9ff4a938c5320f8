"""`.deb` files: verified downloads into the cache, an `ar` reader, and safe unpacking in pure Python.

- `fetch_deb`: the package's .deb, downloaded (jvmkit.fetch: streamed, progress bar) and verified
  against the index's SHA-256 before it is kept, in the cache keyed by that digest.
- `read_ar` / `Deb`: the ar container (GNU and BSD long names), its `control.tar.*` and
  `data.tar.*` members (xz, gz, zst, bz2 or plain) streamed through `fileio.Window`.
- `safe_extract` / `extract_deb`: a tar extractor that refuses absolute paths, `..`, and links
  leaving the destination, and never creates device nodes.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import lzma
import os
import re
import shutil
import stat
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

import zstandard

from jvmkit import cache, fetch, fileio
from jvmkit.errors import JvmkitError
from jvmkit.packager.debian.archive import Package
from jvmkit.packager.debian.sources import MirrorUnreachable, parse_deb822

if TYPE_CHECKING:
    import requests

CHUNK = 1 << 16
STALE_HINT = "the index may be stale: try again with --refresh; if it persists use another mirror (--mirror)"


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
            if fileio.sha256_file(dest) == pkg.sha256:
                return dest
            dest.unlink()  # corrupt cache entry: fetch again
        _download(pkg, dest, sess)
    return dest


def _download(pkg: Package, dest: Path, sess: requests.Session | None) -> None:
    """Stream the .deb to `dest`, verified against the index's SHA-256 and size before it appears there."""
    try:
        fetch.download(pkg.url, dest, sha256=pkg.sha256, size=pkg.size or None, what=f"{pkg.name} {pkg.version}",
                       session=sess, hint=STALE_HINT)
    except fetch.Unreachable as exc:
        raise MirrorUnreachable(exc.url, exc.reason) from None


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

    @contextmanager
    def _tar(self, prefix: str) -> Iterator[tarfile.TarFile]:
        """The member `prefix` (.xz, .gz, ...) opened as a streamed tar."""
        member = self._member(prefix)
        with open(self.path, "rb") as handle:
            window = io.BufferedReader(fileio.Window(handle, member.offset, member.size))
            with tarfile.open(fileobj=_decompressed(window, member.name), mode="r|") as tar:
                yield tar

    @functools.cached_property
    def control(self) -> dict[str, str]:
        """The package's control stanza (field names in lower case)."""
        with self._tar("control.tar") as tar:
            for info in tar:
                if _normalize(info.name) == "control" and info.isfile():
                    data = tar.extractfile(info)
                    stanzas = parse_deb822(data.read().decode("utf-8", "replace")) if data else []
                    return stanzas[0] if stanzas else {}
        return {}

    def extract(self, dest: Path, select: Callable[[str], bool] | None = None) -> list[str]:
        """Extract data.tar members (all, or those `select(path)` accepts) safely under `dest`."""
        try:
            with self._tar("data.tar") as tar:
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
