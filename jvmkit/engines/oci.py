"""A one-layer OCI image, written in Python and deterministically (no docker, no daemon).

`write_layout(dir, files, ...)` writes an OCI image layout (image-spec v1.0: `oci-layout`,
`index.json`, `blobs/sha256/...`): one gzip layer (a tar of the given files, every header fixed:
mtime, uid/gid, modes, no user names; gzip with mtime 0 and no file name), its config and its
manifest, tagged in the index by `org.opencontainers.image.ref.name`. The same inputs give the
same bytes, so the digests are reproducible. `write_archive(layout, tar)` packs a layout into an
`oci-archive` (a tar of the layout, as `skopeo copy oci-archive:` and `podman load` read it).
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from jvmkit import fileio

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"   # what `ctr images import` names the image by
CHUNK = 1 << 20


@dataclass(frozen=True)
class LayerFile:
    """One file of the layer: its path in the image (no leading /), its source, mode, owner."""

    path: str
    source: Path
    mode: int = 0o444
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self, **extra) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


class _Sink:
    """A write-only stream that hashes and counts what passes into `inner` (a file or another sink)."""

    def __init__(self, inner):
        self.inner = inner
        self.hash = fileio.HashingWriter()
        self.size = 0

    def write(self, data) -> int:
        self.inner.write(data)
        self.hash.write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _dirs(files: list[LayerFile]) -> list[str]:
    found = set()
    for f in files:
        parts = f.path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            found.add("/".join(parts[:i]))
    return sorted(found)


def _blob(blobs: Path, data: bytes) -> str:
    digest = fileio.sha256_bytes(data)
    fileio.atomic_write_bytes(blobs / digest, data)
    return "sha256:" + digest


def write_layer(blobs: Path, files: list[LayerFile], mtime: int, dir_owner: tuple[int, int] = (0, 0)) -> tuple[Descriptor, str]:
    """The gzip layer of `files` into `blobs/`; (its descriptor, the uncompressed tar's diff_id)."""
    tmp = blobs / ".layer.partial"
    try:
        with open(tmp, "wb") as out:
            compressed = _Sink(out)
            with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:
                raw = _Sink(gz)
                with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for name in _dirs(files):
                        info = tarfile.TarInfo(name)
                        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o555, mtime
                        info.uid, info.gid = dir_owner
                        tar.addfile(info)
                    for f in sorted(files, key=lambda f: f.path):
                        info = tarfile.TarInfo(f.path)
                        info.size, info.mode, info.mtime = f.source.stat().st_size, f.mode, mtime
                        info.uid, info.gid = f.uid, f.gid
                        with open(f.source, "rb") as src:
                            tar.addfile(info, src)
        digest = compressed.digest
        os.replace(tmp, blobs / digest.split(":", 1)[1])
    finally:
        tmp.unlink(missing_ok=True)
    return Descriptor(LAYER_GZIP, digest, compressed.size), raw.digest


def write_layout(layout: Path, files: list[LayerFile], *, ref: str, mtime: int,
                 annotations: dict[str, str] | None = None, dir_owner: tuple[int, int] = (0, 0)) -> Descriptor:
    """An OCI image layout at `layout` (a new directory) holding one image named `ref` (a full
    reference such as `registry.example/app:1.0`: `podman load` and `ctr import` name the image by
    it, `skopeo inspect oci:LAYOUT:REF` selects it); returns the image manifest's descriptor."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer, diff_id = write_layer(blobs, files, mtime, dir_owner)
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]},
              "history": [{"created_by": "jvmkit export", "comment": "containerDisk"}]}
    config_bytes = canonical(config)
    config_desc = Descriptor(CONFIG, _blob(blobs, config_bytes), len(config_bytes))
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config_desc.to_json(),
                "layers": [layer.to_json()], "annotations": dict(sorted((annotations or {}).items()))}
    manifest_bytes = canonical(manifest)
    manifest_desc = Descriptor(MANIFEST, _blob(blobs, manifest_bytes), len(manifest_bytes))
    index = {"schemaVersion": 2, "mediaType": INDEX,
             "manifests": [manifest_desc.to_json(annotations={REF_NAME: ref, CONTAINERD_NAME: ref})]}
    fileio.atomic_write_bytes(layout / "index.json", canonical(index))
    fileio.atomic_write_bytes(layout / "oci-layout", canonical({"imageLayoutVersion": "1.0.0"}))
    return manifest_desc


def write_archive(layout: Path, archive: Path, mtime: int) -> Path:
    """The layout as an oci-archive tar (deterministic: sorted entries, fixed headers)."""
    entries = sorted(p for p in layout.rglob("*") if not p.name.startswith("."))
    with fileio.atomic_open(archive) as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in entries:
            info = tarfile.TarInfo(path.relative_to(layout).as_posix())
            info.mtime, info.uid, info.gid = mtime, 0, 0
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = path.stat().st_size, 0o644
                with open(path, "rb") as src:
                    tar.addfile(info, src)
    return archive
