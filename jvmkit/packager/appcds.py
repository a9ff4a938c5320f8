"""AppCDS: a training run of the app on the host that writes a dynamic CDS archive for the guest.

`--appcds` runs the user's code (so it is off by default): the trimmed runtime runs the app's main
in a temporary directory laid out like the guest (app/..., with the guest's file times), with a
relative class path, and `-XX:ArchiveClassesAtExit`. JDK 17 checks an archive's class path
literally, so the guest then starts java from `/` with the same relative class path. A run that
does not end by itself is stopped with SIGTERM at `--train-timeout` (the JVM still writes the
archive on that exit path). The archive goes into the image at /jvmkit/app.jsa.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from jvmkit import ui
from jvmkit.errors import JvmkitError

GUEST_ARCHIVE = "/jvmkit/app.jsa"


def relative_class_path(guest_class_path: list[str]) -> list[str]:
    """Guest class path entries relative to `/` (pure): /app/app.jar -> app/app.jar."""
    return [entry.lstrip("/") for entry in guest_class_path]


def train(*, runtime: Path, jvm_flags: list[str], main_class: str, app_args: list[str],
          app_files: list[tuple[str, Path]], mtime: int, timeout: float, dest: Path) -> Path:
    """Run the training and write the archive to `dest`; returns it."""
    console = ui.current()
    with tempfile.TemporaryDirectory(prefix="jvmkit-appcds.") as tmp:
        root = Path(tmp)
        for guest, host in app_files:
            target = root / guest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(host, target)
            os.utime(target, (mtime, mtime))  # the guest's files carry the image's fixed time
        archive = root / "app.jsa"
        cp = ":".join(relative_class_path([g for g, _ in app_files if g.endswith(".jar")]))
        argv = [str(runtime / "bin" / "java"), *jvm_flags, f"-XX:ArchiveClassesAtExit={archive}",
                "-cp", cp, main_class, *app_args]
        with console.step(f"AppCDS: training run of {main_class} on the host (at most {timeout:g}s)"):
            try:
                proc = subprocess.Popen(argv, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
            except OSError as exc:
                raise JvmkitError(f"cannot start the AppCDS training run: {exc.strerror}") from None
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)  # the JVM writes the archive on this exit path too
                try:
                    output, _ = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    output, _ = proc.communicate()
        if console.debug and output:
            console.info(output.rstrip())
        if not archive.is_file() or archive.stat().st_size == 0:
            last = [line for line in (output or "").splitlines() if line.strip()][-1:] or ["no output"]
            raise JvmkitError(f"the AppCDS training run wrote no archive (exit {proc.returncode}: {last[0]})",
                              hint="check that the app runs on the host with these --arg values, or drop --appcds")
        shutil.copyfile(archive, dest)
    return dest
