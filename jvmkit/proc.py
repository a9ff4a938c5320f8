"""Every subprocess jvmkit starts goes through here.

`run()` logs the argv under `--debug`, enforces a timeout, and maps a failure (the program is
missing, it timed out, or it exited non-zero when `check`) to one `JvmkitError` that names what was
run and carries the program's last line of error output. `start()` is the same for long-running
children (QEMU, a training JVM): it logs the argv and maps a missing program, and leaves waiting
to the caller.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from jvmkit import ui
from jvmkit.errors import JvmkitError

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
CompletedProcess = subprocess.CompletedProcess
Popen = subprocess.Popen
TimeoutExpired = subprocess.TimeoutExpired


def _argv(argv: Sequence[str | os.PathLike]) -> list[str]:
    return [os.fspath(a) for a in argv]


def _log(argv: list[str], cwd: str | os.PathLike | None) -> None:
    console = ui.current()
    if console.debug:
        where = f" (in {cwd})" if cwd else ""
        console.info(f"jvmkit: $ {shlex.join(argv)}{where}")


def last_line(*outputs: str | bytes | None) -> str:
    """The last non-empty line of a program's output (stderr first), for an error message."""
    for out in outputs:
        if out is None:
            continue
        text = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "no output"


def run(argv: Sequence[str | os.PathLike], *, what: str | None = None, timeout: float | None = 600,
        check: bool = True, text: bool = True, input: str | bytes | None = None,
        capture: bool = True, merge_stderr: bool = False, cwd: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None, stdin=None, hint: str | None = None,
        timeout_is_error: bool = True) -> subprocess.CompletedProcess:
    """Run a program to completion. `what` names it in errors (default: the program's file name).

    Raises JvmkitError when the program cannot be started, exceeds `timeout` seconds, or (with
    `check`) exits non-zero; the message carries the last line it wrote to stderr (or stdout).
    A probe that judges a hang itself passes `timeout_is_error=False` and gets `returncode None`
    with what the program wrote until it was killed."""
    args = _argv(argv)
    name = what or Path(args[0]).name
    _log(args, cwd)
    if capture:
        stdout, stderr = PIPE, (STDOUT if merge_stderr else PIPE)
    else:
        stdout = stderr = None
    if stdin is None and input is None:
        stdin = DEVNULL
    try:
        proc = subprocess.run(args, stdout=stdout, stderr=stderr, stdin=stdin, input=input, text=text,
                              timeout=timeout, cwd=cwd, env=None if env is None else dict(env))
    except FileNotFoundError:
        raise JvmkitError(f"cannot run {name}: {args[0]} was not found", hint=hint) from None
    except PermissionError:
        raise JvmkitError(f"cannot run {name}: {args[0]} is not executable", hint=hint) from None
    except OSError as exc:
        raise JvmkitError(f"cannot run {name} ({args[0]}): {exc.strerror or exc}", hint=hint) from None
    except subprocess.TimeoutExpired as exc:
        if timeout_is_error:
            raise JvmkitError(f"{name} did not finish within {timeout:g} s", hint=hint) from None
        out, err = exc.stdout, exc.stderr
        if text:
            out = out.decode("utf-8", "replace") if isinstance(out, bytes) else (out or "")
            err = err.decode("utf-8", "replace") if isinstance(err, bytes) else (err or "")
        return subprocess.CompletedProcess(args, None, out, err)
    if check and proc.returncode != 0:
        raise JvmkitError(f"{name} failed (exit status {proc.returncode}): {last_line(proc.stderr, proc.stdout)}",
                          hint=hint)
    return proc


def start(argv: Sequence[str | os.PathLike], *, what: str | None = None, hint: str | None = None,
          **popen) -> subprocess.Popen:
    """Start a long-running program (argv logged under --debug); the caller waits for it."""
    args = _argv(argv)
    name = what or Path(args[0]).name
    _log(args, popen.get("cwd"))
    popen.setdefault("stdin", DEVNULL)
    try:
        return subprocess.Popen(args, **popen)
    except FileNotFoundError:
        raise JvmkitError(f"cannot run {name}: {args[0]} was not found", hint=hint) from None
    except OSError as exc:
        raise JvmkitError(f"cannot run {name} ({args[0]}): {exc.strerror or exc}", hint=hint) from None
