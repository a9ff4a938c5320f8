"""Shared pytest fixtures.

- `jvmkit_cache` (session, autouse): points JVMKIT_CACHE at a session-wide temporary directory so
  no test reads or writes the user's ~/.cache/jvmkit. Set JVMKIT_TEST_CACHE=DIR to use (and keep)
  a directory of your own instead, e.g. to reuse downloaded kernels across test runs.
- `samples` (session): the sample apps built once from samples/ with the build JDK's javac;
  {"hello": .../hello.jar, "httpd": .../httpd.jar, "multijar": .../multijar/app.jar}.
"""

from __future__ import annotations

import contextlib
import io
import http.server
import importlib.util
import os
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_samples_build():
    """samples/build.py as a module. Loaded by path under its own name: a module called "build"
    on sys.path would shadow PyPA's `build` package."""
    name = "jvmkit_samples_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "samples" / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session", autouse=True)
def jvmkit_cache(tmp_path_factory) -> Path:
    chosen = os.environ.get("JVMKIT_TEST_CACHE")
    path = Path(chosen) if chosen else tmp_path_factory.mktemp("jvmkit-cache")
    path.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JVMKIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict[str, Path]:
    build = _load_samples_build()
    out = tmp_path_factory.mktemp("samples")
    try:
        return build.build_samples(out)
    except build.BuildError as exc:
        if "no javac" in str(exc):
            pytest.skip(f"cannot build the samples: {exc}")
        raise


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


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A per-test JVMKIT_CACHE, no Debian mirror/keyring overrides from the environment, and a
    console writing to a StringIO (returned) so tests can read what jvmkit printed."""
    from jvmkit import ui

    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("JVMKIT_DEBIAN_MIRROR", raising=False)
    monkeypatch.delenv("JVMKIT_DEBIAN_KEYRING", raising=False)
    console = ui.Console(stream=io.StringIO())
    monkeypatch.setattr(ui, "_current", console)
    return console


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
