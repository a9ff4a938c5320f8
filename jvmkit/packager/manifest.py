"""The image manifest (`manifest.json`) as frozen, versioned dataclasses.

`Manifest.from_json(data)` checks every field's type on the way in (an image may come from
someone else: a wrong type or a missing field is one line naming the field, never a KeyError deep
in the runner) and `to_json()` writes the same key layout back, so a manifest round-trips. The
`boot` section belongs to the target: each target names its own dataclass (`Target.boot_type`),
and `from_json` picks it by the manifest's `target`.

Format 1 is what every jvmkit so far has written. Keys that jvmkit used to write and no code ever
read (`boot.quiet_append`, `boot.verbose_append`, `boot.app_console`, `boot.seed_device`,
`boot.console_filter`) are ignored on the way in and no longer written; unknown keys are ignored
too, so an older jvmkit's image still loads. Beyond types, `manifest_limits` bounds sizes, counts,
strings and nesting, and checks roles, paths, digests, the machine type and the boot section's
names against allow-lists (an image may be hostile).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from jvmkit.errors import UsageError
from jvmkit.packager import manifest_limits as limits

FORMAT = 1


class ManifestError(UsageError):
    """A manifest field is missing or has the wrong type (bad input: exit status 2)."""


def omit_none() -> dict:
    """Field metadata: leave the key out of the JSON when the value is None."""
    return {"omit_none": True}


# ---- a small codec: dataclasses <-> JSON-shaped data, with type checks ---------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _decode(tp, value, where: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(option, value, where)
            except ManifestError as exc:
                errors.append(exc)
        raise errors[0] if errors else ManifestError(f"{where} must not be null")
    if dataclasses.is_dataclass(tp):
        return decode(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ManifestError(f"{where} must be a list")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where} must be an object")
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _decode(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{where} must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where} must be a whole number")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ManifestError(f"{where} must be {'a string' if tp is str else 'true or false'}")
        return value
    raise TypeError(f"manifest codec: unsupported type {tp!r} at {where}")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # resolving the annotations is most of a manifest's decode time


def decode(cls, data, where: str = "manifest"):
    """Build dataclass `cls` from JSON-shaped `data`, checking every field (unknown keys ignored)."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where} must be an object")
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = f.name
        if key not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ManifestError(f"{where}.{key} is missing")
        values[key] = _decode(hints[key], data[key], f"{where}.{key}")
    return cls(**values)


def encode(value):
    """JSON-shaped data from a dataclass (tuples become lists; `omit_none` fields left out when None)."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            if f.metadata.get("flatten"):
                out.update(encode(v))
                continue
            out[f.name] = encode(v)
        return out
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


# ---- the sections -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRecord:
    """One file of the bundle: where it is, its digest and size, and (compressed files) the same
    for its raw form, which `run` unpacks into the boot cache."""

    path: str
    sha256: str
    size: int
    compression: str | None = field(default=None, metadata=omit_none())
    raw_sha256: str | None = field(default=None, metadata=omit_none())
    raw_size: int | None = field(default=None, metadata=omit_none())
    rofs_offset: int | None = field(default=None, metadata=omit_none())   # osv disk: where its ROFS starts
    rofs_size: int | None = field(default=None, metadata=omit_none())


@dataclass(frozen=True)
class AppInfo:
    """The app as `jar.analyze` found it: its jar (file name only: no host paths in manifests), the
    main class and where it came from, the guest class path, what jdeps found, and the JVM flags
    its manifest asks for (Add-Opens, Launcher-Agent, ...)."""

    jar: str
    main_class: str
    class_path: tuple[str, ...]
    jar_sha256: str
    args: tuple[str, ...] = ()
    main_class_source: str | None = None
    class_path_sources: tuple[str, ...] = ()
    modular: bool = False
    multi_release: bool = False
    add_opens: tuple[str, ...] = ()
    add_exports: tuple[str, ...] = ()
    launcher_agent: str | None = None
    enable_native_access: Any = False
    jdeps_modules: tuple[str, ...] = ()
    add_modules: tuple[str, ...] = ()
    manifest_jvm_flags: tuple[str, ...] = ()
    jvm_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class JdkInfo:
    """The runtime in the image: the build JDK's version, the modules jlink kept, the profile it was
    made with, and its CDS archives (default, AppCDS, or the OSv Launcher's)."""

    version: str
    release: int
    modules: tuple[str, ...]
    profile: dict[str, Any]
    cds: bool = False
    runtime_size: int = 0
    runtime_key: str | None = None
    appcds: str | None = None
    launcher_cds: str | None = None


@dataclass(frozen=True)
class AgentInfo:  # the guest agent jar's place in the image and its build key
    path: str
    key: str


@dataclass(frozen=True)
class KernelInfo:
    """What kernel the image boots. Targets describe their kernels differently (a Debian package
    and its modules, an OSv build and its loader image); the common fields are typed, the rest is
    kept as it was written (`details`)."""

    name: str | None = None
    version: str | None = None
    sha256: str | None = None
    target: str | None = None
    has_balloon: bool | None = field(default=None, metadata=omit_none())
    loader_image_sha256: str | None = field(default=None, metadata=omit_none())
    details: dict[str, Any] = field(default_factory=dict, metadata={"flatten": True})

    @classmethod
    def from_json(cls, data, where: str = "manifest.kernel") -> "KernelInfo":
        if not isinstance(data, dict):
            raise ManifestError(f"{where} must be an object")
        typed = {f.name for f in dataclasses.fields(cls)} - {"details"}
        base = decode(cls, {k: v for k, v in data.items() if k in typed}, where)
        return dataclasses.replace(base, details={k: v for k, v in data.items() if k not in typed})


@dataclass(frozen=True)
class CommandInfo:
    """The guest's java command line (without app arguments), the default app arguments, and which
    of its words start the guest agent (those are used only by `run --balloon`)."""

    java: tuple[str, ...]
    args: tuple[str, ...] = ()
    agent_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Defaults:  # what `run` gives the guest unless told otherwise
    memory_mib: int
    cpus: int


@dataclass(frozen=True)
class GuestInfo:
    """Ports the app listens on in the guest (documentation for `--publish`), and the agent's JMX port."""

    ports: tuple[int, ...] = ()
    jmx_port: int = 7091


@dataclass(frozen=True)
class SnapshotInfo:
    """A VM saved once the app was ready (`jvmkit snapshot`, `pack --snapshot`): what it was taken
    from, which a restore must match (jvmkit.vm.snapshot.mismatch), and its files under `snapshot/`.

    Not part of `files`: the image proper stays as reproducible as before and `bundle.load` does
    not verify a snapshot; a restore checks the state file's digest itself and boots cold, with a
    notice, when it does not match. The files are 0600: the state holds the guest's memory."""

    state: FileRecord                # QEMU's migration stream, zstd
    output: FileRecord               # the app's output up to the snapshot, replayed by a restore
    token: str                       # the file (0600) with the token the guest agent's restore session asks for
    boot_files: dict[str, str]       # role -> raw SHA-256 of what QEMU booted (kernel, initramfs or disk)
    qemu_version: str
    accel: str                       # tcg or kvm
    cpu_model: str
    machine: str                     # QEMU's -machine option (q35: with its split of RAM around 4 GiB)
    memory_mib: int
    cpus: int
    devices: tuple[str, ...]         # the device signature (jvmkit.vm.qemu.device_signature)
    args: tuple[str, ...]            # the app arguments the snapshot ran with
    ready: str                       # how readiness was decided: "signal", "port 8080", "line REGEX", "after 5s"
    control_port: int                # the guest agent's snapshot control port in the guest
    clock: str = "none"              # how a restore sets the guest's wall clock (Target.restore_traits)
    network: str = ""                # the network backend it was saved on (slirp, passt; "" not recorded)
    guest_used_mib: int | None = field(default=None, metadata=omit_none())   # MemTotal - MemFree after the trim
    heap_committed_mib: int | None = field(default=None, metadata=omit_none())
    taken: str = ""                  # when (UTC, ISO 8601): snapshots are not reproducible
    created_by: str = ""


@dataclass(frozen=True)
class Manifest:
    name: str
    target: str
    app: AppInfo
    jdk: JdkInfo
    agent: AgentInfo
    kernel: KernelInfo
    command: CommandInfo
    defaults: Defaults
    files: dict[str, FileRecord]
    boot: Any                        # the target's boot dataclass (Target.boot_type)
    guest: GuestInfo = GuestInfo()
    created_by: str = ""
    source_date_epoch: int = 0
    format: int = FORMAT
    snapshot: SnapshotInfo | None = field(default=None, metadata=omit_none())  # jvmkit snapshot

    @classmethod
    def from_json(cls, data) -> "Manifest":
        from jvmkit.packager import targets

        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object")
        limits.check_json(data)
        fmt = data.get("format")
        if fmt != FORMAT:
            raise ManifestError(f"manifest format {fmt!r} is not the format {FORMAT} this jvmkit reads")
        name = data.get("target")
        target = targets.lookup(name) if isinstance(name, str) else None
        if target is None:
            raise ManifestError(f"manifest.target {name!r} is not one of {', '.join(targets.names())}")
        if "boot" not in data:
            raise ManifestError("manifest.boot is missing")
        plain = {k: v for k, v in data.items() if k not in ("kernel", "boot")}
        plain.setdefault("kernel", {})
        plain["boot"] = None
        base = decode(cls, {**plain, "kernel": {}}, "manifest")
        kernel = KernelInfo.from_json(data.get("kernel", {}))
        boot = decode(target.boot_type, data.get("boot"), "manifest.boot")
        manifest = dataclasses.replace(base, kernel=kernel, boot=boot)
        limits.check(manifest, target)
        return manifest

    def to_json(self) -> dict:
        return encode(self)

    def file(self, role: str) -> FileRecord | None:
        return self.files.get(role)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())
