"""The OSv boot command line, written so OSv's parser (core/commands.cc) reads back exactly the
words given (see `readers.parse_cmdline` for the grammar as OSv reads it).

Leading tokens starting with '-' are loader options, split on space/tab/newline with '\\' escaping
the next character (no quotes); `--env=K=V` does putenv("K=V"). The rest is the app command: words
separated by spaces, `;` `&` `!` end a command, a word is either "quoted" (escapes \\a \\b \\f \\n
\\r \\t \\v \\\\ \\' \\") or unquoted (any characters but space ; & !, same escapes). Then in every
word everything after the first `$` is replaced by that environment variable's value (no escape
exists), so `build_cmdline` passes arguments that contain `$` through generated
`--env=JVMKIT_ARGn=...` options. max_cmdline is 1024 bytes including the NUL.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from jvmkit.errors import UsageError

CMDLINE_MAX = 1024  # OSv's max_cmdline, including the terminating NUL

_SAFE_WORD = re.compile(r"[A-Za-z0-9_./:=,+@%^~#*?\[\]{}()<>|-]+\Z")
_QUOTE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\a": "\\a", "\b": "\\b", "\f": "\\f",
                  "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
_OPTION_DELIMS = " \t\n"
ARG_ENV_PREFIX = "JVMKIT_ARG"


def quote_word(word: str) -> str:
    """One app-command word, written so OSv's command parser yields exactly `word` (before its
    `$` expansion, which build_cmdline routes around)."""
    if "\0" in word:
        raise UsageError(f"argument {word!r} contains a NUL byte, which OSv's command line can't carry")
    if _SAFE_WORD.match(word):
        return word
    return '"' + "".join(_QUOTE_ESCAPES.get(ch, ch) for ch in word) + '"'


def escape_option(option: str) -> str:
    """A loader option (e.g. --env=K=V), with the backslash escapes OSv's option splitter reads."""
    if "\0" in option:
        raise UsageError(f"boot option {option!r} contains a NUL byte")
    return "".join("\\" + ch if ch in _OPTION_DELIMS or ch == "\\" else ch for ch in option)


def build_cmdline(argv: list[str], env: Mapping[str, str] | None = None, *, rootfs: str | None = "rofs",
                  extra_opts: Iterable[str] = ()) -> str:
    """The OSv boot command line that runs `argv` with environment `env`:
    `--rootfs=rofs [extra opts] --env=K=V... argv...`. Refuses one longer than OSv's limit."""
    if not argv or not argv[0]:
        raise UsageError("the OSv command needs a program path")
    if argv[0].startswith("-"):
        raise UsageError(f"the OSv program path {argv[0]!r} starts with '-', which OSv reads as a boot option")
    env = dict(env or {})
    for key in env:
        if not key or "=" in key or "\0" in key:
            raise UsageError(f"environment variable name {key!r} is not usable (empty, or has '=' or NUL)")
    parts: list[tuple[str, str]] = []  # (rendered, description for the too-long message)
    if rootfs:
        parts.append((escape_option(f"--rootfs={rootfs}"), f"--rootfs={rootfs}"))
    for opt in extra_opts:
        if not opt.startswith("--"):
            raise UsageError(f"OSv boot option {opt!r} must start with '--'")
        parts.append((escape_option(opt), f"option {opt[:40]}"))
    for key, value in env.items():
        parts.append((escape_option(f"--env={key}={value}"), f"environment variable {key}"))
    words: list[tuple[str, str]] = []
    for i, arg in enumerate(argv):
        what = f"argument {i} ({arg[:40]}{'...' if len(arg) > 40 else ''})"
        if "$" in arg:
            # OSv replaces everything after the first '$' with an environment variable and has no
            # escape for it: pass the argument through a variable of its own.
            name = f"{ARG_ENV_PREFIX}{i}"
            if name in env:
                raise UsageError(f"environment variable {name} is reserved by jvmkit")
            parts.append((escape_option(f"--env={name}={arg}"), what))
            words.append(("$" + name, what))
        else:
            words.append((quote_word(arg), what))
    pieces = parts + words
    line = " ".join(rendered for rendered, _ in pieces)
    size = len(line.encode())
    if size + 1 > CMDLINE_MAX:
        longest = sorted(pieces, key=lambda p: -len(p[0].encode()))[:3]
        detail = ", ".join(f"{desc}: {len(r.encode())} bytes" for r, desc in longest)
        raise UsageError(
            f"the OSv boot command line would be {size} bytes; OSv accepts at most {CMDLINE_MAX - 1} "
            f"(max_cmdline {CMDLINE_MAX} with the NUL). Longest parts: {detail}",
            hint="shorten those: fewer or shorter JVM flags and arguments, shorter environment values, "
                 "or a shorter class path (fewer jars, shorter paths)")
    return line


