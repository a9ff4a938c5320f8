"""The one kernel cache of both targets: where entries live, what their kernel.json holds, listing.

Layout: `kernels/<target>/<id>/` for each target in `KERNEL_TARGETS`, every entry holding a
`kernel.json` with at least `target`, `layout`, `created`, `version` and `sha256` (of the file QEMU
boots); `list_kernels()` (`jvmkit kernel ls`, `jvmkit doctor`) reads those. Entries are built in a
temporary directory and renamed into place under a lock (`cache.ensure_entry`), so a reader never
sees half of one; `kernels/<target>` as the kind keeps the lock file (`.<id>.lock`) beside the
entry, where `cache.prune` looks for it too. What an entry holds besides is up to its target
(`linux.py`, `osv.py`); `LAYOUTS` says which version of that each target writes, and entries of
another layout are ignored (and so rebuilt) by the target's loaders.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jvmkit import cache, fileio
from jvmkit.errors import JvmkitError, UsageError

KERNEL_TARGETS = ("linux", "osv")
KERNEL_JSON = "kernel.json"
# Bump a target's number when what its entries hold changes; older entries are then ignored.
LAYOUTS = {"linux": 1, "osv": 1}


@dataclass(frozen=True)
class Entry:
    """A complete cache entry: its directory, its kernel.json (empty if unreadable), its last use."""

    path: Path
    meta: dict
    last_used: float

    @property
    def current(self) -> bool:
        """Written by this jvmkit's layout for the entry's target."""
        target = self.path.parent.name
        return self.meta.get("target") == target and self.meta.get("layout") == LAYOUTS.get(target)


def kernels_dir(target: str) -> Path:
    if target not in KERNEL_TARGETS:
        raise UsageError(f"unknown kernel target {target!r} (one of {', '.join(KERNEL_TARGETS)})")
    return cache.cache_dir("kernels", target)


def safe_name(text: str) -> str:
    """`text` made fit for an entry id (letters, digits, `.+_-`; at most 48 characters)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)[:48] or "unknown"


def kernel_entry(target: str, key: str, build: Callable[[Path], None], **info: object) -> tuple[Path, bool]:
    """The cache entry `kernels/<target>/<key>/`, built with `build(tmpdir)` when missing.
    Returns (path, built now)."""
    kernels_dir(target)
    if "/" in key or key.startswith("."):
        raise JvmkitError(f"bad kernel cache key {key!r}")
    return cache.ensure_entry(f"kernels/{target}", key, build, **info)


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """One file of an entry being built (temporary sibling, then rename; `mode` set)."""
    fileio.atomic_write_bytes(path, data, mode)


def write_meta(dest: Path, target: str, meta: dict) -> dict:
    """Write an entry's kernel.json: `meta` with the target, its layout and the time. Returns it."""
    meta = {"target": target, "layout": LAYOUTS[target], "created": time.time(), **meta}
    write_file(dest / KERNEL_JSON, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return meta


def bad_entry(entry: Path, target: str, exc: Exception) -> JvmkitError:
    """The error for a directory whose kernel.json can't be read as an entry of `target`."""
    reason = f"no {exc} in {KERNEL_JSON}" if isinstance(exc, KeyError) else str(exc)
    return JvmkitError(f"{entry} is not a jvmkit {target} kernel entry ({reason})",
                       hint=f"remove it with `jvmkit cache prune --all`, then `jvmkit kernel pull {target}` "
                            "or import the kernel again")


def read_meta(entry: Path, target: str) -> dict:
    """An entry's kernel.json, which must be of `target`; one JvmkitError saying what to do otherwise."""
    try:
        meta = json.loads((entry / KERNEL_JSON).read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{KERNEL_JSON} is not a JSON object")
        if meta.get("target", target) != target:
            raise ValueError(f"target {meta.get('target')!r}")
    except (OSError, ValueError) as exc:
        raise bad_entry(entry, target, exc) from None
    return meta


def entries(target: str) -> list[Entry]:
    """The complete entries of a target (of any layout), by id."""
    base = cache.cache_root() / "kernels" / target
    if not base.is_dir():
        return []
    found = []
    for path in sorted(base.iterdir()):
        marker = path / cache.ENTRY_FILE
        if path.name.startswith(".") or not marker.is_file():
            continue
        try:
            meta = json.loads((path / KERNEL_JSON).read_text())
        except (OSError, ValueError):
            meta = {}
        try:
            last_used = float(json.loads(marker.read_text()).get("last_used", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            last_used = 0.0
        found.append(Entry(path, meta if isinstance(meta, dict) else {}, last_used))
    return found


def current_entries(target: str) -> list[Entry]:
    """The complete entries of a target written in this jvmkit's layout."""
    return [e for e in entries(target) if e.current]


def most_recent(target: str, usable: Callable[[Entry], bool]) -> Entry | None:
    """The current-layout entry, among those `usable`, most recently pulled, imported or used."""
    best = None
    for entry in current_entries(target):
        if usable(entry):
            key = (entry.last_used, entry.meta.get("created", 0))
            if best is None or key > best[0]:
                best = (key, entry)
    return best[1] if best else None


def list_kernels() -> list[dict]:
    """Every cached kernel: target, id, version, sha256 (of what QEMU boots), size, path, source."""
    rows = []
    for target in KERNEL_TARGETS:
        for entry in entries(target):
            meta = entry.meta
            rows.append({"target": target, "id": entry.path.name, "version": str(meta.get("version", "?")),
                         "sha256": str(meta.get("sha256", "")), "size": cache.dir_size(entry.path),
                         "path": str(entry.path), "source": meta.get("source", ""), "last_used": entry.last_used})
    return rows
