"""The guest targets jvmkit packs for, by name. One module per target; `get(name)` is how pack,
run, the CLI and the manifest reach them."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from jvmkit.errors import UsageError

if TYPE_CHECKING:  # the targets themselves load on first use: `jvmkit --help` needs only NAMES
    from jvmkit.packager.targets.base import Target

DEFAULT = "osv"
NAMES = ("osv", "linux")   # what _registry() holds, for parsing argv without importing the targets


@functools.lru_cache(maxsize=None)
def _registry() -> "dict[str, Target]":
    from jvmkit.packager.targets.linux import LinuxTarget
    from jvmkit.packager.targets.osv import OsvTarget

    registry = {t.name: t for t in (OsvTarget(), LinuxTarget())}
    assert tuple(registry) == NAMES, "targets.NAMES must list the registered targets"
    return registry


def names() -> tuple[str, ...]:
    return tuple(_registry())


def all_targets() -> "tuple[Target, ...]":
    return tuple(_registry().values())


def lookup(name: str) -> "Target | None":
    return _registry().get(name)


def get(name: str, what: str = "--target") -> "Target":
    target = lookup(name)
    if target is None:
        raise UsageError(f"{what} {name!r} is not one of {', '.join(names())}")
    return target
