"""Guest kernel modules for the Linux target: which drivers the guest needs, their load order, and
taking them out of an unpacked kernel package (`lib/modules/<release>/`) decompressed.

Debian's cloud kernel builds the virtio drivers as modules; the guest's init loads the ones in
`modules.order` (dependencies first) before anything else. A kernel that has a driver built in
needs no module for it. Pure functions (names, modules.dep, modinfo, the plan) are kept apart from
the file reading (`ModuleTree`, `copy_guest_modules`).
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import zstandard

from jvmkit.errors import JvmkitError
from jvmkit.packager import elf
from jvmkit.packager.kernels import store

# The drivers the guest needs, in the order the init loads them (dependencies are put first).
# virtio_pci is the bus every other virtio device sits on with `-M pc`.
GUEST_MODULES = ("virtio_pci", "virtio_balloon", "virtio_net", "virtio_rng", "qemu_fw_cfg")
OPTIONAL_MODULES = frozenset({"virtio_rng"})
# The name each guest driver registers with (a NUL-terminated string in a kernel that has it built in).
DRIVER_NAMES = {"virtio_pci": "virtio-pci", "virtio_balloon": "virtio_balloon", "virtio_net": "virtio_net",
                "virtio_rng": "virtio_rng", "qemu_fw_cfg": "fw_cfg"}
MODULE_SUFFIX = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def module_name(path: str) -> str:
    """`kernel/drivers/char/hw_random/virtio-rng.ko.xz` -> `virtio_rng`."""
    base = MODULE_SUFFIX.sub("", os.path.basename(path))
    return base.replace("-", "_")


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The `.modinfo` key=value strings of a kernel module (e.g. depends, name, vermagic).
    Raises ValueError when `ko` is not an ELF file."""
    info: dict[str, list[str]] = {}
    for item in (elf.section_data(ko, ".modinfo") or b"").split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def parse_modules_dep(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """modules.dep -> {name: (path, (dependency names...))}."""
    result = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if sep and path.strip():
            result[module_name(path.strip())] = (path.strip(), tuple(module_name(d) for d in deps.split()))
    return result


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def builtin_driver_guess(vmlinux: bytes) -> dict[str, bool]:
    """Whether each guest driver looks built into a kernel (its driver name string is present).

    A heuristic for imported kernels, whose configuration we usually don't have: a modular kernel
    (like Debian's) has none of these strings."""
    return {name: re.search(b"\0" + DRIVER_NAMES.get(name, name).encode() + b"\0", vmlinux) is not None
            for name in GUEST_MODULES}


@dataclass(frozen=True)
class ModulePlan:
    order: tuple[str, ...]      # modules to load, dependencies first
    builtin: tuple[str, ...]    # wanted or needed modules that are built into the kernel
    missing: tuple[str, ...]    # optional wanted modules that exist neither way


def plan_modules(wanted: Iterable[str], deps_of: Callable[[str], Iterable[str] | None], builtin: set[str],
                 optional: Iterable[str] = ()) -> ModulePlan:
    """The load order for `wanted` modules and their dependencies (pure, deterministic).

    `deps_of(name)` gives a module's dependencies, or None when there is no such module file. Built-in
    modules need no loading; a missing optional module is left out; a missing required one (or a
    dependency cycle) raises JvmkitError."""
    optional = {module_name(o) for o in optional}
    order: list[str] = []
    done: set[str] = set()
    used_builtin: list[str] = []
    missing: list[str] = []

    def visit(name: str, chain: tuple[str, ...], required: bool) -> bool:
        if name in done:
            return True
        if name in chain:
            raise JvmkitError(f"kernel module dependency cycle: {' -> '.join(chain + (name,))}")
        if name in builtin:
            if name not in used_builtin:
                used_builtin.append(name)
            return True
        deps = deps_of(name)
        if deps is None:
            if required:
                via = f" (needed by {chain[-1]})" if chain else ""
                raise JvmkitError(f"the kernel has no module {name}{via} and it is not built in")
            missing.append(name)
            return False
        for dep in deps:
            visit(module_name(dep), chain + (name,), True)
        done.add(name)
        order.append(name)
        return True

    for want in wanted:
        name = module_name(want)
        visit(name, (), name not in optional)
    return ModulePlan(tuple(order), tuple(used_builtin), tuple(missing))


def decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    return data


class ModuleTree:
    """The modules of an unpacked kernel package (`lib/modules/<release>/`), for `plan_modules`."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, Path] = {}
        for path in sorted(root.rglob("*.ko*")):
            if MODULE_SUFFIX.search(path.name):
                self.files.setdefault(module_name(path.name), path)
        dep_file = root / "modules.dep"
        self.dep = parse_modules_dep(dep_file.read_text()) if dep_file.is_file() else None
        builtin = root / "modules.builtin"
        self.builtin = parse_modules_builtin(builtin.read_text()) if builtin.is_file() else set()
        self._cache: dict[str, bytes] = {}

    def data(self, name: str) -> bytes:
        if name not in self._cache:
            self._cache[name] = decompress_module(self.files[name])
        return self._cache[name]

    def deps_of(self, name: str) -> tuple[str, ...] | None:
        if name not in self.files:
            return None
        if self.dep is not None and name in self.dep:
            return self.dep[name][1]
        depends = modinfo(self.data(name)).get("depends", [""])[0]
        return tuple(module_name(d) for d in depends.split(",") if d.strip())


def copy_guest_modules(tree: ModuleTree, dest: Path) -> tuple[ModulePlan, list[str]]:
    """Write the guest's modules (GUEST_MODULES and their dependencies, decompressed) into `dest`;
    returns the plan and the file names in load order."""
    plan = plan_modules(GUEST_MODULES, tree.deps_of, tree.builtin, OPTIONAL_MODULES)
    dest.mkdir()
    names = []
    for name in plan.order:
        ko = tree.data(name)
        if not elf.is_elf(ko):
            raise JvmkitError(f"{tree.files[name].name} did not decompress to an ELF module")
        store.write_file(dest / f"{name}.ko", ko)
        names.append(f"{name}.ko")
    return plan, names
