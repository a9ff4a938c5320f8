"""The error types for user-facing failures, and jvmkit's exit statuses.

Anything a user can cause or fix raises `JvmkitError` with one line that names the input and says
what to do. The CLI prints it as `jvmkit: error: ...` and exits with `exit_code`; only `--debug`
shows a traceback. Two kinds, two statuses:
- `UsageError` (2): bad input: a wrong option or argument, a bad jvmkit.toml, a jar that is not a
  jar, an output that exists. The user fixes the command line or the files they gave.
- `JvmkitError` (1): the environment: a missing tool, an unreachable mirror, a full disk.
Any other exception is a bug in jvmkit: one line `jvmkit: internal error: ...` and status 70
(EX_SOFTWARE of sysexits.h), so that bad input never looks like a bug, nor a bug like bad input.
"""

from __future__ import annotations

EXIT_ERROR = 1          # JvmkitError: the environment (tools, network, disk)
EXIT_USAGE = 2          # UsageError and click's usage errors: bad input
EXIT_SOFTWARE = 70      # an unexpected exception: a bug in jvmkit (sysexits.h EX_SOFTWARE)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM


class JvmkitError(Exception):
    """A failure with a one-line, actionable message for the user."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(JvmkitError):
    """Bad input on the command line or in a file the user gave us."""

    exit_code = EXIT_USAGE
