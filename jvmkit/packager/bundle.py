"""The image bundle: a directory `NAME.jvmkit/` with `manifest.json` and the files it lists.

Writers fill a staging directory next to the output and `publish()` renames it into place, so a
failed pack leaves nothing half-written. `load()` reads and checks a bundle (format version,
files present, SHA-256 of every listed file, and the bounds and allow-lists of `manifest_limits`:
an image may come from someone else), which is how `run` and `inspect` refuse corrupt, truncated
or hostile images with one clear line (exit status 2), never a traceback. A file whose SHA-256 matched once is not hashed again while
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
from jvmkit.errors import UsageError
from jvmkit.packager import manifest_limits as limits
from jvmkit.packager.manifest import FORMAT, Manifest, ManifestError

MANIFEST = "manifest.json"
SUFFIX = ".jvmkit"
sha256_file = fileio.sha256_file


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


def default_output(name: str, directory: Path | None = None) -> Path:
    return (directory or Path.cwd()) / f"{name}{SUFFIX}"


def staging_dir(output: Path, force: bool) -> Path:
    """A fresh staging directory next to `output` (refusing an existing output without --force)."""
    if output.exists() and not force:
        raise UsageError(f"output {output} already exists", hint="use --force to replace it, or -o to choose another path")
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))


def manifest_text(manifest: Manifest) -> str:
    return json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"


def write_manifest(staging: Path, manifest: Manifest) -> None:
    (staging / MANIFEST).write_text(manifest_text(manifest))
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
    manifest: Manifest

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def name(self) -> str:
        return self.manifest.name or self.path.name.removesuffix(SUFFIX)

    def file(self, role: str) -> Path:
        return self.path / self.manifest.files[role].path


def _inside(bundle: Path, rel: str) -> bool:
    """Whether a file the manifest names stays inside the bundle directory."""
    if not rel or os.path.isabs(rel) or len(rel.encode(errors="surrogateescape")) > 4096 or any(
            ord(ch) < 0x20 or ord(ch) == 0x7F for ch in rel):
        return False
    root = os.path.realpath(bundle)
    return os.path.commonpath([root, os.path.realpath(os.path.join(root, rel))]) == root


def load(path: Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) verify every file it lists. A missing, foreign,
    corrupt or truncated image is bad input: one line, exit status 2."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"image {path} does not exist", hint="make one with `jvmkit pack`")
    manifest_path = path / MANIFEST
    if not path.is_dir() or not manifest_path.is_file():
        raise UsageError(f"{path} is not a jvmkit image (no {MANIFEST} inside)", hint="make one with `jvmkit pack`")
    try:
        with open(manifest_path, "rb") as handle:
            raw = handle.read(limits.MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"image {path}: cannot read its {MANIFEST} ({exc.strerror})") from None
    if len(raw) > limits.MAX_MANIFEST_BYTES:
        raise UsageError(f"image {path} has a {MANIFEST} of more than {limits.MAX_MANIFEST_BYTES >> 20} MiB; "
                         "jvmkit writes a few KiB", hint="this image is damaged or hostile; do not run it")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise UsageError(f"image {path} has a corrupt {MANIFEST}: {detail}", hint="pack it again") from None
    if isinstance(data, dict) and data.get("format") != FORMAT:
        raise UsageError(f"image {path} has manifest format {repr(data.get('format'))[:40]}; this jvmkit reads format {FORMAT}",
                         hint="pack it again with this jvmkit")
    try:
        manifest = Manifest.from_json(data)
    except ManifestError as exc:
        raise UsageError(f"image {path} has an invalid {MANIFEST}: {exc.message}", hint="pack it again") from None
    bundle = Bundle(path, manifest)
    for role, record in manifest.files.items():
        if not _inside(path, record.path):
            raise UsageError(f"image {path}: file {role!r} points outside the image ({record.path!r})",
                             hint="this image is damaged or hostile; do not run it")
    if verify:
        for role, record in manifest.files.items():
            file = path / record.path
            if not file.is_file():
                raise UsageError(f"image {path} is incomplete: {record.path} is missing", hint="pack it again")
            size = file.stat().st_size
            if size != record.size:
                raise UsageError(f"image {path} is corrupt: {record.path} has {size} bytes, "
                                 f"the manifest says {record.size} (truncated?)", hint="pack it again")
            if not matches_sha256(file, record.sha256):
                raise UsageError(f"image {path} is corrupt: {record.path} does not match its SHA-256",
                                 hint="pack it again")
    return bundle
