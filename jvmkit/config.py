"""`jvmkit.toml`: the build file's view of `jvmkit pack` and `jvmkit run` settings.

A `jvmkit.toml` next to the build file (or `--config PATH`) holds what the flags hold; flags given
on the command line override it. Validation is strict: an unknown key or a wrong type is reported
with the file, the key and its line. `pack_request()` merges file and flags into a PackRequest.

    jar = "target/app.jar"          # what `jvmkit pack` packs when no JAR argument is given
    main = "com.example.Main"
    profile = "auto"
    target = "linux"
    memory = "512M"
    cpus = 1
    output = "target/app.jvmkit"
    jvm_args = ["-Xss512k"]
    args = ["--port", "8080"]
    libs = []
    add_modules = []
    ports = [8080]                  # guest ports the app listens on (documented in the manifest)
    [balloon]
    min_memory = "256M"
    interval = 2.0
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from jvmkit.errors import UsageError
from jvmkit.units import parse_mib

DEFAULT_FILE = "jvmkit.toml"
SCHEMA: dict[str, type | tuple] = {
    "jar": str, "main": str, "profile": str, "target": str, "memory": (str, int), "cpus": int,
    "output": str, "jvm_args": list, "args": list, "libs": list, "add_modules": list, "ports": list,
    "jdk": str, "kernel": str, "appcds": bool, "train_timeout": (int, float), "suite": str, "mirror": str,
    "force": bool,
}
BALLOON_SCHEMA: dict[str, type | tuple] = {"min_memory": (str, int), "interval": (int, float)}
LIST_ITEM = {"jvm_args": str, "args": str, "libs": str, "add_modules": str, "ports": int}


def _line_of(text: str, key: str, table: str | None = None) -> int | None:
    in_table = table is None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_table = stripped.strip("[] ") == table if table else False
            continue
        if in_table and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return None


def _type_name(t) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", list: "a list"}
    return " or ".join(names[x] for x in (t if isinstance(t, tuple) else (t,)))


def validate(data: dict, text: str, path: Path) -> dict:
    """Check keys and types (pure apart from reading nothing); returns the data unchanged."""

    def fail(key: str, message: str, table: str | None = None):
        line = _line_of(text, key, table)
        where = f"{path}:{line}" if line else str(path)
        raise UsageError(f"{where}: {message}")

    for key, value in data.items():
        if key == "balloon":
            if not isinstance(value, dict):
                fail(key, "'balloon' must be a table ([balloon])")
            for bkey, bvalue in value.items():
                if bkey not in BALLOON_SCHEMA:
                    fail(bkey, f"unknown key 'balloon.{bkey}' (known: {', '.join(sorted(BALLOON_SCHEMA))})", "balloon")
                expected = BALLOON_SCHEMA[bkey]
                if isinstance(bvalue, bool) or not isinstance(bvalue, expected):
                    fail(bkey, f"'balloon.{bkey}' must be {_type_name(expected)}", "balloon")
            continue
        if key not in SCHEMA:
            fail(key, f"unknown key {key!r} (known: {', '.join(sorted([*SCHEMA, 'balloon']))})")
        expected = SCHEMA[key]
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            fail(key, f"{key!r} must be {_type_name(expected)}")
        if key in LIST_ITEM and not all(isinstance(v, LIST_ITEM[key]) and not isinstance(v, bool) for v in value):
            fail(key, f"every item of {key!r} must be {_type_name(LIST_ITEM[key])}")
    return data


def load_config(path: Path | None) -> tuple[dict, Path | None]:
    """Read and validate a jvmkit.toml (the explicit one, else ./jvmkit.toml if present)."""
    if path is None:
        candidate = Path.cwd() / DEFAULT_FILE
        if not candidate.is_file():
            return {}, None
        path = candidate
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    return validate(data, text, path), path


def pack_request(jar: Path | None, flags: dict, config_path: Path | None):
    """Merge a jvmkit.toml (relative paths are relative to it) with command-line flags."""
    from jvmkit.packager.pack import DEFAULT_TARGET, PackRequest

    data, path = load_config(config_path)
    base = path.parent if path else Path.cwd()

    def rel(value: str | None) -> Path | None:
        return None if value is None else (base / value)

    def pick(flag_value, key, convert=lambda v: v):
        if flag_value not in (None, (), False):
            return flag_value
        return convert(data[key]) if key in data else None

    if jar is None:
        if "jar" not in data:
            raise UsageError("no JAR given", hint="pass the jar to pack, or set `jar = ...` in jvmkit.toml")
        jar = rel(data["jar"])
    memory = pick(flags.get("memory_mib"), "memory", lambda v: parse_mib(str(v), "memory"))
    add_modules: list[str] = []
    for item in flags.get("add_modules") or data.get("add_modules", []):
        add_modules += [m.strip() for m in item.split(",") if m.strip()]
    return PackRequest(
        jar=Path(jar),
        main=pick(flags.get("main_class"), "main"),
        libs=tuple(flags.get("libs") or [rel(p) for p in data.get("libs", [])]),
        add_modules=tuple(add_modules),
        jvm_args=tuple(flags.get("jvm_args") or data.get("jvm_args", [])),
        app_args=tuple(flags.get("app_args") or data.get("args", [])),
        profile=pick(flags.get("profile"), "profile"),
        jdk=pick(flags.get("jdk"), "jdk", rel),
        target=pick(flags.get("target"), "target") or DEFAULT_TARGET,
        memory_mib=memory or 512,
        memory_given=memory is not None,
        cpus=pick(flags.get("cpus"), "cpus") or 1,
        output=pick(flags.get("output"), "output", rel),
        force=bool(flags.get("force") or data.get("force", False)),
        kernel=pick(flags.get("kernel"), "kernel", rel),
        appcds=bool(flags.get("appcds") or data.get("appcds", False)),
        train_timeout=float(pick(flags.get("train_timeout"), "train_timeout") or 60.0),
        suite=pick(flags.get("suite"), "suite"),
        mirror=pick(flags.get("mirror"), "mirror"),
        ports=tuple(data.get("ports", [])),
    )
