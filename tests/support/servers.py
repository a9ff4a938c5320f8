"""Local servers and ports for tests that must not reach the network."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
import urllib.request
from pathlib import Path


@contextlib.contextmanager
def serve_directory(root: Path):
    """A static HTTP server for `root` on 127.0.0.1 (stands in for Debian's archive or GitHub,
    which tests must not reach): yields (base URL, list of request paths seen)."""
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            seen.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_body_when_up(url: str, seconds: float) -> str | None:
    """The body of GET `url` once something answers it, polling every 0.5 s (a booting guest's
    forwarded port refuses or drops connections until the app listens); None after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return urllib.request.urlopen(url, timeout=3).read().decode()
        except OSError:
            time.sleep(0.5)
    return None
