"""`jvmkit.toml`: the file's view of `jvmkit pack` and `jvmkit run` settings, merged with the flags.

One table, jvmkit.settings.SETTINGS, drives the click options of `pack` and `run`, this file's
schema and the request dataclasses `PackRequest` and `RunOptions` (imported from here). Here:
`validate()` (an unknown key or a wrong value fails with `file:line`, the key and what it must be),
`load_config()`, and `pack_request()` / `run_options()`, which merge the file and the flags: a flag
that was given wins (a list given on the command line replaces the file's), else the file's value,
else the table's default.

`jvmkit pack` and `jvmkit run` both read `--config FILE`, else `./jvmkit.toml` if present.
Relative paths in it are relative to the file; on the command line, to the working directory.

    # top level: what `jvmkit pack` builds (the image and its defaults)
    jar = "target/app.jar"          # what `jvmkit pack` packs when no JAR argument is given
    main = "com.example.Main"
    profile = "auto"
    target = "linux"
    memory = "512M"                 # the image's default guest memory
    cpus = 1                        # the image's default vCPUs
    output = "target/app.jvmkit"
    force = true
    jvm_args = ["-Xss512k"]
    args = ["--port", "8080"]       # the image's default app arguments
    libs = []
    add_modules = []
    ports = [8080]                  # guest ports the app listens on (documented in the manifest)
    jdk = "/usr/lib/jvm/java-17-openjdk-amd64"
    kernel = "vmlinux"
    appcds = false
    train_timeout = 60.0
    suite = "bookworm"
    mirror = "https://mirror.example.org/debian"
    [run]                           # how `jvmkit run` boots an image (overrides the image's defaults)
    memory = "1G"
    cpus = 2
    publish = ["8080:8080"]
    accel = "auto"
    engine = "qemu"                 # or "libvirt": a transient libvirt domain (jvmkit.engines.libvirt)
    connect = "qemu:///system"      # the libvirt URI for engine = "libvirt"
    timeout = 600.0
    balloon = true                  # as --balloon
    [balloon]                       # the balloon of `jvmkit run --balloon`
    min_memory = "256M"
    interval = 2.0
    log = "balloon.jsonl"

Why `run` has a `[run]` table rather than reading the top-level `memory`/`cpus`: those are baked
into the image by `pack` as its defaults, so `run` reading them again would change nothing for this
project's image and would be wrong for any other image run from the same directory. `--name` and
`--verbose` are CLI-only (a fixed name in a shared file makes a second `run` fail; verbosity is a
per-invocation choice); `ports` is toml-only and only documents the guest's ports in the manifest.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path

from jvmkit.errors import UsageError
from jvmkit.settings import (DEFAULT_FILE, SETTINGS, Invalid, PackRequest, RunOptions, Setting, cli_options,
                             given, settings_for)

__all__ = ["PackRequest", "RunOptions", "SETTINGS", "cli_options", "load_config", "pack_request", "run_options",
           "validate"]


# ---- jvmkit.toml ------------------------------------------------------------------------------------

KEYS: dict[str, Setting] = {s.key: s for s in SETTINGS if s.key}
TABLES = tuple(dict.fromkeys(k.split(".")[0] for k in KEYS if "." in k))


def _line_of(text: str, key: str, table: str | None = None) -> int | None:
    """The line that sets `key` (in `[table]`, or as `table.key` at the top), else its table's line."""
    section, table_line = None, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped.strip("[] ")
            if table is not None and section == table:
                table_line = number
            continue
        names = [key] if section == table else []
        if table is not None and section is None:
            names.append(f"{table}.{key}")
            if table_line is None and re.match(rf"^\s*\"?{re.escape(table)}\"?\s*=", line):
                table_line = number  # an inline table: `run = {...}`
        if any(re.match(rf"^\s*\"?{re.escape(name)}\"?\s*=", line) for name in names):
            return number
    return table_line


def _unknown(full: str, table: str | None) -> str:
    known = sorted(k.split(".", 1)[1] if table else k for k in KEYS if (k.startswith(f"{table}.") if table else "." not in k))
    if table is None:
        known += sorted(TABLES)
    name = full.split(".", 1)[1] if table else full
    message = f"unknown key {full!r}"
    close = difflib.get_close_matches(name, known, n=1)
    elsewhere = [t for t in (None, *TABLES) if t != table and (f"{t}.{name}" if t else name) in KEYS]
    if elsewhere:
        where = f"under [{elsewhere[0]}]" if elsewhere[0] else "at the top of the file"
        message += f"; `{name}` belongs {where}"
    elif close:
        message += f"; did you mean {close[0]!r}?"
    return message + f" (known{f' in [{table}]' if table else ''}: {', '.join(known)})"


def validate(data: dict, text: str, path: Path) -> dict:
    """Check every key and value against SETTINGS (pure); returns the data unchanged.

    Keys of every command are accepted (one file serves `pack` and `run`), and all are checked."""

    def fail(key: str, message: str, table: str | None = None):
        line = _line_of(text, key, table)
        raise UsageError(f"{path}:{line}: {message}" if line else f"{path}: {message}")

    def check(table: str | None, items: dict) -> None:
        for name, value in items.items():
            full = f"{table}.{name}" if table else name
            if table is None and name in TABLES:
                if not isinstance(value, dict):
                    hint = f"; `{name} = ...` belongs under [run]" if f"run.{name}" in KEYS else ""
                    fail(name, f"{name!r} must be a table ([{name}]){hint}")
                check(name, value)
                continue
            if full not in KEYS:
                fail(name, _unknown(full, table), table)
            try:
                KEYS[full].kind.from_toml(value, path.parent)
            except Invalid as exc:
                fail(name, f"every item of {full!r} {exc}" if exc.item else f"{full!r} {exc}", table)

    check(None, data)
    return data


def load_config(path: Path | None) -> tuple[dict, Path | None]:
    """Read and validate a jvmkit.toml (the explicit one, else ./jvmkit.toml if present)."""
    if path is None:
        candidate = Path.cwd() / DEFAULT_FILE
        if not candidate.is_file():
            return {}, None
        path = candidate
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    return validate(data, text, path), path


def _lookup(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def merge(command: str, flags: dict, config_path: Path | None, **internal) -> dict:
    """The request's fields: a flag that was given, else the file's value, else the default."""
    data, path = load_config(config_path)
    base = path.parent if path else Path.cwd()
    values = {}
    for s in settings_for(command):
        if s.internal:
            continue
        if given(flags.get(s.dest)):
            value, was_given = s.kind.from_cli(flags[s.dest]), True
        elif s.key and (raw := _lookup(data, s.key)) is not None:
            value, was_given = s.kind.from_toml(raw, base), True  # validated by load_config
        elif s.required:
            raise UsageError(f"no {s.option_name()} given",
                             hint=f"pass {s.option_name()}, or set `{s.key} = ...` in {DEFAULT_FILE}")
        else:
            value, was_given = s.default, False
        values[s.dest] = value
        if s.given:
            values[s.given] = was_given
    return {**values, **internal}


def pack_request(flags: dict, config_path: Path | None = None) -> PackRequest:
    """`jvmkit pack`'s flags merged with jvmkit.toml's top level."""
    return PackRequest(**merge("pack", flags, config_path))


def run_options(flags: dict, config_path: Path | None = None, **internal) -> RunOptions:
    """`jvmkit run`'s flags merged with jvmkit.toml's [run] and [balloon]; `internal` sets fields
    that are not user settings (args, jmx, ...)."""
    return RunOptions(**merge("run", flags, config_path, **internal))
