"""Engines other than jvmkit's own QEMU runner: libvirt and KubeVirt.

- `libvirt_xml.py`: a libvirt domain XML from a target's `BootPlan` (pure, no target names).
- `libvirt.py`: `jvmkit run --engine libvirt` (a transient domain through libvirt-python) and the
  libvirt balloon device the balloon controller steers.
- `kubevirt.py` + `oci.py`: `jvmkit export --format kubevirt` (a containerDisk / kernelBoot OCI image
  and a VirtualMachine manifest, written in Python, deterministically).
- `export.py`: `jvmkit export --format libvirt|kubevirt`, which `Target.export` hands these formats to.
"""

from __future__ import annotations

ENGINES = ("qemu", "libvirt")           # `jvmkit run --engine`
EXPORT_FORMATS = ("libvirt", "kubevirt")  # `jvmkit export --format`, for every target
DEFAULT_CONNECT = "qemu:///system"
