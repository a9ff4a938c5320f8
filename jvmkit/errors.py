"""The error type for user-facing failures.

Anything a user can cause or fix (bad input, missing tools, a full disk, an unreachable mirror)
raises `JvmkitError` with one line that names the input and says what to do. The CLI prints it as
`jvmkit: error: ...` and exits with `exit_code`; only `--debug` shows a traceback.
"""

from __future__ import annotations


class JvmkitError(Exception):
    """A failure with a one-line, actionable message for the user."""

    exit_code = 1

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

    exit_code = 2
