"""OSv's one console, split into the app's output and OSv's own messages.

OSv has one console (ttyS0) for its messages and the app's output. Everything up to OSv's
`Cmdline: ...` line is boot noise, then app output minus OSv's own lines, nothing after the exit
line `program exited with status N` (runtime.cc prints it with --verbose, for every way a JVM ends;
an int status is printed with %ld, so -1 shows as 4294967295: mod 256 = 255, as on Linux).
"""

from __future__ import annotations

import re
from typing import BinaryIO

EXIT_LINE = "program exited with status "


_EXIT_RE = re.compile(rb"^(?P<pre>.*?)" + re.escape(EXIT_LINE.encode()) + rb"(?P<status>\d+)\s*$")
_OSV_LINES = [re.compile(p) for p in (
    rb"^/\S+: ignoring missing symbol \S+\s*$",        # --verbose: ELF loader
    rb"^\[[DIWE]/\d+ [^\]]*\]: ",                     # --verbose: tagged kernel log (dhcp, ...)
    rb"^program \S+ returned -?\d+\s*$",               # --verbose: main returned non-zero
    rb"^(Aborted|Halting\.|\[backtrace\])\s*$",        # abort()
    rb"^0x[0-9a-f]{16} <.*>\s*$",                      # backtrace frames
    rb"^page fault outside application",
    rb"^(random|VFS|ROFS): ",                          # --verbose: entropy, unmounts, cache stats
    rb"^Powering off\.\s*$",                           # osv::shutdown (e.g. the ACPI power button)
    rb"^\w+\(\) stubbed\s*$",                         # WARN_STUBBED
    rb"^syscall\(\): unimplemented system call \d+\s*$",
)]


class ConsoleFilter:
    """Splits OSv's one console into the app's output and OSv's own messages.

    Feed it the bytes of ttyS0 as they come; app lines go to `app_out`, OSv's to `osv_out` (or
    nowhere). Until OSv's `Cmdline: ...` line everything is OSv's; then lines are the app's unless
    they are OSv's (ELF loader warnings, tagged logs, crash reports); from `program exited with
    status N` on (N in `.status`) everything is OSv's shutdown. Carriage returns before a newline
    are dropped. `flush_partial()` passes on an unfinished app line (call it when the console is idle)."""

    def __init__(self, app_out: BinaryIO, osv_out: BinaryIO | None = None):
        self.app_out = app_out
        self.osv_out = osv_out
        self.state = "boot"
        self.status: int | None = None
        self._buf = b""
        self._midline = False  # part of the current app line was already passed on

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            self._line(line[:-1] if line.endswith(b"\r") else line, ended=True)
        self._flush_outputs()

    def flush_partial(self) -> None:
        if self._buf and self.state == "app":
            self._write(self.app_out, self._buf)
            self._buf = b""
            self._midline = True
            self._flush_outputs()

    def close(self) -> None:
        if self._buf:
            self._line(self._buf, ended=False)
            self._buf = b""
        self._flush_outputs()

    def _write(self, out: BinaryIO | None, data: bytes) -> None:
        if out is not None and data:
            out.write(data)

    def _flush_outputs(self) -> None:
        for out in (self.app_out, self.osv_out):
            if out is not None and hasattr(out, "flush"):
                out.flush()

    def _line(self, line: bytes, ended: bool) -> None:
        nl = b"\n" if ended else b""
        midline, self._midline = self._midline, False
        if self.state == "boot":
            self._write(self.osv_out, line + nl)
            if line.startswith(b"Cmdline: "):
                self.state = "app"
            return
        if self.state == "done":
            self._write(self.osv_out, line + nl)
            return
        found = _EXIT_RE.match(line)
        if found:
            self.status = int(found.group("status")) % 256
            self.state = "done"
            pre = found.group("pre")
            if pre or midline:
                self._write(self.app_out, pre + b"\n")
            self._write(self.osv_out, line[len(pre):] + nl)
            return
        if not midline and any(p.match(line) for p in _OSV_LINES):
            self._write(self.osv_out, line + nl)
            return
        self._write(self.app_out, line + nl)


