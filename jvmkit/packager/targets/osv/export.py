"""`jvmkit export IMAGE --format raw|qcow2`: an osv image as the classic single-file OSv disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from jvmkit import fileio, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import zstd
from jvmkit.packager.manifest import KernelInfo
from jvmkit.packager.targets.osv import disk as osv_disk


def _find_loader_image(kernel: KernelInfo) -> Path | None:
    from jvmkit.packager.kernels import osv as osv_kernels

    wanted = kernel.loader_image_sha256
    for row in osv_kernels.list_osv_kernels():
        if not row.get("loader_image"):
            continue
        found = osv_kernels.load_osv_kernel(Path(row["path"]))
        if found.loader_image is None:
            continue
        if (wanted and found.loader_image_sha256 == wanted) or (not wanted and found.sha256 == kernel.sha256):
            return found.loader_image
    return None


FORMATS = ("raw", "qcow2")


def export_classic(image, loader_image: str | os.PathLike | None, dest: str | os.PathLike,
                   fmt: str = "raw") -> Path:
    """Write the classic single-file OSv disk of an osv image (`jvmkit export IMAGE --format raw|qcow2`):
    OSv's loader image (boot sector + compressed loader), the image's command line at byte 512, and
    its ROFS in MBR partition #2. The loader image is `loader_image`, else the one cached with the
    image's kernel. `image` is a loaded `bundle.Bundle` of the osv target."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)} for an osv image")
    kernel = image.manifest.kernel
    if loader_image is None:
        loader = _find_loader_image(kernel)
        if loader is None:
            raise JvmkitError(
                f"no OSv loader image for this image's kernel ({kernel.version or '?'}) is in the cache; "
                "a classic disk boots through OSv's loader image, not the loader ELF",
                hint="import it with `jvmkit kernel import osv PATH/TO/osv/build/last/loader.img` (next to the "
                     "loader-stripped.elf you packed with), or pass the loader image with --loader")
    else:
        loader = Path(loader_image)
        if not loader.is_file():
            raise UsageError(f"--loader {loader} does not exist", hint="pass OSv's build/last/loader.img")
        expected = kernel.loader_image_sha256
        if expected and fileio.sha256_file(loader) != expected:
            ui.current().warn(f"{loader} is not the loader image recorded with this image's kernel; "
                              "the disk boots the kernel inside it")
    record = image.manifest.files["disk"]
    dest = Path(dest)
    cmdline = image.manifest.boot.kernel_cmdline
    with open(image.file("disk"), "rb") as compressed:
        reader = zstd.CheckedReader(compressed, f"image {image.path}: its disk ({record.path})")
        rofs = fileio.Window(reader, int(record.rofs_offset), int(record.rofs_size), what="the image's disk",
                             hint="pack it again")
        if fmt == "raw":
            osv_disk.write_classic_disk(loader, cmdline, rofs, dest)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".raw", dir=dest.parent)
        os.close(fd)
        try:
            osv_disk.write_classic_disk(loader, cmdline, rofs, tmp_name)
            osv_disk.convert_to_qcow2(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    return dest
