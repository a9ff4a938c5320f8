"""The shared libraries a runtime's native code needs from outside the runtime.

A jlink'd runtime's ELF files (bin/java, lib/*.so, lib/server/libjvm.so) link against system
libraries (libc, libm, libz, libstdc++, libgcc_s, the dynamic loader). A guest has none of them,
so the image must carry them. This module reads the ELF files themselves (program interpreter and
DT_NEEDED, through `jvmkit.packager.elf`; nothing is executed), resolves each name first inside the
runtime, then in the host's library directories (where the build JDK's own binaries find them), and
returns the closure.
The Linux target takes everything; OSv brings its own libc, so it excludes those names.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from jvmkit.errors import JvmkitError
from jvmkit.packager.elf import dynamic_deps

LIBC_FAMILY = frozenset({"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
                         "ld-linux-x86-64.so.2", "libutil.so.1", "libresolv.so.2"})
DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")


def host_library_dirs() -> list[str]:
    dirs: list[str] = []
    for conf in sorted(glob.glob("/etc/ld.so.conf.d/*.conf")):
        try:
            for line in Path(conf).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line and not line.startswith("include") and line not in dirs:
                    dirs.append(line)
        except OSError:
            pass
    return dirs + [d for d in DEFAULT_DIRS if d not in dirs]


def _elf_files(runtime: Path) -> list[Path]:
    files = []
    for path in sorted(runtime.rglob("*")):
        if path.is_file() and not path.is_symlink() and (path.suffix == ".so" or path.parent.name == "bin"):
            files.append(path)
    return files


def runtime_native_deps(runtime: Path, exclude: frozenset[str] = frozenset(),
                        search: list[str] | None = None) -> list[tuple[str, Path]]:
    """[(guest path, host file)] of the system libraries the runtime needs, closure included.

    Guest paths keep the host's directory (e.g. /lib/x86_64-linux-gnu/libz.so.1) and the program
    interpreter keeps its exact path (/lib64/ld-linux-x86-64.so.2); host files are resolved through
    symlinks so the guest gets real files."""
    search = search if search is not None else host_library_dirs()
    inside = {p.name for p in runtime.rglob("*.so")}
    result: dict[str, Path] = {}
    pending: list[Path] = _elf_files(runtime)
    seen: set[Path] = set()
    missing: list[str] = []
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            with open(path, "rb") as handle:
                deps = dynamic_deps(handle.read())
        except OSError:
            continue
        if deps is None:
            continue
        names = list(deps.needed)
        if deps.interpreter and os.path.basename(deps.interpreter) not in exclude:
            interp = Path(deps.interpreter)
            if deps.interpreter not in result:
                if not interp.exists():
                    missing.append(deps.interpreter)
                else:
                    result[deps.interpreter] = interp.resolve()
                    pending.append(interp.resolve())
        interpreters = {os.path.basename(g) for g in result if g == deps.interpreter or "ld-linux" in g}
        for name in names:
            if name in inside or name in exclude or name in interpreters:
                continue
            if any(g.endswith("/" + name) for g in result):
                continue
            for directory in search:
                candidate = Path(directory) / name
                if candidate.exists():
                    result[f"{directory}/{name}"] = candidate.resolve()
                    pending.append(candidate.resolve())
                    break
            else:
                missing.append(name)
    if missing:
        raise JvmkitError(f"the runtime needs system libraries this host does not have: {', '.join(sorted(set(missing)))}",
                          hint="install them (e.g. zlib1g, libstdc++6) or build with another --jdk")
    return sorted(result.items())


def library_dirs(deps: list[tuple[str, Path]]) -> list[str]:
    """The guest directories that hold the libraries (for LD_LIBRARY_PATH)."""
    return sorted({os.path.dirname(g) for g, _ in deps})
