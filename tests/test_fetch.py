"""Tests of jvmkit.fetch (the one streamed download) and fileio.Window, against a small HTTP server
on 127.0.0.1 (no real host is contacted)."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import zstandard

from jvmkit import fetch, fileio
from jvmkit.errors import JvmkitError

pytestmark = pytest.mark.usefixtures("isolated_cache")

BODY = bytes(range(256)) * 1000  # 256000 bytes: several chunks


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def server():
    """/ok serves BODY, /short promises more than it sends, /ua echoes the User-Agent, others 404."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/ok":
                self._send(BODY)
            elif self.path == "/ua":
                self._send(self.headers.get("User-Agent", "").encode())
            elif self.path == "/short":
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY[:1000])
                self.close_connection = True
            else:
                self.send_error(404)

        def _send(self, data: bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def base():
    with server() as url:
        yield url


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_verifies_and_shows_progress(base, tmp_path, isolated_cache):
    dest = tmp_path / "dl" / "file.bin"
    got = fetch.download(f"{base}/ok", dest, sha256=sha(BODY).upper(), size=len(BODY), what="the test file")
    assert dest.read_bytes() == BODY and got == fetch.Downloaded(dest, len(BODY), sha(BODY))
    assert leftovers(dest.parent) == ["file.bin"]  # no temporary sibling left
    assert "the test file" in isolated_cache.stream.getvalue()  # the progress bar's label
    assert oct(dest.stat().st_mode & 0o777) == oct(0o644)


def test_digest_mismatch_leaves_nothing(base, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"old")  # a mismatch must not replace (or remove) what is there
    with pytest.raises(fetch.DownloadError) as err:
        fetch.download(f"{base}/ok", dest, sha256="0" * 64, what="the test file")
    text = str(err.value)
    assert "the test file" in text and f"{base}/ok" in text and sha(BODY) in text and "0" * 64 in text
    assert dest.read_bytes() == b"old" and leftovers(tmp_path) == ["file.bin"]


@pytest.mark.parametrize("kw", [{"size": len(BODY) - 1}, {"max_size": 1000}])
def test_larger_than_expected_is_refused(base, tmp_path, kw):
    with pytest.raises(fetch.DownloadError, match="larger than the expected"):
        fetch.download(f"{base}/ok", tmp_path / "f", **kw)
    assert leftovers(tmp_path) == []


def test_smaller_than_expected_is_refused(base, tmp_path):
    with pytest.raises(fetch.DownloadError, match=f"gave {len(BODY)} bytes, not the expected {len(BODY) + 1}"):
        fetch.download(f"{base}/ok", tmp_path / "f", size=len(BODY) + 1)
    assert leftovers(tmp_path) == []


def test_truncated_transfer_is_refused(base, tmp_path):
    with pytest.raises(fetch.DownloadError) as err:
        fetch.download(f"{base}/short", tmp_path / "f", hint="try again")
    assert f"{base}/short" in str(err.value) and err.value.hint == "try again"
    assert leftovers(tmp_path) == []


def test_http_status_and_unreachable(base, tmp_path):
    with pytest.raises(fetch.StatusError, match="HTTP 404") as err:
        fetch.download(f"{base}/missing", tmp_path / "f", what="x")
    assert err.value.status == 404 and err.value.url == f"{base}/missing"
    gone = closed_port_url()
    with pytest.raises(fetch.Unreachable, match="not reachable") as err:
        fetch.download(gone, tmp_path / "f", hint="check the network")
    assert err.value.reason == "connection refused" and gone in str(err.value) and "check the network" in str(err.value)
    assert leftovers(tmp_path) == []


def test_unwritable_destination_is_one_error(base, tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(fetch.DownloadError, match="can't write"):
        fetch.download(f"{base}/ok", tmp_path / "a-file" / "f")


def test_get_bytes_and_user_agent(base):
    assert fetch.get_bytes(f"{base}/ok") == BODY
    assert fetch.get_bytes(f"{base}/ua").decode() == fetch.USER_AGENT
    with fetch.session() as sess:
        assert fetch.get_bytes(f"{base}/ua", session=sess).decode().startswith("jvmkit/")
    with pytest.raises(fetch.StatusError) as err:
        fetch.get_bytes(f"{base}/nothing", what="the index")
    assert err.value.status == 404 and str(err.value).startswith("the index: ")
    with pytest.raises(fetch.Unreachable):
        fetch.get_bytes(closed_port_url())


# ---- fileio.Window ----------------------------------------------------------------------------------

def test_window_on_a_seekable_file_is_positional():
    handle = io.BytesIO(BODY)
    a, b = fileio.Window(handle, 10, 5), fileio.Window(handle, 300, 4)
    assert a.read(2) == BODY[10:12] and b.read() == BODY[300:304]  # interleaved on one handle
    assert a.read() == BODY[12:15] and a.read() == b"" and b.read(1) == b""
    assert io.BufferedReader(fileio.Window(handle, 1000, 70000)).read() == BODY[1000:71000]


def test_window_on_a_stream_skips_by_reading():
    compressed = zstandard.ZstdCompressor().compress(BODY)
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed))
    window = fileio.Window(reader, 70000, 100000)
    assert window.read() == BODY[70000:170000]
    short = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed))
    with pytest.raises(JvmkitError, match="the disk is shorter than expected") as err:
        fileio.Window(short, len(BODY) + 1, 10, what="the disk", hint="pack it again")
    assert err.value.hint == "pack it again"
