"""A libvirt domain XML from a target's boot plan (pure): what `jvmkit export --format libvirt` writes
and what `jvmkit run --engine libvirt` starts as a transient domain.

The input is the same `BootPlan` the QEMU runner boots (kernel, initrd or disks, the kernel command
line, the machine type, fw_cfg entries, which serial port carries the app), plus the run's memory,
vCPUs, accelerator, published ports and where the consoles go. Nothing here knows a target's name.

What maps to what (QEMU runner -> libvirt), measured with Debian 12's libvirt 9.0 + QEMU 7.2:
- `-kernel/-initrd/-append` -> `<os><kernel>/<initrd>/<cmdline>`; `-machine pc|q35` -> `<type machine=>`.
- `-accel kvm -cpu host` -> `type='kvm'` + `host-passthrough`; `-accel tcg,tb-size=128 -cpu max` ->
  `type='qemu'` + `<cpu mode='maximum'>` + `<features><tcg><tb-cache>`. TCG's `thread=single` and
  q35's `max-ram-below-4g` have no libvirt element: libvirt's defaults (thread=multi, 2 GiB low)
  apply (docs/engines/libvirt.md).
- `-serial file` / `-serial stdio` -> `<serial type='file'>` (port 0: the console log; port 1, when
  the plan has one, the app's output). The engine tails those files; nothing comes on a stdout.
- `-fw_cfg name=...,file=...` -> `<sysinfo type='fwcfg'><entry name= file=>` (the seed's path only).
- root disk raw, read-only, `cache=unsafe`, `aio=`, TCG `ioeventfd=off` -> `<driver io= ioeventfd=>`
  (io_uring worked under libvirt's seccomp sandbox here).
- `-device virtio-balloon-pci,deflate-on-oom=on,free-page-reporting=` -> `<memballoon autodeflate
  freePageReporting><stats period=>`; `-device virtio-rng-pci` -> `<rng model='virtio'>`.
- `-netdev user,hostfwd=...`: Debian's libvirt 9.0 has the passt backend patched out, and
  `<interface type='user'>` ignores `<portForward>` without it, so the user network and its
  forwards are passed to QEMU as `<qemu:commandline>`, with the virtio-net-pci at a fixed PCI slot
  that libvirt's own address assignment leaves free (SLIRP_SLOT).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from jvmkit.packager.targets.base import BootPlan
from jvmkit.vm.qemu import ROOT_DISK_TCG, TCG_TB_MIB, PortForward

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
JVMKIT_NS = "https://jvmkit.dev/libvirt/1"
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("jvmkit", JVMKIT_NS)

# The PCI root bus of each machine type, and the slot the slirp NIC takes on it. libvirt puts its
# own devices at the lowest free slots (pc: 0x2 upwards on pci.0; q35: pcie-root-ports at 0x1-0x2),
# so a domain of a dozen devices never reaches 0x10. 0x7 worked on q35 by hand, but on pc libvirt
# gives 0x7 to the sixth device.
ROOT_BUS = {"pc": "pci.0", "q35": "pcie.0"}
SLIRP_SLOT = 0x10
NETDEV_ID = "jvmkitnet0"
DISK_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class DomainSpec:
    """One domain: the boot plan (paths as the libvirt host sees them) and the run's settings."""

    name: str
    plan: BootPlan
    memory_mib: int
    cpus: int
    console_log: Path                        # serial port 0
    app_log: Path | None = None              # serial port 1 (plans with app_serial and no console_stdio)
    accel: str = "tcg"                       # "kvm" -> type='kvm', "tcg" -> type='qemu'
    ports: tuple[PortForward, ...] = ()
    disk_aio: str | None = None              # None: libvirt's default (threads)
    balloon_period_s: int = 2                # guest stats every N seconds (the controller reads them)
    free_page_reporting: bool = True
    tb_cache_mib: int = TCG_TB_MIB
    uuid: str | None = None
    image: str = ""                          # recorded in <metadata>
    target: str = ""


def app_log_needed(plan: BootPlan) -> bool:
    """Whether the plan has the app on a serial port of its own (else one console carries both)."""
    return plan.app_serial and not plan.console_stdio


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items() if v is not None})
    if text is not None:
        element.text = text
    return element


def netdev_args(spec: DomainSpec) -> tuple[str, str]:
    """QEMU's -netdev and -device values for the user network with the published ports (pure)."""
    machine = spec.plan.machine
    if machine not in ROOT_BUS:
        raise ValueError(f"unknown machine type {machine!r}")
    netdev = ",".join(["user", f"id={NETDEV_ID}", *(p.hostfwd() for p in spec.ports)])
    device = f"virtio-net-pci,netdev={NETDEV_ID},bus={ROOT_BUS[machine]},addr={SLIRP_SLOT:#x},romfile="
    return netdev, device


def _disk(devices: ET.Element, path: Path, index: int, *, driver: dict) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="raw", **driver)
    _sub(disk, "source", file=str(path))
    _sub(disk, "target", dev=f"vd{DISK_LETTERS[index]}", bus="virtio")
    _sub(disk, "readonly")


def domain_element(spec: DomainSpec) -> ET.Element:
    """The <domain> element (pure)."""
    plan = spec.plan
    if spec.accel not in ("kvm", "tcg"):
        raise ValueError(f"unknown accelerator {spec.accel!r}")
    tcg = spec.accel == "tcg"
    domain = ET.Element("domain", {"type": "qemu" if tcg else "kvm"})
    _sub(domain, "name", spec.name)
    if spec.uuid:
        _sub(domain, "uuid", spec.uuid)
    metadata = _sub(domain, "metadata")
    _sub(metadata, f"{{{JVMKIT_NS}}}image", name=spec.image or None, target=spec.target or None)
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.cpus), placement="static")

    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=plan.machine)
    _sub(os_el, "kernel", str(plan.kernel))
    if plan.initrd is not None:
        _sub(os_el, "initrd", str(plan.initrd))
    _sub(os_el, "cmdline", plan.append)
    if plan.fw_cfg:
        sysinfo = _sub(domain, "sysinfo", type="fwcfg")
        for name, path in plan.fw_cfg:
            _sub(sysinfo, "entry", name=name, file=str(path))

    features = _sub(domain, "features")
    _sub(features, "acpi")  # without it libvirt turns ACPI off; the QEMU runner leaves it on
    if tcg:
        _sub(_sub(features, "tcg"), "tb-cache", str(spec.tb_cache_mib), unit="MiB")
        _sub(domain, "cpu", mode="maximum", check="none")
    else:
        _sub(domain, "cpu", mode="host-passthrough", check="none")
    _sub(domain, "clock", offset="utc")
    # -no-reboot: a reboot (linux's /init ends with `reboot -f`) or a power-off ends the domain.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")

    devices = _sub(domain, "devices")
    index = 0
    if plan.disk is not None:
        driver = {"cache": "unsafe", "io": spec.disk_aio, "ioeventfd": "off" if tcg and ROOT_DISK_TCG else None}
        _disk(devices, plan.disk, index, driver=driver)
        index += 1
    for path in plan.data_disks:
        _disk(devices, path, index, driver={})
        index += 1
    _sub(devices, "controller", type="usb", model="none")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.console_log), append="off")
    _sub(serial, "target", port="0")
    if app_log_needed(plan):
        if spec.app_log is None:
            raise ValueError("the boot plan has the app on its own serial port: app_log is needed")
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=str(spec.app_log), append="off")
        _sub(serial, "target", port="1")
    balloon = _sub(devices, "memballoon", model="virtio", autodeflate="on",
                   freePageReporting="on" if spec.free_page_reporting else "off")
    _sub(balloon, "stats", period=str(spec.balloon_period_s))
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")

    netdev, device = netdev_args(spec)
    commandline = _sub(domain, f"{{{QEMU_NS}}}commandline")
    for value in ("-netdev", netdev, "-device", device):
        _sub(commandline, f"{{{QEMU_NS}}}arg", value=value)
    return domain


def domain_xml(spec: DomainSpec) -> str:
    """The domain XML text (pure, deterministic for the same spec)."""
    element = domain_element(spec)
    ET.indent(element)
    return ET.tostring(element, encoding="unicode") + "\n"


def forwards_of(element: ET.Element) -> list[str]:
    """The hostfwd= entries of a domain's QEMU command line (for `jvmkit ps` and tests)."""
    values = [a.get("value", "") for a in element.iter(f"{{{QEMU_NS}}}arg")]
    return [part for v in values if v.startswith("user,") for part in v.split(",") if part.startswith("hostfwd=")]
