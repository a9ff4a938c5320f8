"""JDK profiles: named module sets, jlink options and JVM defaults, stored as TOML data.

Profiles live in `jdk-profiles/*.toml` at the top of a checkout and inside the installed wheel as
`jvmkit/jdk-profiles/` (see pyproject.toml); `profile_dirs()` finds whichever exists. A user may
also pass a path to their own `.toml` with the same keys.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from jvmkit.errors import UsageError

DEFAULT_PROFILE = "auto"
GCS = {"g1": "-XX:+UseG1GC", "serial": "-XX:+UseSerialGC", "parallel": "-XX:+UseParallelGC",
       "z": "-XX:+UseZGC", "shenandoah": "-XX:+UseShenandoahGC"}
COMPRESS = ("zip", "none")
RUNTIMES = ("jlink", "copy")  # jlink a trimmed runtime, or copy the build JDK as it is installed


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    runtime: str                    # "jlink" (trimmed, the default) or "copy" (the JDK as installed)
    modules: tuple[str, ...]        # "ALL-MODULE-PATH" means every module of the build JDK
    add_jdeps_modules: bool
    compress: str                   # "zip" or "none"
    strip_debug: bool
    gc: str
    max_ram_percentage: float
    flags: tuple[str, ...]
    source: str                     # where it was read from
    initial_heap_mib: int | None = None   # -XX:InitialHeapSize; None: the JVM's 1/64 of guest memory

    @property
    def all_modules(self) -> bool:
        return "ALL-MODULE-PATH" in self.modules

    def jvm_flags(self) -> list[str]:
        """The JVM flags this profile puts on the guest command line."""
        flags = [GCS[self.gc], f"-XX:MaxRAMPercentage={self.max_ram_percentage:g}"]
        if self.initial_heap_mib is not None:
            flags.append(f"-XX:InitialHeapSize={self.initial_heap_mib}m")
        if self.gc == "z":  # ZGC gives memory back only after ZUncommitDelay (300 s by default)
            flags.append("-XX:ZUncommitDelay=1")
        return [*flags, *self.flags]

    def to_dict(self) -> dict:
        return {"name": self.name, "runtime": self.runtime, "modules": list(self.modules), "gc": self.gc,
                "max_ram_percentage": self.max_ram_percentage, "initial_heap_mib": self.initial_heap_mib,
                "flags": list(self.flags),
                "compress": self.compress, "strip_debug": self.strip_debug}


def profile_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    candidates = [here / "jdk-profiles", here.parent / "jdk-profiles"]
    return [d for d in candidates if d.is_dir()]


def available_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in profile_dirs():
        for path in sorted(directory.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def parse_profile(name: str, data: dict, source: str) -> Profile:
    """Validate a profile's TOML data (pure) and build a Profile."""
    known_top = {"description", "runtime", "modules", "add_jdeps_modules", "jlink", "jvm"}
    unknown = set(data) - known_top
    if unknown:
        raise UsageError(f"profile {source}: unknown key {sorted(unknown)[0]!r} "
                         f"(known: {', '.join(sorted(known_top))})")
    runtime = data.get("runtime", "jlink")
    if runtime not in RUNTIMES:
        raise UsageError(f"profile {source}: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    jlink = data.get("jlink", {})
    jvm = data.get("jvm", {})
    modules = data.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise UsageError(f"profile {source}: 'modules' must be a list of module names")
    compress = jlink.get("compress", "zip")
    compress = "zip" if str(compress).startswith("zip") else str(compress)
    if compress not in COMPRESS:
        raise UsageError(f"profile {source}: jlink.compress must be one of {', '.join(COMPRESS)}")
    gc = jvm.get("gc", "g1")
    if gc not in GCS:
        raise UsageError(f"profile {source}: jvm.gc {gc!r} is not one of {', '.join(GCS)}")
    pct = jvm.get("max_ram_percentage", 75)
    if not isinstance(pct, (int, float)) or not 1 <= pct <= 100:
        raise UsageError(f"profile {source}: jvm.max_ram_percentage must be a number from 1 to 100")
    flags = jvm.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise UsageError(f"profile {source}: jvm.flags must be a list of strings")
    initial = jvm.get("initial_heap_mib")
    if initial is not None and (isinstance(initial, bool) or not isinstance(initial, int) or initial < 1):
        raise UsageError(f"profile {source}: jvm.initial_heap_mib must be a whole number of MiB (at least 1)")
    return Profile(
        name=name,
        description=str(data.get("description", "")),
        runtime=runtime,
        modules=tuple(modules),
        add_jdeps_modules=bool(data.get("add_jdeps_modules", True)),
        compress=compress,
        strip_debug=bool(jlink.get("strip_debug", True)),
        gc=gc,
        max_ram_percentage=float(pct),
        flags=tuple(flags),
        source=source,
        initial_heap_mib=initial,
    )


def load_profile(name_or_path: str | None) -> Profile:
    """Load a profile by name (`auto`, `server`, ...) or from a path to a .toml file."""
    name_or_path = name_or_path or DEFAULT_PROFILE
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UsageError(f"profile file {name_or_path} does not exist")
        name = path.stem
    else:
        profiles = available_profiles()
        if name_or_path not in profiles:
            raise UsageError(f"unknown profile {name_or_path!r} "
                             f"(available: {', '.join(sorted(profiles))}; or give a path to a .toml file)")
        path, name = profiles[name_or_path], name_or_path
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"profile {path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"profile {path}: not valid TOML: {exc}") from None
    return parse_profile(name, data, str(path))
