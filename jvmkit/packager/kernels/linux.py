"""Linux guest kernels: `jvmkit kernel pull/import linux` and the kernel `pack --target linux` uses.

A Debian cloud kernel (`linux-image-*-cloud-amd64`) and a static busybox are taken from Debian's
archive (see `jvmkit.packager.debian`). An entry of the kernel cache (`store`, `kernels/linux/<id>/`)
holds
    vmlinuz        the bzImage as shipped
    vmlinux        the uncompressed ELF taken out of the bzImage's payload (`bzimage`); it carries a
                   PVH entry note (Xen note type 18), so QEMU boots it with `-kernel vmlinux` directly
    config         the kernel's build configuration
    busybox        the static busybox binary
    modules/*.ko   decompressed modules the guest needs that are not built in (`modules`);
                   `modules.order` lists them deps-first
    kernel.json    versions, digests, PVH status, module order, configuration facts
A user's own kernel (`import_linux`) must have the drivers built in: no modules come with it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from jvmkit import cache, fileio, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import debian, elf
from jvmkit.packager.kernels import bzimage, modules, store

TARGET = "linux"
LINUX_META_PACKAGE = "linux-image-cloud-amd64"
LINUX_IMAGE_RE = re.compile(r"linux-image-(\d[\w.+~-]*)-cloud-amd64")
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATHS = ("usr/bin/busybox", "bin/busybox")
CONFIG_FACTS = ("CONFIG_RD_ZSTD", "CONFIG_VIRTIO_BALLOON", "CONFIG_PAGE_REPORTING", "CONFIG_PVH",
                "CONFIG_FW_CFG_SYSFS", "CONFIG_VIRTIO_CONSOLE", "CONFIG_SERIAL_8250_CONSOLE",
                "CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_NET", "CONFIG_HW_RANDOM_VIRTIO")


def parse_kernel_config(text: str) -> dict[str, str]:
    """A kernel .config as {CONFIG_X: value}; `# CONFIG_X is not set` gives "n"."""
    values = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2).strip().strip('"')
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set", line)
        if m:
            values[m.group(1)] = "n"
    return values


# ---- the kernel in the cache ---------------------------------------------------------------------

@dataclass(frozen=True)
class LinuxKernel:
    """A Linux guest kernel in the cache, with the userland the `linux` image needs."""

    path: Path                       # the cache entry
    id: str
    version: str                     # kernel release, e.g. 6.1.0-50-cloud-amd64
    source: str                      # "debian" or "import"
    vmlinux: Path                    # uncompressed ELF with a PVH note: what QEMU boots
    vmlinux_sha256: str
    vmlinuz: Path | None             # the bzImage, when there was one
    busybox: Path                    # static busybox
    modules: tuple[Path, ...]        # decompressed .ko files, load order (dependencies first)
    builtin: tuple[str, ...]         # needed drivers that are built into the kernel
    pvh: bool
    pvh_entry: int | None
    config: Mapping[str, str | None] = field(default_factory=dict)  # CONFIG_FACTS (None: unknown)
    package: str | None = None       # Debian package name
    debian_version: str | None = None
    suite: str | None = None
    debs: Mapping[str, Mapping] = field(default_factory=dict)  # package -> {version, sha256, size, url}

    target = TARGET

    @property
    def sha256(self) -> str:
        return self.vmlinux_sha256

    @property
    def name(self) -> str:
        return self.package or f"linux ({self.source})"

    def describe(self) -> dict:
        return {"target": TARGET, "id": self.id, "name": self.name, "version": self.version,
                "source": self.source, "package": self.package, "debian_version": self.debian_version,
                "suite": self.suite, "sha256": self.vmlinux_sha256, "size": self.vmlinux.stat().st_size,
                "path": str(self.path), "pvh": self.pvh, "modules": [m.name for m in self.modules],
                "builtin": list(self.builtin), "config": dict(self.config),
                "debs": {k: dict(v) for k, v in self.debs.items()}}


def load_linux_kernel(entry: Path) -> LinuxKernel:
    """The LinuxKernel recorded in a cache entry's kernel.json."""
    meta = store.read_meta(entry, TARGET)
    try:
        vmlinuz = meta.get("vmlinuz")
        return LinuxKernel(
            path=entry, id=entry.name, version=meta["version"], source=meta.get("source", "debian"),
            vmlinux=entry / meta.get("vmlinux", "vmlinux"), vmlinux_sha256=meta["sha256"],
            vmlinuz=entry / vmlinuz if vmlinuz else None, busybox=entry / meta.get("busybox", "busybox"),
            modules=tuple(entry / "modules" / m for m in meta.get("modules", [])),
            builtin=tuple(meta.get("builtin", [])), pvh=bool(meta.get("pvh")),
            pvh_entry=int(meta["pvh_entry"], 16) if meta.get("pvh_entry") else None,
            config=meta.get("config", {}), package=meta.get("package"), debian_version=meta.get("debian_version"),
            suite=meta.get("suite"), debs=meta.get("debs", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise store.bad_entry(entry, TARGET, exc) from None


def _usable(entry: store.Entry) -> bool:
    return (entry.path / entry.meta.get("vmlinux", "vmlinux")).is_file()


def cached_linux_kernel(suite: str | None = None) -> LinuxKernel | None:
    """The cached Linux kernel most recently pulled, imported or used (restricted to Debian kernels of
    `suite` when one is given), or None."""
    def wanted(entry: store.Entry) -> bool:
        return _usable(entry) and (not suite or (entry.meta.get("source") == "debian"
                                                 and entry.meta.get("suite") == suite))

    best = store.most_recent(TARGET, wanted)
    return load_linux_kernel(best.path) if best else None


# ---- building an entry from Debian's packages ----------------------------------------------------

def _want(name: str) -> bool:
    return name.startswith("linux-image-") or name == BUSYBOX_PACKAGE


def choose_kernel_package(archive: debian.Archive) -> debian.Package:
    """The newest real `linux-image-<abi>-cloud-amd64` package (pure, given the archive's indexes):
    the one the newest `linux-image-cloud-amd64` metapackage depends on, else the newest by name."""
    meta = archive.newest(LINUX_META_PACKAGE)
    if meta is not None:
        for group in meta.relations():
            for rel in group:
                if LINUX_IMAGE_RE.fullmatch(rel.name):
                    pkg = archive.find(rel)
                    if pkg is not None:
                        return pkg
    images = [p for index in archive.indexes for p in index.packages if LINUX_IMAGE_RE.fullmatch(p.name)]
    if not images:
        raise JvmkitError(f"no {LINUX_META_PACKAGE} or linux-image-*-cloud-amd64 in Debian's {archive.suite} index",
                          hint="choose another suite with --suite")
    return max(images, key=lambda p: (debian.version_key(p.version), p.name))


def _find_one(directory: Path, pattern: str, what: str) -> Path:
    found = sorted(directory.glob(pattern))
    if not found:
        raise JvmkitError(f"the kernel package has no {what}")
    return found[-1]


def busybox_from_deb(deb: Path, pkg: debian.Package, scratch: Path) -> bytes:
    """The static busybox binary of a busybox-static .deb (unpacked into `scratch`, then removed)."""
    try:
        debian.extract_deb(deb, scratch, select=lambda p: p in BUSYBOX_PATHS)
        src = next((scratch / p for p in BUSYBOX_PATHS if (scratch / p).is_file()), None)
        if src is None:
            raise JvmkitError(f"{pkg.name} {pkg.version} has no bin/busybox")
        data = src.read_bytes()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not elf.is_static_elf(data):
        raise JvmkitError(f"{pkg.name}: bin/busybox is not a statically linked ELF executable")
    return data


def build_linux_entry(dest: Path, kernel_deb: Path, busybox_deb: Path, *, kernel_pkg: debian.Package,
                      busybox_pkg: debian.Package, suite: str, archive: list[dict]) -> dict:
    """Fill a new cache entry from the two verified .deb files; returns the kernel.json written."""
    console = ui.current()
    scratch = dest / ".unpack"
    try:
        with console.step(f"unpacking {kernel_pkg.name}"):
            debian.extract_deb(kernel_deb, scratch, select=lambda p: p.startswith("boot/")
                               or re.match(r"(usr/)?lib/modules/[^/]+/", p) is not None)
        vmlinuz_path = _find_one(scratch / "boot", "vmlinuz-*", "boot/vmlinuz-*")
        release = vmlinuz_path.name[len("vmlinuz-"):]
        modroot = next((p for p in (scratch / "lib/modules" / release, scratch / "usr/lib/modules" / release)
                        if p.is_dir()), None)
        if modroot is None:
            raise JvmkitError(f"{kernel_pkg.name} has no lib/modules/{release}")
        config_path = scratch / "boot" / f"config-{release}"
        config_all = parse_kernel_config(config_path.read_text()) if config_path.is_file() else {}
        if config_path.is_file():
            store.write_file(dest / "config", config_path.read_bytes())

        image = vmlinuz_path.read_bytes()
        with console.step("extracting vmlinux from the bzImage"):
            try:
                vmlinux, compression = bzimage.extract_vmlinux(image)
            except ValueError as exc:
                raise JvmkitError(f"{vmlinuz_path.name}: {exc}") from None
        entry_point = elf.pvh_entry(vmlinux)
        if entry_point is None:
            console.warn(f"{kernel_pkg.name}: vmlinux has no PVH entry note; QEMU can't boot it directly")
        store.write_file(dest / "vmlinuz", image)
        store.write_file(dest / "vmlinux", vmlinux)
        plan, names = modules.copy_guest_modules(modules.ModuleTree(modroot), dest / "modules")
        store.write_file(dest / "modules.order", "".join(n + "\n" for n in names).encode())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    busybox = busybox_from_deb(busybox_deb, busybox_pkg, scratch)
    store.write_file(dest / "busybox", busybox, 0o755)

    return store.write_meta(dest, TARGET, {
        "source": "debian", "version": release, "package": kernel_pkg.name, "debian_version": kernel_pkg.version,
        "suite": suite, "archive": archive,
        "debs": {kernel_pkg.name: kernel_pkg.to_dict(), busybox_pkg.name: busybox_pkg.to_dict()},
        "vmlinuz": "vmlinuz", "vmlinuz_sha256": fileio.sha256_bytes(image), "payload_compression": compression,
        "vmlinux": "vmlinux", "sha256": fileio.sha256_bytes(vmlinux), "size": len(vmlinux),
        "pvh": entry_point is not None, "pvh_entry": f"{entry_point:#x}" if entry_point is not None else None,
        "busybox": "busybox", "busybox_sha256": fileio.sha256_bytes(busybox), "busybox_version": busybox_pkg.version,
        "modules": names, "builtin": list(plan.builtin), "missing_optional": list(plan.missing),
        "config": {key: config_all.get(key) for key in CONFIG_FACTS},
    })


def linux_entry_id(release: str, kernel_sha256: str, busybox_sha256: str) -> str:
    digest = fileio.sha256_bytes(f"{store.LAYOUTS[TARGET]}\n{kernel_sha256}\n{busybox_sha256}".encode())[:12]
    return f"{store.safe_name(release)}-{digest}"


# ---- pull, import, resolve -----------------------------------------------------------------------

def pull_linux(suite: str | None = None, mirror: str | None = None, refresh: bool = False) -> LinuxKernel:
    """Find the newest Debian cloud kernel and busybox-static for `suite`, download and verify them,
    and build the cache entry (reused when it already exists). `refresh` re-reads the indexes.

    Offline with a kernel cached: warns and returns the cached one; with none: one JvmkitError."""
    console = ui.current()
    suite = debian.choose_suite(suite)
    console.info(f"jvmkit: looking for the Debian {suite} cloud kernel and {BUSYBOX_PACKAGE}")
    try:
        archive = debian.open_archive(suite, mirror, refresh=refresh, want=_want)
    except debian.ArchiveUnavailable:
        cached = cached_linux_kernel(suite)
        if cached is None:
            raise
        console.warn(f"Debian's archive is not reachable; using the cached kernel {cached.version}")
        return cached
    kernel_pkg = choose_kernel_package(archive)
    busybox_pkg = archive.newest(BUSYBOX_PACKAGE)
    if busybox_pkg is None:
        raise JvmkitError(f"no {BUSYBOX_PACKAGE} in Debian's {suite} index")
    release = LINUX_IMAGE_RE.fullmatch(kernel_pkg.name)
    release_name = f"{release.group(1)}-cloud-amd64" if release else kernel_pkg.name
    console.info(f"  kernel {kernel_pkg.name} {kernel_pkg.version} ({kernel_pkg.suite}), "
                 f"{BUSYBOX_PACKAGE} {busybox_pkg.version} ({busybox_pkg.suite})")
    if not archive.verified:
        reason = next(i.signature for i in archive.indexes if not i.verified)
        console.warn(f"the archive's signature was {reason}; the downloads are checked against the "
                     "index's SHA-256 only")
    key = linux_entry_id(release_name, kernel_pkg.sha256, busybox_pkg.sha256)

    def build(tmp: Path) -> None:
        sess = debian.session()
        kernel_deb = debian.fetch_deb(kernel_pkg, sess=sess)
        busybox_deb = debian.fetch_deb(busybox_pkg, sess=sess)
        build_linux_entry(tmp, kernel_deb, busybox_deb, kernel_pkg=kernel_pkg, busybox_pkg=busybox_pkg,
                          suite=suite, archive=archive.describe())

    entry, built = store.kernel_entry(TARGET, key, build, version=release_name)
    kernel = load_linux_kernel(entry)
    if not built:
        console.info(f"  {kernel.version}: already in the cache")
    return kernel


def ensure_linux_kernel(suite: str | None = None, mirror: str | None = None, refresh: bool = False) -> LinuxKernel:
    """The cached Linux kernel (see `cached_linux_kernel`), pulled from Debian's archive if there is none
    (or when `refresh` is set). A cached kernel is used without asking the network for newer ones."""
    if not refresh:
        kernel = cached_linux_kernel(suite)
        if kernel is not None:
            cache.touch_entry(kernel.path)
            return kernel
    return pull_linux(suite=suite, mirror=mirror, refresh=refresh)


def resolve_linux_kernel(kernel: Path | None = None, *, suite: str | None = None,
                         mirror: str | None = None) -> LinuxKernel:
    """The kernel `pack --target linux` uses: `--kernel PATH` (a bzImage, vmlinux, or a cache entry
    directory) when given, else the cached or freshly pulled Debian kernel."""
    if kernel is None:
        return ensure_linux_kernel(suite=suite, mirror=mirror)
    kernel = Path(kernel)
    if kernel.is_dir() and (kernel / store.KERNEL_JSON).is_file():
        return load_linux_kernel(kernel)
    return import_linux(kernel, suite=suite, mirror=mirror)


def _busybox_for_import(busybox: Path | None, suite: str | None, mirror: str | None) -> tuple[bytes, str]:
    if busybox is not None:
        data = Path(busybox).read_bytes()
        if not elf.is_static_elf(data):
            raise UsageError(f"{busybox} is not a statically linked ELF executable")
        return data, str(busybox)
    cached = store.most_recent(TARGET, lambda e: e.meta.get("source") == "debian" and _usable(e)
                               and (e.path / "busybox").is_file())
    if cached is not None:
        return ((cached.path / "busybox").read_bytes(),
                f"{BUSYBOX_PACKAGE} {cached.meta.get('busybox_version', '')}".strip())
    archive = debian.open_archive(suite, mirror, want=lambda n: n == BUSYBOX_PACKAGE)
    pkg = archive.newest(BUSYBOX_PACKAGE)
    if pkg is None:
        raise JvmkitError(f"no {BUSYBOX_PACKAGE} in Debian's {archive.suite} index")
    scratch = cache.cache_dir("debian") / f".busybox.{os.getpid()}"
    return busybox_from_deb(debian.fetch_deb(pkg), pkg, scratch), f"{pkg.name} {pkg.version}"


def import_linux(path: Path, *, busybox: Path | None = None, suite: str | None = None,
                 mirror: str | None = None) -> LinuxKernel:
    """Add a user's own kernel (bzImage, or an uncompressed vmlinux with a PVH note) to the cache.

    No modules come with it: the virtio drivers must be built in. busybox comes from `busybox`, from a
    cached Debian kernel entry, or from Debian's archive."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"kernel {path} does not exist")
    image = path.read_bytes()
    vmlinuz: bytes | None = None
    if elf.is_elf(image):
        vmlinux = image
    elif bzimage.bzimage_header(image):
        vmlinuz = image
        try:
            vmlinux, _fmt = bzimage.extract_vmlinux(image)
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from None
    else:
        raise UsageError(f"{path} is not a Linux kernel (neither a bzImage nor an ELF vmlinux)")
    entry_point = elf.pvh_entry(vmlinux)
    if entry_point is None:
        raise UsageError(f"{path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)",
                         hint="jvmkit boots the uncompressed kernel directly; build it with CONFIG_PVH=y")
    release = bzimage.kernel_release(image) or bzimage.kernel_release(vmlinux) or "unknown"
    guess = modules.builtin_driver_guess(vmlinux)
    absent = [n for n, ok in guess.items() if not ok and n not in modules.OPTIONAL_MODULES]
    if absent:
        ui.current().warn(f"{path.name}: no sign of built-in {', '.join(absent)}; an imported kernel gets no "
                          "modules, so the guest may lack these devices (build them in: =y)")
    digest = fileio.sha256_bytes(vmlinux)
    key = f"import-{store.safe_name(release)}-{digest[:12]}"

    def build(tmp: Path) -> None:  # only when this kernel is not in the cache yet
        bb, bb_origin = _busybox_for_import(busybox, suite, mirror)
        store.write_file(tmp / "vmlinux", vmlinux)
        if vmlinuz is not None:
            store.write_file(tmp / "vmlinuz", vmlinuz)
        store.write_file(tmp / "busybox", bb, 0o755)
        (tmp / "modules").mkdir()
        store.write_file(tmp / "modules.order", b"")
        store.write_meta(tmp, TARGET, {
            "source": "import", "version": release, "imported_from": str(path.resolve()), "vmlinux": "vmlinux",
            "vmlinuz": "vmlinuz" if vmlinuz is not None else None, "sha256": digest, "size": len(vmlinux),
            "pvh": True, "pvh_entry": f"{entry_point:#x}", "busybox": "busybox",
            "busybox_sha256": fileio.sha256_bytes(bb), "busybox_version": bb_origin, "modules": [],
            "builtin": [n for n, ok in guess.items() if ok], "config": {k: None for k in CONFIG_FACTS}})

    entry, _built = store.kernel_entry(TARGET, key, build, version=release)
    return load_linux_kernel(entry)
