"""The image bundle: a directory `NAME.jvmkit/` with `manifest.json` and the files it lists.

Writers fill a staging directory next to the output and `publish()` renames it into place, so a
failed pack leaves nothing half-written. `load()` reads and checks a bundle (format version,
files present, SHA-256 of every listed file), which is how `run` and `inspect` refuse corrupt or
truncated images with one clear line. A file whose SHA-256 matched once is not hashed again while
its identity and change times stay the same (a stamp in the cache's `verified/`; any write to the
file changes its ctime, so a damaged file is hashed, and refused, again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jvmkit import cache, fileio
from jvmkit.errors import JvmkitError, UsageError

FORMAT = 1
MANIFEST = "manifest.json"
SUFFIX = ".jvmkit"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(file: Path, st: os.stat_result) -> Path:
    """Where the stamp of a verified file lives: keyed by its path, identity, size and change times."""
    ident = f"{file.resolve()}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return cache.cache_root() / "verified" / hashlib.sha256(ident.encode()).hexdigest()[:40]


def matches_sha256(file: Path, expected: str) -> bool:
    """Whether `file` has SHA-256 `expected`; hashes it only when no stamp vouches for it."""
    st = file.stat()
    stamp = _stamp(file, st)
    try:
        if stamp.read_text() == expected:
            return True
    except OSError:
        pass
    if sha256_file(file) != expected:
        return False
    try:
        fileio.atomic_write_bytes(stamp, expected.encode())
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return True


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def default_output(name: str, directory: Path | None = None) -> Path:
    return (directory or Path.cwd()) / f"{name}{SUFFIX}"


def staging_dir(output: Path, force: bool) -> Path:
    """A fresh staging directory next to `output` (refusing an existing output without --force)."""
    if output.exists() and not force:
        raise UsageError(f"output {output} already exists", hint="use --force to replace it, or -o to choose another path")
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))


def write_manifest(staging: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, **manifest}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.chmod(staging / MANIFEST, 0o644)


def publish(staging: Path, output: Path) -> None:
    """Move a completed staging directory to `output`, replacing an old one only at the end."""
    os.chmod(staging, 0o755)
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old.{os.getpid()}")
        os.rename(output, old)
    os.rename(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name.removesuffix(SUFFIX))

    def file(self, name: str) -> Path:
        return self.path / self.manifest["files"][name]["path"]


def load(path: Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) verify every file it lists."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"image {path} does not exist", hint="make one with `jvmkit pack`")
    manifest_path = path / MANIFEST
    if not path.is_dir() or not manifest_path.is_file():
        raise UsageError(f"{path} is not a jvmkit image (no {MANIFEST} inside)", hint="make one with `jvmkit pack`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise JvmkitError(f"image {path} has a corrupt {MANIFEST}: {exc}", hint="pack it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise JvmkitError(f"image {path} has manifest format {manifest.get('format') if isinstance(manifest, dict) else '?'}, "
                          f"this jvmkit reads format {FORMAT}", hint="pack it again with this jvmkit")
    bundle = Bundle(path, manifest)
    if verify:
        for name, record in manifest["files"].items():
            file = path / record["path"]
            if not file.is_file():
                raise JvmkitError(f"image {path} is incomplete: {record['path']} is missing", hint="pack it again")
            size = file.stat().st_size
            if size != record["size"]:
                raise JvmkitError(f"image {path} is corrupt: {record['path']} has {size} bytes, "
                                  f"the manifest says {record['size']} (truncated?)", hint="pack it again")
            if not matches_sha256(file, record["sha256"]):
                raise JvmkitError(f"image {path} is corrupt: {record['path']} does not match its SHA-256",
                                  hint="pack it again")
    return bundle
