"""Parsing and printing sizes (memory, files): `512M`, `1G`, `1.5GiB`, plain numbers as MiB."""

from __future__ import annotations

import re

from jvmkit.errors import UsageError

_UNITS = {"": 2**20, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from `512M`, `1G`, `2048` (MiB), `1.5GiB`, `300MB` (binary units, pure)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*", str(text).lower())
    if not match:
        raise UsageError(f"{what} {text!r} is not a size", hint="use e.g. 512M or 2G")
    number, unit = match.groups()
    if match.group(0).strip().lower().endswith("b") and unit == "":
        unit = "b"
    value = int(float(number) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"{what} {text!r} must be larger than zero")
    return value


def parse_mib(text: str, what: str = "size") -> int:
    return max(1, parse_size(text, what) // 2**20)


def human(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def mib_text(mib: int) -> str:
    """A MiB count as a user would write it for --memory: `512M`, `2G`, `1T` (pure)."""
    for unit, size in (("T", 1 << 20), ("G", 1 << 10)):
        if mib >= size and mib % size == 0:
            return f"{mib // size}{unit}"
    return f"{mib}M"
