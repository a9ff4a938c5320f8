"""OpenPGP signatures of a suite's Release file, checked with gpgv (through jvmkit.proc).

The keyring is `JVMKIT_DEBIAN_KEYRING` (a path, or `none` to skip checks), else the `Signed-By`
apt names for the source, else Debian's archive keyring. Without gpgv or a keyring the index is
used and reported as "not verified (...)"; a signature that does not verify is refused. For a
clear-signed InRelease the text gpgv vouches for must be the text that is parsed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jvmkit import proc
from jvmkit.errors import JvmkitError
from jvmkit.packager.debian.sources import Repo

KEYRING_ENV = "JVMKIT_DEBIAN_KEYRING"  # a keyring path, or "none" to skip signature checks
DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
GPGV_TIMEOUT = 120  # seconds; checking a Release file takes milliseconds


def clearsigned_body(text: str) -> str:
    """The signed text of an OpenPGP clear-signed message (dash-escaping undone); other text unchanged."""
    if not text.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        return text
    lines = text.splitlines()
    i = 1
    while i < len(lines) and lines[i].strip():  # armor headers (Hash: ...)
        i += 1
    body = []
    for line in lines[i + 1:]:
        if line.startswith("-----BEGIN PGP SIGNATURE-----"):
            break
        body.append(line[2:] if line.startswith("- ") else line)
    return "\n".join(body) + "\n"


def keyring_for(repo: Repo) -> Path | None:
    """The keyring to check `repo` with: JVMKIT_DEBIAN_KEYRING, apt's Signed-By, else Debian's; None: no check."""
    env = os.environ.get(KEYRING_ENV)
    if env:
        return None if env.lower() == "none" else Path(env)
    if repo.keyring and Path(repo.keyring).is_file():
        return Path(repo.keyring)
    return DEFAULT_KEYRING


def verify_signature(signed: Path, detached: Path | None, keyring: Path | None, what: str) -> str:
    """Check an OpenPGP signature with gpgv; returns a status line, raises JvmkitError on a bad one.

    For a clear-signed file (no `detached`) the text gpgv verified must be exactly the text
    `clearsigned_body` reads, so nothing outside the signature can sneak into what is parsed."""
    if keyring is None:
        return f"not verified (signature checks disabled by {KEYRING_ENV}=none)"
    if not keyring.is_file():
        return f"not verified (no keyring at {keyring})"
    if keyring.suffix == ".asc":
        return f"not verified (armored keyring {keyring} is not supported by gpgv)"
    gpgv = shutil.which("gpgv")
    if not gpgv:
        return "not verified (gpgv is not installed)"
    argv = [gpgv, "--keyring", str(keyring)]
    argv += [str(detached), str(signed)] if detached else ["--output", "-", str(signed)]
    result = proc.run(argv, what="gpgv", timeout=GPGV_TIMEOUT, check=False, text=False)
    if result.returncode != 0:
        last = proc.last_line(result.stderr)
        raise JvmkitError(f"the signature of {what} did not verify against {keyring}: {last}",
                          hint=f"use a Debian mirror, or set {KEYRING_ENV} to the keyring that signs this one")
    if detached is None:
        ours = clearsigned_body(signed.read_text(errors="replace")).rstrip("\n")
        if result.stdout.decode("utf-8", "replace").rstrip("\n") != ours:
            raise JvmkitError(f"{what}: the signed text differs from the text around it; refusing it")
    return f"verified (gpgv, {keyring})"
