"""The `osv` target (see target.py)."""

from jvmkit.packager.targets.osv.target import OsvTarget

__all__ = ["OsvTarget"]
