"""AppCDS: training runs on the host that write dynamic CDS archives for the guest.

`--appcds` runs the user's code (so it is off by default): the trimmed runtime runs the app's main
in a temporary directory laid out like the guest (app/..., with the guest's file times), with a
relative class path, and `-XX:ArchiveClassesAtExit`. JDK 17 checks an archive's class path
literally, so the guest then starts java from `/` with the same relative class path. A run that
does not end by itself is stopped with SIGTERM at `--train-timeout` (the JVM still writes the
archive on that exit path). The archive goes into the image at /jvmkit/app.jsa.

OSv images start the app through the guest agent's Launcher (a main that returns must end the VM).
Without help its classes, and the JDK classes it needs beyond the default CDS archive, are parsed
and verified at every start (~0.25 s under TCG). `launcher_archive` runs only jvmkit's own code
(`Launcher` with the empty `Warmup` main) once per runtime, agent and flags, and caches the archive
under `cds/`; the guest puts jvmkit/agent.jar first on its relative class path, as the archive
was written with it alone (a runtime class path may extend the archive's). With `--appcds` on OSv
the app's training run goes through the Launcher the same way, so one archive holds both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from jvmkit import proc, ui
from jvmkit.balloon.agent_build import LAUNCHER_MAIN, WARMUP_MAIN
from jvmkit.cache import ensure_entry
from jvmkit.errors import JvmkitError, UsageError

GUEST_ARCHIVE = "/jvmkit/app.jsa"
GUEST_LAUNCHER_ARCHIVE = "/jvmkit/launcher.jsa"
LAUNCHER_FORMAT = 1  # bump when the way the launcher archive is trained changes (part of its key)


def relative_class_path(guest_class_path: list[str]) -> list[str]:
    """Guest class path entries relative to `/` (pure): /app/app.jar -> app/app.jar."""
    return [entry.lstrip("/") for entry in guest_class_path]


def launcher_key(*, runtime_key: str, agent_key: str, jvm_flags: list[str], mtime: int) -> str:
    """The cache key of a launcher archive (pure): what the JVM checks when it maps one."""
    payload = json.dumps({"format": LAUNCHER_FORMAT, "runtime": runtime_key, "agent": agent_key,
                          "flags": jvm_flags, "mtime": mtime}, sort_keys=True)
    return "launcher-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def launcher_archive(*, runtime: Path, runtime_key: str, agent: tuple[str, Path], agent_key: str,
                     jvm_flags: list[str], mtime: int, timeout: float = 120) -> Path:
    """The cached dynamic archive of the Launcher's path, its class path the agent jar alone
    (`agent` = its guest path and host file); built on first use by running the Launcher with the
    Warmup main, which runs no application code."""
    key = launcher_key(runtime_key=runtime_key, agent_key=agent_key, jvm_flags=jvm_flags, mtime=mtime)

    def build(tmp: Path) -> None:
        train(runtime=runtime, jvm_flags=jvm_flags, main_class=LAUNCHER_MAIN, app_args=[WARMUP_MAIN],
              app_files=[agent], mtime=mtime, timeout=timeout, dest=tmp / "launcher.jsa",
              what=f"CDS archive of the OSv launcher ({key})")

    entry, _ = ensure_entry("cds", key, build, runtime=runtime_key, agent=agent_key)
    return entry / "launcher.jsa"


def train(*, runtime: Path, jvm_flags: list[str], main_class: str, app_args: list[str],
          app_files: list[tuple[str, Path]], mtime: int, timeout: float, dest: Path,
          what: str | None = None, class_path: list[str] | None = None) -> Path:
    """Run the training and write the archive to `dest`; returns it. The class path is
    `class_path` (guest paths, in the guest's order), else the jars of `app_files` in their order.
    The JDK refuses to archive with a class directory on the class path ("Cannot have non-empty
    directory in paths"), so a class path with one is refused here, in one line."""
    if class_path is None:
        class_path = [g for g, _ in app_files if g.endswith(".jar")]
    dirs = [entry for entry in class_path if entry.endswith("/")]
    if dirs:
        raise UsageError(f"--appcds: the class path has a class directory ({dirs[0]}), which the JDK's CDS "
                         "cannot archive", hint="package those classes in a jar, or pack without --appcds")
    console = ui.current()
    with tempfile.TemporaryDirectory(prefix="jvmkit-appcds.") as tmp:
        root = Path(tmp)
        for guest, host in app_files:
            target = root / guest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(host, target)
            os.utime(target, (mtime, mtime))  # the guest's files carry the image's fixed time
        archive = root / "app.jsa"
        cp = ":".join(relative_class_path(list(class_path)))
        argv = [str(runtime / "bin" / "java"), *jvm_flags, f"-XX:ArchiveClassesAtExit={archive}",
                "-cp", cp, main_class, *app_args]
        label = what or f"AppCDS: training run of {main_class} on the host (at most {timeout:g}s)"
        with console.step(label):
            training = proc.start(argv, what="the AppCDS training run", cwd=root, stdout=proc.PIPE,
                                  stderr=proc.STDOUT, text=True, start_new_session=True)
            try:
                output, _ = training.communicate(timeout=timeout)
            except proc.TimeoutExpired:
                os.killpg(training.pid, signal.SIGTERM)  # the JVM writes the archive on this exit path too
                try:
                    output, _ = training.communicate(timeout=30)
                except proc.TimeoutExpired:
                    os.killpg(training.pid, signal.SIGKILL)
                    output, _ = training.communicate()
        if console.debug and output:
            console.info(output.rstrip())
        if not archive.is_file() or archive.stat().st_size == 0:
            last = [line for line in (output or "").splitlines() if line.strip()][-1:] or ["no output"]
            raise JvmkitError(f"the AppCDS training run wrote no archive (exit {training.returncode}: {last[0]})",
                              hint="check that the app runs on the host with these --arg values, or drop --appcds")
        shutil.copyfile(archive, dest)
    return dest
