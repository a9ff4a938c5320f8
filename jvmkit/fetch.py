"""HTTP: the one streamed download, small index GETs, and the session with jvmkit's User-Agent.

`download()` streams a URL into a temporary sibling of `dest` (`fileio.atomic_path`), hashing as it
writes and showing a progress bar; the SHA-256 (and size) are checked before the file is renamed to
`dest`, so a failed or mismatched download leaves nothing behind. `get_bytes()` reads a small file
(an index, a SHA256SUMS) into memory. Every failure is one `DownloadError` line naming what was
fetched and the URL; `Unreachable` (no answer: DNS, refused, timed out) and `StatusError` (the
server answered with an HTTP error, `.status`) let callers map these to their own errors (Debian's
`MirrorUnreachable`, `NotFound`) or hints.

`requests` is imported when a request is made, not with this module (~90 ms measured), so commands
that never download start as fast as before.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlsplit

from jvmkit import __version__, fileio, ui
from jvmkit.errors import JvmkitError

if TYPE_CHECKING:
    import requests

TIMEOUT = (15, 60)  # connect, read (seconds)
CHUNK = 1 << 16
USER_AGENT = f"jvmkit/{__version__}"


class DownloadError(JvmkitError):
    """A download failed (HTTP error, broken transfer, wrong bytes, can't write); `.url` is what was fetched."""

    def __init__(self, message: str, *, url: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.url = url


class Unreachable(DownloadError):
    """No answer: the host could not be resolved or connected to, or it stopped answering in time."""

    def __init__(self, url: str, what: str, reason: str, hint: str | None = None):
        super().__init__(f"{what}: {url} was not reachable ({reason})", url=url, hint=hint)
        self.reason = reason


class StatusError(DownloadError):
    """The server answered with an HTTP status other than 200."""

    def __init__(self, url: str, what: str, status: int, hint: str | None = None):
        super().__init__(f"{what}: {url} answered HTTP {status}", url=url, hint=hint)
        self.status = status


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str


def session() -> requests.Session:
    """A requests session that names jvmkit (and its version) as the User-Agent."""
    import requests

    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    return s


_new_session = session  # download()'s `session` parameter shadows the function


@contextmanager
def _using(sess: requests.Session | None) -> Iterator[requests.Session]:
    """The caller's session, or a new one closed afterwards."""
    if sess is not None:
        yield sess
    else:
        with _new_session() as own:
            yield own


_REASONS = (  # (pattern in the exception's text, the reason shown)
    ("Name or service not known", "name or service not known"),
    ("Temporary failure in name resolution", "temporary failure in name resolution"),
    ("Connection refused", "connection refused"), ("timed out", "timed out"),
    ("Network is unreachable", "network is unreachable"), ("No route to host", "no route to host"),
    ("Connection reset", "connection reset"),
    ("IncompleteRead|Connection broken", "the connection broke off before the end"),
)


def reason(exc: Exception) -> str:
    """A short, stable reason for a requests failure ("connection refused", "timed out", ...)."""
    import requests

    text = str(exc)
    for pattern, shown in _REASONS:
        if re.search(pattern, text, re.I):
            return shown
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return type(exc).__name__


def _what(url: str, what: str | None) -> str:
    return what or Path(urlsplit(url).path).name or url


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


@contextmanager
def _mapped(url: str, what: str, hint: str | None, dest: Path | None = None) -> Iterator[None]:
    """Turn requests' and the file system's exceptions into one DownloadError line."""
    import requests

    try:
        yield
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise Unreachable(url, what, reason(exc), hint) from None
    except requests.RequestException as exc:  # before OSError: requests' exceptions are OSErrors
        raise DownloadError(f"{what}: the download from {url} failed ({reason(exc)})", url=url,
                            hint=hint) from None
    except OSError as exc:
        if dest is None:
            raise
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)  # the caller's hint is about the source, not the disk
        raise DownloadError(f"{what}: can't write {dest} ({exc.strerror or exc})", url=url,
                            hint="free some disk space and try again" if full else None) from None


def _get(sess: requests.Session, url: str, what: str, hint: str | None, *, stream: bool,
         timeout: float | tuple[float, float]) -> requests.Response:
    resp = sess.get(url, stream=stream, timeout=timeout)
    if resp.status_code != 200:
        resp.close()
        raise StatusError(url, what, resp.status_code, hint)
    return resp


def _length(resp: requests.Response) -> int | None:
    """Content-Length when it counts the bytes iter_content yields (no Content-Encoding), else None."""
    if resp.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    try:
        return int(resp.headers.get("Content-Length", "")) or None
    except ValueError:
        return None


def get_bytes(url: str, *, what: str | None = None, session: requests.Session | None = None,
              timeout: float | tuple[float, float] = TIMEOUT, hint: str | None = None) -> bytes:
    """GET a small file (an index, a SHA256SUMS) into memory; DownloadError (Unreachable, StatusError) on failure."""
    what = _what(url, what)
    with _mapped(url, what, hint), _using(session) as sess:
        with _get(sess, url, what, hint, stream=False, timeout=timeout) as resp:
            return resp.content


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             max_size: int | None = None, what: str | None = None, session: requests.Session | None = None,
             timeout: float | tuple[float, float] = TIMEOUT, hint: str | None = None, mode: int = 0o644) -> Downloaded:
    """Stream `url` to `dest` with a progress bar labelled `what`; verified before it appears there.

    `sha256` and `size`, when given, must match; `max_size` refuses a larger body (stops reading at
    the limit). A transfer shorter than its Content-Length is refused. Any failure raises one
    DownloadError naming `what` and `url` (with `hint`, the caller's advice) and leaves no file at
    `dest` (nor a temporary one beside it)."""
    what = _what(url, what)
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    limit = size if size is not None else max_size
    with _mapped(url, what, hint, dest), _using(session) as sess:
        with fileio.atomic_path(dest, mode) as tmp, open(tmp, "wb") as out:
            sink = fileio.HashingWriter(out)
            with _get(sess, url, what, hint, stream=True, timeout=timeout) as resp:
                total = _length(resp)
                if limit is not None and total is not None and total > limit:
                    raise DownloadError(f"{what}: {url} is {_size(total)}, larger than the expected "
                                        f"{_size(limit)}; not downloaded", url=url, hint=hint)
                with ui.current().progress(what, total or size) as bar:
                    for chunk in resp.iter_content(CHUNK):
                        if limit is not None and sink.size + len(chunk) > limit:
                            raise DownloadError(f"{what}: {url} is larger than the expected {_size(limit)}; "
                                                "the download was stopped and nothing was kept", url=url, hint=hint)
                        sink.write(chunk)
                        bar.update(len(chunk))
            if total is not None and sink.size != total:
                raise DownloadError(f"{what}: the download from {url} is truncated ({sink.size} of {total} "
                                    "bytes); nothing was kept", url=url, hint=hint)
            if size is not None and sink.size != size:
                raise DownloadError(f"{what}: {url} gave {sink.size} bytes, not the expected {size}; "
                                    "nothing was kept", url=url, hint=hint)
            actual = sink.hexdigest()
            if expected is not None and actual != expected:
                raise DownloadError(f"{what}: {url} does not match its SHA-256 (expected {expected}, "
                                    f"got {actual}); refused, nothing was kept", url=url, hint=hint)
    return Downloaded(path=dest, size=sink.size, sha256=actual)
