"""How the CLI ends on bad input, environment problems and bugs: one line on stderr and one exit
status per kind (2 bad input, 1 the environment, 70 a bug in jvmkit), through the real CLI
(`python -m jvmkit`). Nothing here boots a VM or packs a jar."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def jvmkit(*args, env=None, cwd=None, code=None):
    env = {**{k: v for k, v in os.environ.items() if k != "JVMKIT_DEBUG"}, "PYTHONPATH": str(ROOT), **(env or {})}
    argv = [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, "-m", "jvmkit", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env,
                          cwd=cwd)


def only_line(proc) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args,expected", [
    (["run", "--cpus", "0", "x.jvmkit"], "jvmkit: error: --cpus: 0 is not in the range 1<=x<=64 (see jvmkit run --help)"),
    (["run"], "jvmkit: error: missing argument IMAGE (see jvmkit run --help)"),
    (["run", "--bogus", "x.jvmkit"], "jvmkit: error: no such option --bogus"),
    (["run", "x.jvmkit", "--accel", "hvf"], "jvmkit: error: --accel: 'hvf' is not one of 'auto', 'kvm', 'tcg'"),
    (["run", "--memory", "lots", "x.jvmkit"], "jvmkit: error: --memory: 'lots' is not a size"),
    (["run", "--timeout", "0", "x.jvmkit"], "jvmkit: error: --timeout: 0"),
    (["pack", "-t", "windows"], "jvmkit: error: --target: 'windows' is not one of 'osv', 'linux' (see jvmkit pack --help)"),
    (["pack", "app.jar", "--memory"], "jvmkit: error: option '--memory' requires an argument (see jvmkit pack --help)"),
    (["frobnicate"], "jvmkit: error: no such command 'frobnicate' (see jvmkit --help)"),
    (["kernel", "pull"], "jvmkit: error: missing argument TARGET (one of: osv, linux) (see jvmkit kernel pull --help)"),
    (["kernel", "pull", "bsd"], "jvmkit: error: TARGET: 'bsd' is not one of 'osv', 'linux'"),
    (["export", "x.jvmkit"], "jvmkit: error: missing option --output (see jvmkit export --help)"),
    (["stop", "a", "b"], "jvmkit: error: got unexpected extra argument (b) (see jvmkit stop --help)"),
    (["cache", "prune", "--older-than", "soon"], "jvmkit: error: --older-than: 'soon' is not a valid float"),
])
def test_usage_errors_are_one_line_pointing_at_help(args, expected):
    proc = jvmkit(*args)
    line = only_line(proc)
    assert proc.returncode == 2, proc.stderr
    assert line.startswith(expected), line
    assert line.endswith(" --help)") and proc.stdout == ""


def test_bare_command_prints_its_help():
    proc = jvmkit()
    assert proc.returncode == 0 and proc.stderr == ""
    assert "Commands:" in proc.stdout and "pack" in proc.stdout and "run" in proc.stdout


def test_a_bad_jvmkit_toml_stops_run_with_its_line(tmp_path):
    """`jvmkit run` reads ./jvmkit.toml (its [run] table) before it looks at the image."""
    (tmp_path / "jvmkit.toml").write_text('jar = "app.jar"\n[run]\ncpus = 0\n')
    proc = jvmkit("run", "missing.jvmkit", cwd=tmp_path)
    assert proc.returncode == 2
    assert only_line(proc) == (f"jvmkit: error: {tmp_path / 'jvmkit.toml'}:3: 'run.cpus' must be between 1 and 64, "
                               f"not 0")
    proc = jvmkit("run", "--config", tmp_path / "nope.toml", "missing.jvmkit")
    assert proc.returncode == 2 and "nope.toml: no such file" in only_line(proc)


def test_environment_problems_exit_1(tmp_path):
    """No JDK anywhere (no --jdk, no JAVA_HOME, no java on PATH): a JvmkitError, status 1."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env.update(PATH=str(empty), PYTHONPATH=str(ROOT), JVMKIT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "jvmkit", "pack", tmp_path / "app.jar", "--target", "linux",
                           "-o", tmp_path / "app.jvmkit"], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert only_line(proc).startswith("jvmkit: error: no JDK found")


# A bug cannot be provoked in working code, so these two replace one function (doctor's report)
# with one that fails the way a bug does, then run the real entry point.
BUG = ("import sys, jvmkit.doctor as d; from jvmkit.cli import main\n"
       "def report(*a): return {}['checks']\n"
       "d.report = report; sys.argv = ['jvmkit', *sys.argv[1:]]; main()\n")


def test_a_bug_is_an_internal_error_with_status_70():
    proc = jvmkit("doctor", code=BUG)
    assert proc.returncode == 70
    line = only_line(proc)
    assert line.startswith("jvmkit: internal error: KeyError: 'checks'") and "--debug" in line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_a_bug(how):
    proc = jvmkit("doctor", *(["--debug"] if how == "flag" else []), code=BUG,
                  env={"JVMKIT_DEBUG": "1"} if how == "env" else None)
    assert proc.returncode == 70
    assert "Traceback (most recent call last)" in proc.stderr and "in report" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("jvmkit: internal error: KeyError")


def test_the_console_writes_to_the_stderr_of_the_moment(monkeypatch):
    """ui.configure() during one caller's captured stderr must not bind later lines to it: a
    closed capture stream killed a later in-process `runner.run` thread (CI's restore test)."""
    import io

    from jvmkit import ui

    first, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    console = ui.Console()
    console.info("one")
    first.close()
    monkeypatch.setattr(sys, "stderr", later)
    console.notice("two")
    assert later.getvalue() == "two\n"
