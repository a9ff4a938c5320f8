"""The `linux` target (see target.py)."""

from jvmkit.packager.targets.linux.target import LinuxTarget

__all__ = ["LinuxTarget"]
