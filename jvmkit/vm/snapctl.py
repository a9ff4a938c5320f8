"""The host side of the guest agent's snapshot control (io.jvmkit.agent.Snapshots).

A line protocol on one guest port (`CONTROL_GUEST_PORT`), reached through a loopback port forward.
`jvmkit snapshot` opens a snapshot session (`ControlClient.snapshot`): wait until the app is ready
(`io.jvmkit.Ready.signal()` or a guest port accepting), then `prepare` (the app's beforeSnapshot
hooks, the heap trim), after which the agent closes the connection and the host saves the VM.
A restore opens a restore session (`restore()`): fresh entropy, the host's wall clock, how the
guest sets it, and the new JMX seed of a `--balloon` run; the agent answers once it has renewed
the guest's identity and run the app's afterRestore hooks.

Both sessions present the snapshot's token (`secrets.token_urlsafe`, kept 0600 in the bundle):
the guest port is reachable by anything in the guest, and the host port by any local user.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable

from jvmkit.errors import JvmkitError

CONTROL_GUEST_PORT = 7092   # next to the guest agent's JMX port (guest.JMX_GUEST_PORT, 7091)
CONNECT_RETRY_S = 0.05


class ControlError(JvmkitError):
    """The guest agent's control did not answer as expected."""


class ControlTimeout(ControlError):
    """No line from the agent within the time asked (the connection stays usable)."""


@dataclass(frozen=True)
class Prepared:
    """What the agent reported after the trim (bytes; -1 when unknown)."""

    guest_used: int
    heap_committed: int
    heap_live: int


def parse_prepared(line: str) -> Prepared:
    """`prepared used=B committed=B live=B` (pure)."""
    words = line.split()
    if not words or words[0] != "prepared":
        raise ControlError(f"the guest agent answered {line!r} to prepare")
    values = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    try:
        return Prepared(int(values.get("used", -1)), int(values.get("committed", -1)), int(values.get("live", -1)))
    except ValueError:
        raise ControlError(f"the guest agent answered {line!r} to prepare") from None


def restore_head(token: str, *, entropy: bytes, clock: str, seed: str | None = None) -> bytes:
    """The restore session's request but for the wall clock (pure): token, entropy, how the guest
    sets its clock, and the `key=value` lines of a new seed (JMX credentials). It can be sent before
    the VM runs (QEMU's user network accepts the connection and holds the bytes)."""
    lines = [f"jvmkit-restore {token}", f"entropy={entropy.hex()}", f"clock={clock}"]
    lines += [line for line in (seed or "").splitlines() if line.strip() and not line.startswith("#")]
    return ("\n".join(lines) + "\n").encode()


def restore_tail(now_ms: int) -> bytes:
    """The rest, sent once the VM runs: the host's wall clock then, and `end` (pure)."""
    return f"time={now_ms}\nend\n".encode()


def parse_restored(line: str) -> dict[str, str]:
    """`restored lag=MS clock=TEXT` (pure) -> {"lag": ..., "clock": ...}."""
    words = line.split()
    if not words or words[0] != "restored":
        raise ControlError(f"the guest agent answered {line!r} to the restore")
    return dict(w.split("=", 1) for w in words[1:] if "=" in w)


class ControlClient:
    """One connection to the guest agent's control, through the host side of its port forward."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = b""

    @classmethod
    def connect(cls, host: str, port: int, request: bytes, *, deadline: float,
                alive: Callable[[], bool] = lambda: True) -> "ControlClient":
        """Connect and send `request` (the session's first lines). Through QEMU's user
        network a connect to the forwarded port succeeds before the guest listens (the forward
        then closes it): an agent that is not listening yet looks like an immediate EOF, so this
        retries until `deadline` (time.monotonic()) or until `alive()` says the VM is gone."""
        last = "no answer"
        while True:
            if not alive():
                raise ControlError("the VM stopped before its guest agent answered")
            if time.monotonic() >= deadline:
                raise ControlError(f"the guest agent did not answer on its control port ({last})")
            sock = None
            try:
                sock = socket.create_connection((host, port), timeout=2.0)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(request)
                return cls(sock)
            except OSError as exc:
                last = exc.strerror or str(exc)
                if sock is not None:
                    sock.close()
            time.sleep(CONNECT_RETRY_S)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ControlError(f"the guest agent's control connection failed: {exc.strerror or exc}") from None

    def line(self, timeout: float | None) -> str | None:
        """The next line from the agent; None at EOF."""
        self.sock.settimeout(timeout)
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                raise ControlTimeout(f"the guest agent did not answer within {timeout:g} s") from None
            except OSError:
                if self._buf:
                    break
                return None  # reset by the forward: nothing listened
            if not chunk:
                if not self._buf:
                    return None
                break
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def wait_line(self, deadline: float, alive: Callable[[], bool], what: str) -> str:
        """The next line, waiting until `deadline` while the VM is `alive()`; EOF is an error."""
        while True:
            try:
                line = self.line(timeout=0.5)
            except ControlTimeout:
                if not alive():
                    raise ControlError(f"the VM stopped while waiting for {what}") from None
                if time.monotonic() > deadline:
                    raise ControlTimeout(f"timed out waiting for {what}") from None
                continue
            if line is None:
                raise ControlError(f"the guest agent closed its control connection while {what} was awaited")
            return line

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def snapshot_request(token: str) -> bytes:
    return f"jvmkit-snapshot {token}\n".encode()


def open_session(host: str, port: int, request: bytes, *, deadline: float, alive: Callable[[], bool],
                 answer_timeout: float = 10.0) -> tuple[ControlClient, str]:
    """Connect, send `request` and read the agent's first answer, retrying while nothing in the
    guest listens (an EOF right away). Returns the client and the answer."""
    while True:
        client = ControlClient.connect(host, port, request, deadline=deadline, alive=alive)
        try:
            answer = client.line(timeout=max(0.1, min(answer_timeout, deadline - time.monotonic())))
        except ControlTimeout:
            # A guest still booting leaves the forwarded connection hanging (its network is not up
            # to refuse it): connect again, until the deadline.
            client.close()
            if time.monotonic() >= deadline:
                raise
            continue
        except ControlError:
            client.close()
            raise
        if answer is not None:
            if answer.startswith("error"):
                client.close()
                raise ControlError(f"the guest agent refused the session: {answer[6:] or answer}")
            return client, answer
        client.close()
        time.sleep(CONNECT_RETRY_S)
