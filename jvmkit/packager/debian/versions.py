"""dpkg's version order and package relations (pure).

`version_compare` orders versions exactly like `dpkg --compare-versions` (epoch, upstream,
revision; `~` before everything, letters before other signs); `parse_relations` reads `Depends`
and `Provides` fields; `satisfies` checks one version against one relation.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from jvmkit.errors import JvmkitError

def _order(c: str) -> int:
    if "0" <= c <= "9":
        return 0
    if ("a" <= c <= "z") or ("A" <= c <= "Z"):
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    """dpkg's verrevcmp: alternate non-digit parts (~ sorts first, letters before other signs) and numbers."""
    i = j = 0
    la, lb = len(a), len(b)
    while i < la or j < lb:
        first_diff = 0
        while (i < la and not a[i].isdigit()) or (j < lb and not b[j].isdigit()):
            ac = _order(a[i]) if i < la else 0
            bc = _order(b[j]) if j < lb else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < la and a[i] == "0":
            i += 1
        while j < lb and b[j] == "0":
            j += 1
        while i < la and a[i].isdigit() and j < lb and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < la and a[i].isdigit():
            return 1
        if j < lb and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def split_version(version: str) -> tuple[int, str, str]:
    """(epoch, upstream, revision) of a Debian version string."""
    version = version.strip()
    epoch = 0
    if ":" in version:
        head, version = version.split(":", 1)
        try:
            epoch = int(head)
        except ValueError:
            raise JvmkitError(f"bad Debian version epoch in {head}:{version!r}") from None
    upstream, sep, revision = version.rpartition("-")
    if not sep:
        upstream, revision = version, ""
    return epoch, upstream, revision


def version_compare(a: str, b: str) -> int:
    """Compare two Debian versions like `dpkg --compare-versions`: -1, 0 or 1."""
    ea, ua, ra = split_version(a)
    eb, ub, rb = split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    result = _verrevcmp(ua, ub) or _verrevcmp(ra, rb)
    return (result > 0) - (result < 0)


version_key = functools.cmp_to_key(version_compare)


@dataclass(frozen=True)
class Relation:
    name: str
    op: str | None = None
    version: str | None = None


_REL = re.compile(r"^\s*([a-z0-9][a-z0-9+.\-]*)(?::[a-z0-9\-]+)?\s*(?:\(\s*(<<|<=|=|>=|>>|<|>)\s*([^)\s]+)\s*\))?")


def parse_relations(value: str) -> list[list[Relation]]:
    """`a (>= 1) | b, c` -> [[a>=1, b], [c]] (architecture qualifiers and restrictions dropped)."""
    groups = []
    for group in value.split(","):
        alts = []
        for alt in group.split("|"):
            m = _REL.match(alt.strip().lower())
            if m:
                alts.append(Relation(m.group(1), m.group(2), m.group(3)))
        if alts:
            groups.append(alts)
    return groups


def satisfies(version: str, op: str | None, ref: str | None) -> bool:
    if op is None or ref is None:
        return True
    c = version_compare(version, ref)
    return {"<<": c < 0, "<": c <= 0, "<=": c <= 0, "=": c == 0, ">=": c >= 0, ">": c >= 0, ">>": c > 0}[op]

