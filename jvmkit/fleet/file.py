"""The fleet file of `jvmkit up` / `jvmkit down`: parsed, checked with file:line errors, expanded.

    name = "shop"                 # the fleet's name [the file's name without .toml]
    host_memory = "6G"            # what all VMs on the host together may use [MemTotal minus a reserve]
    parallel = 2                  # VMs booting at once [all]
    [[vm]]
    name = "cache"
    image = "cache-service.jvmkit"   # relative to this file
    replicas = 4                  # cache-1 .. cache-4 (one replica keeps the name as it is)
    memory = "1G"                 # ceiling per VM [the image's default]
    min_memory = "256M"           # floor per VM [a share of memory]
    weight = 2                    # share under contention [1]
    publish = ["18080+:8080"]     # one host port per replica, counting up; or "18080,18090:8080"
    args = ["--port", "8080"]     # the app's arguments [the image's]
    restart = "on-failure"        # "no" | "on-failure" | "always", with backoff ["no"]
    cpus = 1                      # [the image's]
    balloon = true                # the JVM-aware balloon, in the host's budget [true]
    accel = "auto"                # auto | kvm | tcg [auto]
    balloon_log = "logs/{name}.jsonl"  # each VM's balloon decisions as JSON lines (relative to this file)
    network = "outbound"          # outbound | isolated, and allow_host_loopback = true (as `run`)
    engine = "qemu"               # qemu | libvirt (a transient libvirt domain), connect = "URI"

Values are checked with the kinds of jvmkit.settings (the same as jvmkit.toml's), and every
mistake is one line naming the file, the line and what to write instead (`UsageError`).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from jvmkit.engines import ENGINES
from jvmkit.errors import UsageError
from jvmkit.settings import ACCELS, FLAG, SIZE, TCG_CACHE, TEXT, Choice, Integer, Invalid, ListOf, PathKind
from jvmkit.vm.network import MODES

RESTART = ("no", "on-failure", "always")
MAX_REPLICAS = 64

TOP = {"name": TEXT, "host_memory": SIZE, "parallel": Integer(1, 64)}
VM = {"name": TEXT, "image": PathKind(), "replicas": Integer(1, MAX_REPLICAS), "memory": SIZE, "min_memory": SIZE,
      "weight": Integer(1, 1000), "publish": ListOf(TEXT), "args": ListOf(TEXT), "restart": Choice(RESTART),
      "cpus": Integer(1, 64), "balloon": FLAG, "accel": Choice(ACCELS), "balloon_log": TEXT,
      "network": Choice(MODES), "allow_host_loopback": FLAG, "engine": Choice(ENGINES), "connect": TEXT,
      "tcg_cache": TCG_CACHE}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,54}$")  # room for "-NN" within a VM name's 63


@dataclass(frozen=True)
class VmSpec:
    """One VM of the fleet (a replica), as `jvmkit up` starts it."""
    name: str
    group: str                      # the [[vm]] entry's name
    index: int                      # 1-based replica number
    image: Path
    line: int                       # the line of its [[vm]] entry
    entry: int = 0                  # which [[vm]] entry (0-based)
    memory_mib: int | None = None
    min_memory_mib: int | None = None
    weight: int = 1
    publish: tuple[str, ...] = ()   # expanded: "ADDR:HOST:GUEST" for this replica
    args: tuple[str, ...] | None = None
    restart: str = "no"
    cpus: int | None = None
    balloon: bool = True
    accel: str = "auto"
    balloon_log: Path | None = None
    network: str | None = None      # outbound | isolated [run's default]
    allow_host_loopback: bool = False
    engine: str = "qemu"            # qemu | libvirt (a transient domain, `run --engine libvirt`)
    connect: str | None = None      # libvirt's URI [run's default]
    tcg_cache_mib: int | None = None  # under TCG: the translation cache [run's default]

    def run_args(self) -> list[str]:
        """`jvmkit run` arguments that start this VM."""
        argv = ["run", "--name", self.name, "--accel", self.accel]
        if self.engine != "qemu":
            argv += ["--engine", self.engine] + (["--connect", self.connect] if self.connect else [])
        if self.network:
            argv += ["--network", self.network]
        if self.allow_host_loopback:
            argv.append("--allow-host-loopback")
        if self.tcg_cache_mib:
            argv += ["--tcg-cache", f"{self.tcg_cache_mib}M"]
        if self.memory_mib:
            argv += ["--memory", f"{self.memory_mib}M"]
        if self.cpus:
            argv += ["--cpus", str(self.cpus)]
        for spec in self.publish:
            argv += ["--publish", spec]
        if self.balloon:
            argv += ["--balloon", "--weight", str(self.weight)]
            if self.min_memory_mib:
                argv += ["--min-memory", f"{self.min_memory_mib}M"]
            if self.balloon_log:
                argv += ["--balloon-log", str(self.balloon_log)]
        argv.append(str(self.image))
        if self.args is not None:
            argv += ["--", *self.args]
        return argv


@dataclass(frozen=True)
class Fleet:
    name: str
    path: Path
    vms: tuple[VmSpec, ...]
    host_memory_mib: int | None = None
    parallel: int | None = None
    groups: tuple[str, ...] = field(default=())

    def get(self, name: str) -> VmSpec | None:
        return next((v for v in self.vms if v.name == name), None)


# ---- lines ---------------------------------------------------------------------------------------

def _key_re(key: str) -> re.Pattern:
    return re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")


def line_of(text: str, key: str | None, entry: int | None = None) -> int | None:
    """The line setting `key` at the top (entry None) or in the entry-th `[[vm]]` (0-based); with
    key None the line of that `[[vm]]` itself. Falls back to the entry's line."""
    current, entry_line = None, None  # None: the top level; -1: some other table
    count = -1
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[["):
            if stripped.strip("[] ") == "vm":
                count += 1
                current = count
                if count == entry:
                    entry_line = number
                    if key is None:
                        return number
            else:
                current = -1
            continue
        if stripped.startswith("["):
            current = -1
            continue
        if key is not None and current == entry and _key_re(key).match(line):
            return number
    return entry_line


def _fail(path: Path, text: str, message: str, key: str | None = None, entry: int | None = None):
    line = line_of(text, key, entry)
    raise UsageError(f"{path}:{line}: {message}" if line else f"{path}: {message}")


def _unknown(key: str, known: dict, where: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{where}{hint} (known: {', '.join(sorted(known))})"


# ---- publish ------------------------------------------------------------------------------------

def expand_publish(spec: str, replicas: int) -> list[str]:
    """The forwards of each replica (pure): `HOST+:GUEST` counts up from HOST, `H1,H2,...:GUEST`
    gives one host port each, `HOST:GUEST` and `GUEST` are for one replica; `ADDR:` may lead.
    Returns one "ADDR:HOST:GUEST" per replica; raises Invalid."""
    parts = spec.split(":")
    if len(parts) == 3:
        addr, host, guest = parts
        addr = addr or "127.0.0.1"
    elif len(parts) == 2:
        addr, (host, guest) = "127.0.0.1", parts
    elif len(parts) == 1:
        addr, host, guest = "127.0.0.1", parts[0], parts[0]
    else:
        raise Invalid(f"must be HOST+:GUEST, H1,H2:GUEST or [ADDR:]HOST:GUEST, not {spec!r}", item=True)
    try:
        guest_port = int(guest)
        if host.endswith("+"):
            first = int(host[:-1])
            hosts = [first + k for k in range(replicas)]
        else:
            hosts = [int(h) for h in host.split(",")]
    except ValueError:
        raise Invalid(f"must be HOST+:GUEST, H1,H2:GUEST or [ADDR:]HOST:GUEST, not {spec!r}", item=True) from None
    for port in (*hosts, guest_port):
        if not 1 <= port <= 65535:
            raise Invalid(f"has port {port} out of range (1-65535) in {spec!r}", item=True)
    if len(hosts) != replicas:
        if len(hosts) == 1:
            raise Invalid(f"gives one host port ({spec!r}) to {replicas} replicas: write {hosts[0]}+:{guest_port} "
                          f"to count up from it", item=True)
        raise Invalid(f"lists {len(hosts)} host ports in {spec!r} for {replicas} replicas", item=True)
    return [f"{addr}:{h}:{guest_port}" for h in hosts]


# ---- the file -----------------------------------------------------------------------------------

def parse(text: str, path: Path, *, check_images: bool = True) -> Fleet:
    """A Fleet from the file's text (pure but for checking that the images exist)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    top: dict = {}
    for key, value in data.items():
        if key == "vm":
            continue
        if key not in TOP:
            _fail(path, text, _unknown(key, {**TOP, "vm": None}, ""), key)
        try:
            top[key] = TOP[key].from_toml(value, path.parent)
        except Invalid as exc:
            _fail(path, text, f"{key!r} {exc}", key)
    entries = data.get("vm")
    if not entries:
        raise UsageError(f"{path}: no VMs: add a [[vm]] table with at least name and image",
                         hint="see `jvmkit up --help` for the file's format")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        _fail(path, text, "'vm' must be an array of tables ([[vm]])", "vm")
    name = top.get("name") or path.stem
    if not _NAME.match(name):
        _fail(path, text, f"fleet name {name!r} is not valid: use letters, digits, '.', '_' and '-'", "name")
    vms: list[VmSpec] = []
    groups: list[str] = []
    for n, entry in enumerate(entries):
        vms += _entry(entry, n, text, path, check_images)
        groups.append(vms[-1].group)
    seen: dict[str, VmSpec] = {}
    ports: dict[tuple[str, int], VmSpec] = {}
    for v in vms:
        if v.name in seen:
            _fail(path, text, f"two VMs are named {v.name!r} (replicas are named NAME-1, NAME-2, ...)", "name",
                  v.entry)
        seen[v.name] = v
        for spec in v.publish:
            addr, host, _ = spec.split(":")
            clashes = [ports.get((addr, int(host)))] + ([] if addr == "0.0.0.0" else [ports.get(("0.0.0.0", int(host)))])
            if addr == "0.0.0.0":
                clashes += [o for (a, h), o in ports.items() if h == int(host)]
            other = next((o for o in clashes if o is not None and o.name != v.name), None)
            if other is not None:
                _fail(path, text, f"host port {host} is published by both {other.name} and {v.name}", "publish",
                      v.entry)
            ports[(addr, int(host))] = v
    return Fleet(name, path, tuple(vms), top.get("host_memory"), top.get("parallel"), tuple(groups))


def _entry(entry: dict, n: int, text: str, path: Path, check_images: bool) -> list[VmSpec]:
    label = f"[[vm]] #{n + 1}" + (f" ({entry['name']})" if isinstance(entry.get("name"), str) else "")
    values: dict = {}
    for key, value in entry.items():
        if key not in VM:
            _fail(path, text, _unknown(key, VM, f" in {label}"), key, n)
        try:
            values[key] = VM[key].from_toml(value, path.parent)
        except Invalid as exc:
            what = f"every item of {key!r}" if exc.item else repr(key)
            _fail(path, text, f"{label}: {what} {exc}", key, n)
    for required in ("name", "image"):
        if required not in values:
            _fail(path, text, f"{label} has no {required!r}", None, n)
    if values.get("network") == "isolated" and values.get("allow_host_loopback"):
        _fail(path, text, f"{label}: allow_host_loopback does not go with network = \"isolated\" (an isolated "
                          "guest reaches nothing)", "allow_host_loopback", n)
    if "connect" in values and values.get("engine", "qemu") == "qemu":
        _fail(path, text, f"{label}: 'connect' is libvirt's URI: set engine = \"libvirt\" with it", "connect", n)
    group = values["name"]
    if not _NAME.match(group):
        _fail(path, text, f"{label}: VM name {group!r} is not valid: use letters, digits, '.', '_' and '-', "
                          f"starting with a letter or digit", "name", n)
    image = values["image"]
    if check_images and not (image / "manifest.json").is_file():
        _fail(path, text, f"{label}: image {image} is not a jvmkit image (no manifest.json there)", "image", n)
    memory, floor = values.get("memory"), values.get("min_memory")
    if memory and floor and floor > memory:
        _fail(path, text, f"{label}: min_memory {floor}M is above memory {memory}M", "min_memory", n)
    replicas = values.get("replicas", 1)
    publish: list[list[str]] = [[] for _ in range(replicas)]
    for spec in values.get("publish", ()):
        try:
            for k, forward in enumerate(expand_publish(spec, replicas)):
                publish[k].append(forward)
        except Invalid as exc:
            _fail(path, text, f"{label}: every item of 'publish' {exc}", "publish", n)
    result = []
    for k in range(replicas):
        name = group if replicas == 1 else f"{group}-{k + 1}"
        result.append(VmSpec(
            name=name, group=group, index=k + 1, image=image,
            line=line_of(text, None, n) or 0, entry=n, memory_mib=memory, min_memory_mib=floor,
            weight=values.get("weight", 1), publish=tuple(publish[k]), args=values.get("args"),
            restart=values.get("restart", "no"), cpus=values.get("cpus"), balloon=values.get("balloon", True),
            accel=values.get("accel", "auto"), network=values.get("network"),
            allow_host_loopback=values.get("allow_host_loopback", False), engine=values.get("engine", "qemu"),
            connect=values.get("connect"), tcg_cache_mib=values.get("tcg_cache"),
            balloon_log=path.parent / values["balloon_log"].replace("{name}", name) if "balloon_log" in values else None))
    return result


def load(path: Path, *, check_images: bool = True) -> Fleet:
    if not path.is_file():
        raise UsageError(f"fleet file {path}: no such file", hint="give the path of a fleet .toml file")
    return parse(path.read_text(), path.resolve(), check_images=check_images)
