"""The settings table of `jvmkit pack` and `jvmkit run`, and what is generated from it.

Each `Setting` row says what a setting is called in the request (`dest`), how a value is read and
checked (`kind`: text, a choice, a whole number or seconds in a range, a size via units.parse_mib,
a path, a list), its default, its help text, the commands it belongs to, its command-line flags
(none: toml-only) and its jvmkit.toml key (none: CLI-only). A row with neither is an internal field
of the request that jvmkit sets itself (`memory_given`, `args`, `jmx`, `free_page_reporting`).

Generated here: the frozen request dataclasses `PackRequest` and `RunOptions` (one field per row,
in table order) and `cli_options(command)`, the click decorator with the command's options.
jvmkit.config validates jvmkit.toml against the same rows and merges file and flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import click

from jvmkit.engines import DEFAULT_CONNECT, ENGINES
from jvmkit.vm.qemu import TCG_TB_MIB
from jvmkit.errors import UsageError
from jvmkit.packager import targets
from jvmkit.units import parse_mib

DEFAULT_FILE = "jvmkit.toml"
COMMANDS = ("pack", "run", "snapshot")
TARGETS = targets.NAMES
ACCELS = ("auto", "kvm", "tcg")
NETWORKS = ("outbound", "isolated")  # jvmkit.vm.network.MODES


class Invalid(ValueError):
    """A wrong value; the message completes "'key' ..." (e.g. "must be a whole number"), or with
    `item` set "every item of 'key' ..."."""

    def __init__(self, message: str, item: bool = False):
        super().__init__(message)
        self.item = item


# ---- kinds: how a setting's value is read from jvmkit.toml and from the command line ---------------

def _is(value, types: tuple) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


class Kind:
    """A setting's type: its field annotation, the click type of its option, and how a jvmkit.toml
    value is checked and converted (`from_toml`; paths against the file's directory)."""

    annotation: object = str
    toml_types: tuple = (str,)
    noun = "a string"

    def click_type(self):
        return None

    def check(self, value):
        """The value (of one of toml_types) as the request holds it, or Invalid."""
        return value

    def from_toml(self, value, base: Path):
        if not _is(value, self.toml_types):
            raise Invalid(f"must be {self.noun}")
        return self.check(value)

    def from_cli(self, value):
        return value

    def show(self, value) -> str:
        return str(value)


class Text(Kind):
    pass


class Flag(Kind):
    annotation, toml_types, noun = bool, (bool,), "true or false"


class Choice(Kind):
    def __init__(self, values: tuple[str, ...]):
        self.values = values
        self.noun = "one of " + ", ".join(values)

    def click_type(self):
        return click.Choice(self.values)

    def check(self, value):
        if value not in self.values:
            raise Invalid(f"must be {self.noun}, not {value!r}")
        return value


class Integer(Kind):
    annotation, toml_types, noun = int, (int,), "a whole number"

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def click_type(self):
        return click.IntRange(self.low, self.high)

    def check(self, value):
        if not self.low <= value <= self.high:
            raise Invalid(f"must be between {self.low} and {self.high}, not {value}")
        return value


class Seconds(Kind):
    annotation, toml_types, noun = float, (int, float), "a number of seconds"

    def __init__(self, low: float, low_open: bool = False):
        self.low, self.low_open = low, low_open

    def click_type(self):
        return click.FloatRange(min=self.low, min_open=self.low_open)

    def check(self, value):
        if value < self.low or (self.low_open and value == self.low):
            raise Invalid(f"must be {'more than' if self.low_open else 'at least'} {self.low:g}, not {value:g}")
        return float(value)

    def show(self, value) -> str:
        return f"{value:g}"


class SizeType(click.ParamType):
    name = "size"

    def __init__(self, kind: "Size | None" = None):
        self.kind = kind

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            mib = parse_mib(value, "")
        except UsageError as exc:
            self.fail(str(exc).strip(), param, ctx)
        if self.kind is not None:
            try:
                self.kind.bounded(mib, value)
            except Invalid as exc:
                self.fail(str(exc), param, ctx)
        return mib


class Size(Kind):
    """Memory in MiB: `512M`, `1G`; a plain number is MiB (units.parse_mib)."""

    annotation, toml_types, noun = int, (str, int), "a size such as 512M or 2G"

    def __init__(self, low_mib: int | None = None, high_mib: int | None = None):
        self.low_mib, self.high_mib = low_mib, high_mib

    def click_type(self):
        return SizeType(self)

    def check(self, value):
        try:
            mib = parse_mib(str(value), "")
        except UsageError as exc:
            wrong = "must be larger than zero" if "larger than zero" in exc.message else f"must be {self.noun}"
            raise Invalid(f"{wrong}, not {value!r}") from None
        return self.bounded(mib, value)

    def bounded(self, mib: int, value) -> int:
        if self.low_mib is not None and not self.low_mib <= mib <= self.high_mib:
            raise Invalid(f"must be between {self.low_mib}M and {self.high_mib}M, not {value}")
        return mib

    def show(self, value) -> str:
        return f"{value}M"


class PathKind(Kind):
    annotation, noun = Path, "a path (a string)"

    def click_type(self):
        return click.Path(path_type=Path)

    def from_toml(self, value, base: Path):
        return base / super().from_toml(value, base)


class ListOf(Kind):
    """A list in jvmkit.toml; a repeatable option on the command line. `split` also splits items."""

    toml_types, noun = (list,), "a list"

    def __init__(self, item: Kind, split: str | None = None):
        self.item, self.split = item, split
        self.annotation = tuple[item.annotation, ...]

    def click_type(self):
        return self.item.click_type()

    def _items(self, values) -> tuple:
        if self.split is None:
            return tuple(values)
        return tuple(part.strip() for v in values for part in v.split(self.split) if part.strip())

    def from_toml(self, value, base: Path):
        if not _is(value, self.toml_types):
            raise Invalid(f"must be {self.noun}")
        try:
            return self._items(self.item.from_toml(item, base) for item in value)
        except Invalid as exc:
            raise Invalid(str(exc), item=True) from None

    def from_cli(self, value):
        return self._items(self.item.from_cli(v) for v in value)


TEXT, FLAG, SIZE, PATH = Text(), Flag(), Size(), PathKind()
TCG_CACHE = Size(16, 2048)  # QEMU takes any tb-size; below 16M a JVM's boot retranslates without end


# ---- the table --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    dest: str                        # the request's field (and click's parameter name)
    kind: Kind
    commands: tuple[str, ...]        # "pack", "run"
    flags: tuple[str, ...] = ()      # command-line option flags; () with no `argument`: not on the CLI
    key: str | None = None           # jvmkit.toml key ("table.key" inside a table); None: not in the file
    default: object = None
    help: str = ""
    default_text: str | None = None  # how --help states a default that is not a plain value
    metavar: str | None = None
    argument: str | None = None      # a positional command-line argument with this metavar
    required: bool = False           # an argument that the file may give instead
    given: str | None = None         # a bool field recording that the file or a flag set this one

    @property
    def internal(self) -> bool:
        return not (self.flags or self.key or self.argument)

    def option_name(self) -> str:
        return self.argument or next((f for f in self.flags if f.startswith("--")), self.flags[0])


PACK, RUN = ("pack",), ("run",)
# `jvmkit snapshot` boots an image the way `jvmkit run` will ([run]'s memory, cpus, accel: a restore
# needs them to match), and `pack --snapshot` waits for readiness the way `jvmkit snapshot` does.
RUN_SNAPSHOT, SNAPSHOT_PACK = ("run", "snapshot"), ("snapshot", "pack")
SETTINGS: tuple[Setting, ...] = (
    # pack: the image and its defaults (jvmkit.toml's top level)
    Setting("jar", PATH, PACK, argument="JAR", key="jar", required=True,
            help="The application jar (else `jar` in jvmkit.toml)."),
    Setting("target", Choice(TARGETS), PACK, ("-t", "--target"), "target", targets.DEFAULT,
            "Image kind: an OSv unikernel or a Linux micro-VM."),
    Setting("output", PATH, PACK, ("-o", "--output"), "output", help="Image bundle to write.",
            default_text="./NAME.jvmkit", metavar="PATH"),
    Setting("force", FLAG, PACK, ("-f", "--force"), "force", False, "Replace an existing output."),
    Setting("main", TEXT, PACK, ("--main",), "main", help="Main class, when the jar's manifest has none.",
            metavar="CLASS"),
    Setting("libs", ListOf(PATH), PACK, ("--lib",), "libs", (), "Extra class-path jar (repeatable).",
            metavar="JAR"),
    Setting("strict_class_path", FLAG, PACK, ("--strict-class-path",), "strict_class_path", False,
            "Refuse a manifest Class-Path entry that does not exist (default: skip it with a warning, as the JVM does)."),
    Setting("add_modules", ListOf(TEXT, split=","), PACK, ("--add-modules",), "add_modules", (),
            "JDK modules to add to what jdeps finds (repeatable).", metavar="M[,M...]"),
    Setting("jvm_args", ListOf(TEXT), PACK, ("--jvm-arg",), "jvm_args", (), "JVM option for the guest (repeatable).",
            metavar="ARG"),
    Setting("app_args", ListOf(TEXT), PACK, ("--arg",), "args", (), "Default argument for the app (repeatable).",
            metavar="ARG"),
    Setting("profile", TEXT, PACK, ("--profile",), "profile", help="JDK profile; see --list-profiles.",
            default_text="auto", metavar="NAME|FILE.toml"),
    Setting("jdk", PATH, PACK, ("--jdk",), "jdk", help="Build JDK.", default_text="JAVA_HOME, else java on PATH",
            metavar="PATH"),
    Setting("memory_mib", SIZE, PACK, ("--memory",), "memory", 512, "The image's default guest memory.",
            metavar="SIZE", given="memory_given"),
    Setting("memory_given", FLAG, PACK, default=False,
            help="--memory or jvmkit.toml set it; else pack may raise the default"),
    Setting("cpus", Integer(1, 64), PACK, ("--cpus",), "cpus", 1, "The image's default guest vCPUs.", metavar="N"),
    Setting("kernel", PATH, PACK, ("--kernel",), "kernel", help="Use this guest kernel instead of the cached one.",
            metavar="PATH"),
    Setting("appcds", FLAG, PACK, ("--appcds",), "appcds", False,
            "Train an AppCDS archive by running the app on the host (runs your code)."),
    Setting("train_timeout", Seconds(0, low_open=True), PACK, ("--train-timeout",), "train_timeout", 60.0,
            "Bound on the AppCDS training run.", metavar="SECONDS"),
    Setting("suite", TEXT, PACK, ("--suite",), "suite", help="Debian suite for the linux kernel.",
            default_text="the host's, else bookworm", metavar="SUITE"),
    Setting("mirror", TEXT, PACK, ("--mirror",), "mirror", help="Debian mirror URL.",
            default_text="from apt's sources", metavar="URL"),
    Setting("ports", ListOf(Integer(1, 65535)), PACK, key="ports", default=(),
            help="Guest ports the app listens on (documented in the manifest)."),
    Setting("snapshot", FLAG, PACK, ("--snapshot",), "snapshot.pack", False,
            "Then boot the image, wait until the app is ready and save the VM into it (as `jvmkit snapshot`)."),
    # run: how an image boots (jvmkit.toml's [run] and [balloon])
    Setting("memory_mib", SIZE, RUN_SNAPSHOT, ("--memory",), "run.memory", help="Guest memory.",
            default_text="the image's default", metavar="SIZE"),
    Setting("cpus", Integer(1, 64), RUN_SNAPSHOT, ("--cpus",), "run.cpus", help="Guest vCPUs.",
            default_text="the image's default", metavar="N"),
    Setting("publish", ListOf(TEXT), RUN, ("-p", "--publish"), "run.publish", (),
            "Forward a host TCP port to the guest (host side 127.0.0.1 unless ADDR is given; repeatable).",
            metavar="[ADDR:]HOST:GUEST"),
    Setting("accel", Choice(ACCELS), RUN_SNAPSHOT, ("--accel",), "run.accel", "auto",
            "Accelerator: KVM only if a real probe succeeds (auto), or force one."),
    Setting("tcg_cache_mib", TCG_CACHE, RUN_SNAPSHOT, ("--tcg-cache",), "run.tcg_cache", TCG_TB_MIB,
            "Under TCG: QEMU's translation cache, host memory each VM may fill (KVM has none). Smaller fits "
            "more VMs on a host, larger boots big apps faster.", metavar="SIZE"),
    Setting("engine", Choice(ENGINES), RUN, ("--engine",), "run.engine", "qemu",
            "What starts the VM: jvmkit's own QEMU, or a transient libvirt domain (needs jvmkit[libvirt])."),
    Setting("connect", TEXT, RUN, ("--connect",), "run.connect", DEFAULT_CONNECT,
            "--engine libvirt: the libvirt URI (the domain's files must be on that host).", metavar="URI"),
    Setting("network", Choice(NETWORKS), RUN, ("--network",), "run.network", "outbound",
            "What the guest may reach: outbound (the internet and LAN, not this host) or isolated (nothing; "
            "published ports still reach it)."),
    Setting("allow_host_loopback", FLAG, RUN, ("--allow-host-loopback",), "run.allow_host_loopback", False,
            "Let the guest reach this host: its loopback as 10.0.2.2 and its own addresses (with outbound)."),
    Setting("timeout", Seconds(0, low_open=True), RUN, ("--timeout",), "run.timeout",
            help="Stop the VM after this long (exit status 124).", metavar="SECONDS"),
    Setting("verbose", FLAG, RUN_SNAPSHOT, ("-v", "--verbose"), default=False,
            help="Show kernel and init messages on stderr."),
    Setting("args", ListOf(TEXT), RUN_SNAPSHOT, help="the app's arguments after `--`; None: the image's defaults"),
    Setting("name", TEXT, RUN, ("--name",), help="VM name for ps/stop/balloon.",
            default_text="the image's name + a random suffix", metavar="NAME"),
    Setting("jmx", FLAG, RUN, default=False, help="forward the guest agent's JMX port (the balloon needs it)"),
    Setting("free_page_reporting", FLAG, RUN_SNAPSHOT, default=True, help="virtio-balloon free page reporting"),
    Setting("cold", FLAG, RUN, ("--cold",), "run.cold", False,
            "Boot cold even when the image has a snapshot that matches this run."),
    Setting("balloon", FLAG, RUN, ("--balloon",), "run.balloon", False, "Run the JVM-aware memory balloon for this VM."),
    Setting("min_memory_mib", SIZE, RUN, ("--min-memory",), "balloon.min_memory",
            help="Balloon floor: never shrink the guest below this.", default_text="a share of --memory",
            metavar="SIZE"),
    Setting("balloon_interval", Seconds(0.5), RUN, ("--balloon-interval",), "balloon.interval", 2.0,
            "How often the balloon re-decides.", metavar="SECONDS"),
    Setting("balloon_log", PATH, RUN, ("--balloon-log",), "balloon.log",
            help="Write every balloon decision as JSON lines.", metavar="FILE"),
    Setting("balloon_weight", Integer(1, 1000), RUN, ("--weight",), "balloon.weight", 1,
            "This VM's share of the host's memory budget under contention (with --balloon).", metavar="N"),
    # snapshot: when the app is ready to be saved (jvmkit.toml's [snapshot]; also for pack --snapshot)
    Setting("ready_port", Integer(1, 65535), SNAPSHOT_PACK, ("--ready-port",), "snapshot.ready_port",
            help="Ready when this guest port accepts a connection.", default_text="io.jvmkit.Ready.signal()",
            metavar="PORT"),
    Setting("ready_url", TEXT, SNAPSHOT_PACK, ("--ready-url",), "snapshot.ready_url",
            help="Ready when an HTTP GET of this URL, made inside the guest (http://127.0.0.1:PORT/PATH), answers "
                 "2xx or 3xx; it also warms the app's request path for the first answer after a restore.",
            metavar="URL"),
    Setting("ready_line", TEXT, SNAPSHOT_PACK, ("--ready-line",), "snapshot.ready_line",
            help="Ready when a line of the app's output matches this regular expression.", metavar="REGEX"),
    Setting("ready_after", Seconds(0, low_open=True), SNAPSHOT_PACK, ("--ready-after",), "snapshot.ready_after",
            help="Ready this long after the VM started.", metavar="SECONDS"),
    Setting("ready_timeout", Seconds(0, low_open=True), SNAPSHOT_PACK, ("--ready-timeout",), "snapshot.ready_timeout",
            300.0, "Give up when the app is not ready after this long.", metavar="SECONDS"),
)


def settings_for(command: str) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if command in s.commands)


def _check_table() -> None:
    keys = [s.key for s in SETTINGS if s.key]
    assert len(keys) == len(set(keys)), "a jvmkit.toml key is used twice"
    for command in COMMANDS:
        rows = settings_for(command)
        dests = [s.dest for s in rows]
        flags = [f for s in rows for f in s.flags]
        assert len(dests) == len(set(dests)) and len(flags) == len(set(flags)), f"{command}: a name is used twice"


_check_table()


# ---- the requests -----------------------------------------------------------------------------------

def _request_class(name: str, command: str, doc: str):
    fields = []
    for s in settings_for(command):
        annotation = s.kind.annotation if s.default is not None else s.kind.annotation | None
        spec = dataclasses.field() if s.required else dataclasses.field(default=s.default)
        fields.append((s.dest, annotation, spec))
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__ = "jvmkit.config"  # where callers import it from
    cls.__doc__ = doc + "\n\nFields (from config.SETTINGS): " + ", ".join(f[0] for f in fields) + "."
    return cls


PackRequest = _request_class("PackRequest", "pack", "What `jvmkit pack` is asked to build (flags + jvmkit.toml).")
RunOptions = _request_class("RunOptions", "run", "How `jvmkit run` boots an image (flags + jvmkit.toml).")
SnapshotOptions = _request_class("SnapshotOptions", "snapshot",
                                 "How `jvmkit snapshot` boots an image and when the app is ready (flags + jvmkit.toml).")


def given(value) -> bool:
    """Whether a value came from the user: not None, not an unset flag, not an empty list."""
    return value is not None and value is not False and value != ()


# ---- the command line --------------------------------------------------------------------------------

def help_text(s: Setting) -> str:
    text = s.help
    shown = s.default_text or (s.kind.show(s.default) if given(s.default) and s.kind is not FLAG else None)
    if shown:
        text += f" [default: {shown}]"
    if s.key:
        text += f" [{DEFAULT_FILE}: {s.key}]"
    return text


def cli_options(command: str):
    """A click decorator adding `command`'s settings (in table order) and --config.

    Every option defaults to None (or off, or empty) so that a value from jvmkit.toml can fill it;
    --help states the real default and the toml key."""

    def decorate(func):
        func = click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="FILE",
                            help=f"{DEFAULT_FILE} to read [default: ./{DEFAULT_FILE} if present].")(func)
        for s in reversed(settings_for(command)):
            if s.argument:
                func = click.argument(s.dest, metavar=f"[{s.argument}]", required=False,
                                      type=s.kind.click_type())(func)
            elif s.flags:
                extra = ({"is_flag": True} if isinstance(s.kind, Flag) else
                         {"type": s.kind.click_type(), "multiple": isinstance(s.kind, ListOf),
                          "metavar": s.metavar})
                func = click.option(*s.flags, s.dest, help=help_text(s), **extra)(func)
        return func

    return decorate
