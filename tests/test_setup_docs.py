"""README.md's set-up and test commands against .ci/setup and .ci/run, without a fresh machine.

Debian 12's own python refuses `pip install` into the system (PEP 668, externally-managed-environment);
the README's first command once worked only because pyenv's python3 stood first on PATH. These tests
read the commands the README shows and the scripts it names, and check what can be checked here:
the venv is made by Debian's /usr/bin/python3 and every pip runs inside it, no bare `python3`/`pip`
is taken from PATH, apt-get installs what a fresh Debian 12 lacks, .ci/run runs README's test
command word for word inside the activated venv, and .ci/run's exit status is pytest's (exit 5, no
tests collected, named as a failure). The scripts themselves were run on a minimal Debian 12 chroot
and as a sudo user (see the commit that added them); that cannot run in a test (apt, network).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_RUN = REPO / ".ci" / "run"
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
# Words that only wrap the real command in these scripts (`show` prints then runs it).
WRAPPERS = {"show", "sudo", "${as_root[@]}", "exec", "nice"}


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell text, as word lists (comments, line continuations and
    operators removed; no expansion). Good enough for the plain scripts checked here."""
    text = script.replace("\\\n", " ")
    out: list[list[str]] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            words = list(lex)
        except ValueError:  # an unbalanced quote inside $(...): not a line these tests look at
            continue
        current: list[str] = []
        for word in words + [";"]:
            if word in OPERATORS:
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
    return out


def unwrap(cmd: list[str]) -> list[str]:
    """`show sudo env A=B apt-get ...` -> `apt-get ...`."""
    words = list(cmd)
    while words:
        if words[0] in WRAPPERS:
            words = words[1:]
        elif words[0] == "env":
            words = words[1:]
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words = words[1:]
        else:
            break
    return words


def readme_section(title_prefix: str) -> str:
    text = README.read_text()
    start = text.index(title_prefix)
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, flags=re.S)


def setup_commands() -> tuple[list[list[str]], list[Path]]:
    """The README's first set-up block, with any `bash .ci/...` it runs replaced by that script's
    commands; and the scripts that were read."""
    blocks = code_blocks(readme_section("## Set-up on a fresh machine"))
    assert blocks, "README's set-up section has no ```sh block"
    cmds: list[list[str]] = []
    scripts: list[Path] = []
    for cmd in commands(blocks[0]):
        if cmd[0] in ("bash", "sh") and len(cmd) >= 2 and cmd[1].startswith(".ci/"):
            script = REPO / cmd[1]
            assert script.is_file(), f"README's set-up runs {cmd[1]}, which does not exist"
            scripts.append(script)
            cmds.extend(unwrap(c) for c in commands(script.read_text()))
        else:
            cmds.append(unwrap(cmd))
    return [c for c in cmds if c], scripts


def readme_test_command() -> str:
    section = readme_section("## Set-up on a fresh machine")
    found = re.findall(r"the test command `([^`]+)`", section)
    assert len(found) == 1, f"README's set-up section names the test command {len(found)} times"
    return found[0]


def venv_dirs(cmds: list[list[str]]) -> list[str]:
    """Directories given to `/usr/bin/python3 -m venv`."""
    out = []
    for cmd in cmds:
        if cmd[:3] == ["/usr/bin/python3", "-m", "venv"]:
            dirs = [w for w in cmd[3:] if not w.startswith("-")]
            assert len(dirs) == 1, f"venv command with {dirs}: {cmd}"
            out.append(dirs[0])
    return out


def check_python_use(cmds: list[list[str]], where: str) -> str:
    """One venv made by /usr/bin/python3; every pip runs as that venv's python; no python or pip
    taken from PATH, except a bare python3 once the venv is activated. Returns the venv's
    directory (unexpanded)."""
    venvs = venv_dirs(cmds)
    assert len(venvs) == 1, f"{where}: expected one `/usr/bin/python3 -m venv DIR`, found {venvs}"
    venv = venvs[0]
    pips = 0
    activated = False
    for cmd in cmds:
        exe = cmd[0]
        if cmd[:1] in (["."], ["source"]) and cmd[1:] == [f"{venv}/bin/activate"]:
            activated = True
            continue
        name = os.path.basename(exe)
        assert "--break-system-packages" not in cmd, f"{where}: {shlex.join(cmd)}"
        if name.startswith("pip"):
            pytest.fail(f"{where}: pip run directly ({shlex.join(cmd)}): use {venv}/bin/python -m pip")
        if re.fullmatch(r"python[0-9.]*", name):
            if activated and exe == name:
                pass  # the activated venv's python3 (checked with the test command below)
            elif exe == "/usr/bin/python3":
                assert cmd[1:3] == ["-m", "venv"], f"{where}: Debian's python used for more than the venv: {shlex.join(cmd)}"
            else:
                assert exe.startswith(venv + "/bin/"), \
                    f"{where}: {shlex.join(cmd)} runs a python from PATH or outside the venv {venv}"
            if "pip" in cmd[1:3] and "install" in cmd:
                pips += 1
    assert pips >= 1, f"{where}: nothing is pip-installed into {venv}"
    return venv


def apt_packages(cmds: list[list[str]]) -> set[str]:
    pkgs: set[str] = set()
    for cmd in cmds:
        if cmd[:1] == ["apt-get"] and "install" in cmd:
            words = cmd[cmd.index("install") + 1:]
            skip = False
            for w in words:
                if skip:
                    skip = False
                elif w == "-o":
                    skip = True
                elif not w.startswith("-") and not w.startswith(">"):
                    pkgs.add(w)
    return pkgs


# ---------------------------------------------------------------- the set-up command


def test_setup_makes_a_venv_with_debians_python_and_pips_only_into_it():
    cmds, scripts = setup_commands()
    assert scripts == [REPO / ".ci" / "setup"], scripts
    check_python_use(cmds, "README set-up (.ci/setup)")


def test_setup_installs_what_a_fresh_debian_lacks():
    cmds, _ = setup_commands()
    pkgs = apt_packages(cmds)
    # binutils: jlink --strip-debug runs objcopy; a minimal Debian 12 has none (a pack failed there).
    for needed in ("qemu-system-x86", "qemu-utils", "openjdk-17-jdk-headless", "python3-venv", "binutils"):
        assert needed in pkgs, f"README's set-up does not apt-get install {needed} (installs {sorted(pkgs)})"


def test_setup_links_jvmkit_onto_path_and_packs_and_runs_hello_for_linux():
    cmds, _ = setup_commands()
    venv = venv_dirs(cmds)[0]
    links = [c for c in cmds if c[0] == "ln" and any(w == f"{venv}/bin/jvmkit" for w in c)]
    assert links, "the set-up does not link the venv's jvmkit anywhere"
    link_targets = {c[-1] for c in links}
    jvmkit_cmds = [c for c in cmds if os.path.basename(c[0]) == "jvmkit"]
    assert [c[1] for c in jvmkit_cmds] == ["pack", "run"], jvmkit_cmds
    # it runs the jvmkit it put on PATH, so the link itself is proven
    assert {c[0] for c in jvmkit_cmds} <= link_targets, (jvmkit_cmds, link_targets)
    pack, run = jvmkit_cmds
    assert pack[pack.index("--target") + 1] == "linux"
    assert pack[2].endswith("hello.jar")
    assert run[2] == pack[pack.index("-o") + 1]


def test_setup_calls_apt_through_sudo_only_when_not_root():
    text = (REPO / ".ci" / "setup").read_text()
    raw = [c for c in commands(text) if "apt-get" in c]
    assert raw and all(c[:2] == ["show", "${as_root[@]}"] for c in raw), raw
    assert re.search(r'as_root=\(\)', text) and re.search(r'as_root=\(sudo\)', text)
    # nothing but apt-get runs as root
    assert [c for c in commands(text) if "${as_root[@]}" in c] == raw


# ---------------------------------------------------------------- .ci/run


def test_ci_run_uses_a_venv_from_debians_python_with_the_test_extras():
    cmds = [unwrap(c) for c in commands(CI_RUN.read_text())]
    venv = check_python_use([c for c in cmds if c], ".ci/run")
    installs = [c for c in cmds if c and c[0] == f"{venv}/bin/python" and c[1:4] == ["-m", "pip", "install"]]
    assert any(".[test]" in c for c in installs), f".ci/run does not install .[test]: {installs}"
    assert {"python3-venv", "openjdk-17-jdk-headless", "qemu-system-x86", "binutils"} <= apt_packages(cmds)


def test_ci_run_runs_readmes_test_command_word_for_word_in_the_activated_venv():
    wanted = shlex.split(readme_test_command())
    cmds = commands(CI_RUN.read_text())
    venv = venv_dirs([unwrap(c) for c in cmds])[0]
    where = [i for i, c in enumerate(cmds) if c == wanted]
    assert len(where) == 1, f".ci/run does not run README's test command {shlex.join(wanted)!r} exactly once"
    activate = [i for i, c in enumerate(cmds) if c[:1] in (["."], ["source"]) and c[1:] == [f"{venv}/bin/activate"]]
    assert activate and activate[0] < where[0], ".ci/run must activate the venv before the test command"
    # bare python3 in the test command must then be the venv's: nothing between activate and the
    # test command changes PATH
    assert not any("PATH=" in w for c in cmds[activate[0]:where[0]] for w in c)


def test_scripts_parse():
    for script in (CI_RUN, REPO / ".ci" / "setup"):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


@pytest.mark.parametrize("pytest_status,message", [(0, None), (1, "FAILED: pytest exit status 1"),
                                                    (5, "FAILED: pytest collected no tests (exit 5)")])
def test_ci_run_exit_status_is_pytests(tmp_path, pytest_status, message):
    """The part of .ci/run from the test command on, run with a stand-in python3 on PATH that exits
    as pytest would (the real one needs the venv, and all of the suite)."""
    text = CI_RUN.read_text()
    tail = text[text.index("status=0"):]
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"fake python3 $*\"\nexit {pytest_status}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + tail], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == pytest_status, (proc.stdout, proc.stderr)
    assert f"fake python3 {readme_test_command().split(' ', 1)[1]}" in proc.stdout
    if message:
        assert message in proc.stderr
    else:
        assert "FAILED" not in proc.stderr
