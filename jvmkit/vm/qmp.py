"""A plain QMP client over a Unix socket: greeting, capabilities, commands, events.

Used by the runner (power down, quit), the balloon (balloon, query-balloon, qom-get guest-stats)
and `jvmkit stop`. Blocking, one command at a time, with timeouts; events that arrive between
replies are kept in `events`.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from jvmkit.errors import JvmkitError


class QmpError(JvmkitError):
    pass


class QmpClient:
    def __init__(self, path: Path, timeout: float = 5.0):
        self.path = Path(path)
        self.timeout = timeout
        self.events: list[dict] = []
        self._sock: socket.socket | None = None
        self._buf = b""

    @classmethod
    def connect(cls, path: Path, timeout: float = 5.0, wait: float = 0.0) -> "QmpClient":
        """Connect and negotiate capabilities, retrying for up to `wait` seconds while QEMU starts."""
        client = cls(path, timeout)
        deadline = time.monotonic() + wait
        while True:
            try:
                client._open()
                return client
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= deadline:
                    raise QmpError(f"cannot connect to QEMU's QMP socket {path}") from None
                time.sleep(0.05)

    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting from {self.path}: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        assert self._sock is not None
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise QmpError(f"QEMU did not answer on {self.path} within {self.timeout:g}s") from None
            if not chunk:
                raise QmpError(f"QEMU closed the QMP connection {self.path}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments) -> object:
        if self._sock is None:
            raise QmpError("QMP connection is closed")
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QMP connection {self.path} failed: {exc}") from None
        return self.await_reply(command)

    def await_reply(self, command: str):
        """The answer to the command just sent (events that come first are kept in `events`)."""
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('desc', err)}")
            return reply.get("return")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
