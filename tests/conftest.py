"""Shared pytest fixtures.

- `jvmkit_cache` (session, autouse): points JVMKIT_CACHE at a session-wide temporary directory so
  no test reads or writes the user's ~/.cache/jvmkit. Set JVMKIT_TEST_CACHE=DIR to use (and keep)
  a directory of your own instead, e.g. to reuse downloaded kernels across test runs.
- `samples` (session): the sample apps built once from samples/ with the build JDK's javac;
  {"hello": .../hello.jar, "httpd": .../httpd.jar, "multijar": .../multijar/app.jar}.
- `isolated_cache`: a per-test JVMKIT_CACHE and a console whose output the test can read.

Helpers that tests import (servers, ports, sample and image builders) live in tests/support/.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from support.images import build_samples, load_samples_build


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
    out = tmp_path_factory.mktemp("samples")
    try:
        return build_samples(out)
    except load_samples_build().BuildError as exc:
        if "no javac" in str(exc):
            pytest.skip(f"cannot build the samples: {exc}")
        raise


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
