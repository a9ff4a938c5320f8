"""Console output: progress lines, progress bars, quiet and JSON modes.

All human-facing output goes to stderr so that stdout stays clean for `--json` and for the app's
own output in `jvmkit run`. One `Console` lives per CLI invocation (`current()`).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass
class Console:
    quiet: bool = False
    json: bool = False
    debug: bool = False
    stream: object = None  # None: whatever sys.stderr is when a line is written

    @property
    def out(self):
        """Where lines go. Not sys.stderr as it was when the Console was made: jvmkit used as a
        library (tests, a build tool in-process) swaps and closes sys.stderr around calls, and a
        line to a closed stream killed a later `runner.run` thread (measured: CI's in-process
        restore test, after a CliRunner test had configured the console)."""
        return self.stream if self.stream is not None else sys.stderr

    def info(self, message: str) -> None:
        """A progress line for humans (suppressed by --quiet and --json)."""
        if not (self.quiet or self.json):
            print(message, file=self.out, flush=True)

    def notice(self, message: str) -> None:
        """Something the user should see even with --quiet (always on stderr)."""
        print(message, file=self.out, flush=True)

    def warn(self, message: str) -> None:
        print(f"jvmkit: warning: {message}", file=self.out, flush=True)

    def result(self, human: str, data: dict) -> None:
        """The final result of a command on stdout: a JSON document, or one summary for humans.

        --quiet silences progress, not the result: scripts still get the summary line."""
        if self.json:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            print(human)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Announce a step and report its duration when done."""
        start = time.monotonic()
        self.info(f"  {what} ...")
        yield
        self.info(f"  {what}: done in {time.monotonic() - start:.1f}s")

    def progress(self, label: str, total: int | None) -> "Progress":
        return Progress(self, label, total)


class Progress:
    """A byte-count progress bar that redraws in place on a terminal and prints sparsely otherwise."""

    def __init__(self, console: Console, label: str, total: int | None):
        self.console = console
        self.label = label
        self.total = total
        self.done = 0
        self._last = 0.0
        self._tty = hasattr(console.out, "isatty") and console.out.isatty()
        self._silent = console.quiet or console.json

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._silent or now - self._last < (0.1 if self._tty else 2.0):
            return
        self._last = now
        self._draw()

    def _draw(self, end: str = "") -> None:
        mib = self.done / 2**20
        if self.total:
            pct = 100 * self.done / self.total
            filled = int(pct / 5)
            text = f"  {self.label} [{'#' * filled}{'.' * (20 - filled)}] {mib:.1f}/{self.total / 2**20:.1f} MiB"
        else:
            text = f"  {self.label} {mib:.1f} MiB"
        if self._tty:
            print("\r" + text, end=end, file=self.console.out, flush=True)
        else:
            print(text, file=self.console.out, flush=True)

    def close(self) -> None:
        if not self._silent:
            self._draw(end="\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_current = Console()


def current() -> Console:
    return _current


def configure(*, quiet: bool = False, json: bool = False, debug: bool = False) -> Console:
    global _current
    _current = Console(quiet=quiet, json=json, debug=debug)
    return _current
