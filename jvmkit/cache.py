"""jvmkit's cache directory: location, atomic entries, locks, listing and pruning.

Layout under the cache root (`$JVMKIT_CACHE`, else `$XDG_CACHE_HOME/jvmkit`, else ~/.cache/jvmkit):
    runtimes/<key>/      trimmed JDK runtimes (jlink + CDS), keyed by JDK release + modules + options
    agents/<key>/        compiled guest agent jars
    kernels/<target>/<id>/  kernels and guest userland (Linux: kernel, busybox, modules; OSv: loader)
    debian/              downloaded .deb files and Packages indexes
    boot/<digest>/       decompressed boot files unpacked from image bundles for fast booting
    kvm-probe.json       the cached verdict of the KVM probe
Every entry is built in a temporary sibling directory and renamed into place when complete, under
a file lock, so concurrent jvmkit processes never see half-built entries. Each entry records its
last use in `.jvmkit-entry.json`, which `cache prune` reads.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

ENTRY_FILE = ".jvmkit-entry.json"
KINDS = ("runtimes", "agents", "cds", "kernels", "boot")
LOOSE_KINDS = ("debian", "logs", "verified")  # no per-entry markers: listed and pruned as a whole
LOOSE_LABELS = {"debian": "downloads", "logs": "downloads", "verified": "image checks"}


def cache_root() -> Path:
    env = os.environ.get("JVMKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "jvmkit"
    return Path.home() / ".cache" / "jvmkit"


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), held for the with-block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def touch_entry(entry: Path, **info: object) -> None:
    """Record that an entry was used now (and optionally what it is)."""
    meta_path = entry / ENTRY_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    meta.update({k: v for k, v in info.items() if v is not None})
    meta["last_used"] = time.time()
    tmp = meta_path.with_name(meta_path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, meta_path)


def ensure_entry(kind: str, key: str, build: Callable[[Path], None], **info: object) -> tuple[Path, bool]:
    """Return the cache entry `kind/key`, building it with `build(tmpdir)` if it is missing.

    Returns (path, built_now). The build runs in a temporary directory next to the entry and is
    renamed into place only when `build` returns; a failed build leaves nothing behind.
    """
    parent = cache_dir(kind)
    entry = parent / key
    with file_lock(parent / f".{key}.lock"):
        if entry.is_dir() and (entry / ENTRY_FILE).exists():
            touch_entry(entry)
            return entry, False
        if entry.exists():  # a leftover without its marker: not trustworthy
            shutil.rmtree(entry, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=parent))
        try:
            build(tmp)
            touch_entry(tmp, kind=kind, key=key, created=time.time(), **info)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry, True


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    key: str
    path: Path
    size: int
    last_used: float
    info: dict


def list_entries() -> list[CacheEntry]:
    root = cache_root()
    entries: list[CacheEntry] = []
    for kind in KINDS:
        base = root / kind
        if not base.is_dir():
            continue
        for meta_path in sorted(base.rglob(ENTRY_FILE)):
            entry = meta_path.parent
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
            entries.append(
                CacheEntry(
                    kind=kind,
                    key=str(entry.relative_to(base)),
                    path=entry,
                    size=dir_size(entry),
                    last_used=float(meta.get("last_used", entry.stat().st_mtime)),
                    info=meta,
                )
            )
    for kind in LOOSE_KINDS:  # plain download caches: one entry each, aged by their newest file
        base = root / kind
        if base.is_dir() and any(base.iterdir()):
            newest = max((p.stat().st_mtime for p in base.rglob("*") if p.is_file()), default=base.stat().st_mtime)
            entries.append(CacheEntry(kind=kind, key=LOOSE_LABELS[kind], path=base, size=dir_size(base),
                                      last_used=newest, info={}))
    return entries


def prune(older_than_days: float, *, dry_run: bool = False, now: float | None = None) -> list[CacheEntry]:
    """Remove entries not used for `older_than_days` days (0 removes everything). Returns them."""
    now = time.time() if now is None else now
    removed = []
    for entry in list_entries():
        if now - entry.last_used >= older_than_days * 86400:
            removed.append(entry)
            if not dry_run:
                if entry.kind in LOOSE_KINDS:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    continue
                with file_lock(entry.path.parent / f".{entry.path.name}.lock"):
                    shutil.rmtree(entry.path, ignore_errors=True)
    return removed
