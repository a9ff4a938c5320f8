"""The libvirt domain XML (engines/libvirt_xml.py) as a pure function of the manifest and the target's
boot plan, the engine's small pure pieces, and the settings/CLI rows that reach it.

No libvirtd here: tests/test_libvirt_vm.py defines and starts these domains for real.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from jvmkit.engines import libvirt_xml
from jvmkit.engines.libvirt_xml import QEMU_NS, DomainSpec, domain_element, domain_xml
from jvmkit.packager import targets
from jvmkit.packager.manifest import Manifest
from jvmkit.packager.targets.base import BootRequest
from jvmkit.vm.qemu import PortForward, VmConfig, qemu_argv

ROOT = Path(__file__).resolve().parent.parent


# ---- synthetic manifests (shared with test_kubevirt.py) ------------------------------------------

def manifest_json(target: str, name: str = "app") -> dict:
    """A manifest as `pack` writes it, for `target`, with no bundle behind it (pure tests only)."""
    files = {"linux": {"kernel": {"path": "vmlinux.zst", "sha256": "a" * 64, "size": 10, "compression": "zstd",
                                  "raw_sha256": "b" * 64, "raw_size": 20},
                       "initramfs": {"path": "initramfs.cpio.zst", "sha256": "c" * 64, "size": 10,
                                     "compression": "zstd", "raw_sha256": "d" * 64, "raw_size": 30 << 20}},
             "osv": {"kernel": {"path": "kernel.zst", "sha256": "a" * 64, "size": 10, "compression": "zstd",
                                "raw_sha256": "b" * 64, "raw_size": 20},
                     "disk": {"path": "disk.img.zst", "sha256": "c" * 64, "size": 10, "compression": "zstd",
                              "raw_sha256": "d" * 64, "raw_size": 40 << 20, "rofs_offset": 1 << 20,
                              "rofs_size": 39 << 20}}}[target]
    java = ["/jvm/bin/java", "-Djvmkit.seed=/run/jvmkit/seed", "-javaagent:/jvmkit/agent.jar", "-cp", "/app/app.jar",
            "app.Main"]
    if target == "linux":
        boot = {"kernel_cmdline": "console=ttyS0 panic=-1 rdinit=/init swiotlb=noforce", "machine": "q35"}
    else:
        argv = ["/jvm/bin/java", "-Djvmkit.seed=/dev/vblk1", "-javaagent:/jvmkit/agent.jar", "-cp",
                "jvmkit/agent.jar:app/app.jar", "io.jvmkit.agent.Launcher", "app.Main"]
        options = ["--power-off-on-abort", "--cwd=/", "--verbose", "--ip=eth0,10.0.2.15,255.255.255.0",
                   "--defaultgw=10.0.2.2", "--nameserver=10.0.2.3"]
        boot = {"kernel_cmdline": "--rootfs=rofs " + " ".join(options) + " /jvm/bin/java -cp jvmkit/agent.jar:app/app.jar "
                                  "io.jvmkit.agent.Launcher app.Main",
                "cmdline": {"argv": argv, "agent_flags": argv[1:3], "args": [], "env": {"JAVA_HOME": "/jvm"},
                            "options": options}, "machine": "pc"}
    return {"format": 1, "name": name, "target": target,
            "app": {"jar": "app.jar", "main_class": "app.Main", "class_path": ["/app/app.jar"], "jar_sha256": "e" * 64},
            "jdk": {"version": "17.0.9", "release": 17, "modules": ["java.base"], "profile": {"name": "default"}},
            "agent": {"path": "/jvmkit/agent.jar", "key": "k"}, "kernel": {"name": target, "version": "1"},
            "command": {"java": java, "agent_flags": java[1:3]}, "defaults": {"memory_mib": 384, "cpus": 1},
            "guest": {"ports": [8080], "jmx_port": 7091}, "files": files, "boot": boot,
            "source_date_epoch": 1700000000}


def manifest(target: str, name: str = "app") -> Manifest:
    return Manifest.from_json(manifest_json(target, name))


def boot_files(target: str, root: Path) -> dict[str, Path]:
    return {role: root / role for role in manifest_json(target)["files"]}


def plan_for(target: str, root: Path = Path("/exports/app"), request: BootRequest = BootRequest(), secrets=None):
    written = {}

    def write_secret(name: str, data: bytes) -> Path:
        written[name] = data
        return root / name

    plan = targets.get(target).boot_plan(manifest(target), boot_files(target, root), request, write_secret)
    return plan, written


def spec_for(target: str, **overrides) -> DomainSpec:
    plan, _ = plan_for(target)
    base = dict(name="app", plan=plan, memory_mib=384, cpus=1, console_log=Path("/exports/app/console.log"),
                app_log=Path("/exports/app/app.log") if libvirt_xml.app_log_needed(plan) else None, accel="tcg",
                ports=(PortForward("127.0.0.1", 18080, 8080),), target=target, image="app")
    base.update(overrides)
    return DomainSpec(**base)


def runner_append(target: str) -> str:
    """The -append the QEMU runner passes for the same image and request."""
    plan, _ = plan_for(target)
    config = VmConfig(name="x", kernel=plan.kernel, append=plan.append, memory_mib=384, cpus=1, accel="tcg",
                      qmp_socket=Path("/q"), console_log=Path("/c"), initrd=plan.initrd, disk=plan.disk,
                      machine=plan.machine)
    argv = qemu_argv(config)
    return argv[argv.index("-append") + 1]


# ---- the XML ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["linux", "osv"])
def test_domain_boots_what_the_runner_boots(target):
    root = domain_element(spec_for(target))
    plan, _ = plan_for(target)
    assert root.get("type") == "qemu"  # TCG
    assert root.findtext("os/kernel") == str(plan.kernel)
    assert root.findtext("os/cmdline") == runner_append(target)  # the same kernel command line as `jvmkit run`
    assert root.find("os/type").get("machine") == manifest(target).boot.machine
    initrd = root.findtext("os/initrd")
    assert initrd == (str(plan.initrd) if plan.initrd else None)
    disks = root.findall("devices/disk")
    assert [d.find("source").get("file") for d in disks] == ([str(plan.disk)] if plan.disk else [])
    for disk in disks:
        assert disk.find("readonly") is not None and disk.find("driver").get("type") == "raw"
        assert disk.find("driver").get("ioeventfd") == "off"  # TCG: the kick in the vCPU thread, as the runner
    assert root.findtext("memory") == "384" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("currentMemory") == "384" and root.findtext("vcpu") == "1"
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        assert root.findtext(event) == "destroy"  # -no-reboot: /init's `reboot -f` ends the domain
    assert root.find("features/acpi") is not None
    assert root.find("features/tcg/tb-cache").text == "128"


@pytest.mark.parametrize("target", ["linux", "osv"])
def test_balloon_rng_consoles_and_ports(target):
    root = domain_element(spec_for(target))
    balloon = root.find("devices/memballoon")
    assert balloon.attrib == {"model": "virtio", "autodeflate": "on", "freePageReporting": "on"}
    assert balloon.find("stats").get("period") == "2"
    assert root.find("devices/rng").get("model") == "virtio"
    assert root.findtext("devices/rng/backend") == "/dev/urandom"
    serials = {s.find("target").get("port"): s.find("source").get("path") for s in root.findall("devices/serial")}
    plan, _ = plan_for(target)
    if plan.console_stdio:  # one console carries the guest and the app (osv)
        assert serials == {"0": "/exports/app/console.log"}
    else:                   # the app on its own port (linux: ttyS1)
        assert serials == {"0": "/exports/app/console.log", "1": "/exports/app/app.log"}
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args[0] == "-netdev" and args[2] == "-device"
    assert args[1] == "user,id=jvmkitnet0,hostfwd=tcp:127.0.0.1:18080-:8080"
    bus = {"q35": "pcie.0", "pc": "pci.0"}[plan.machine]
    assert args[3] == f"virtio-net-pci,netdev=jvmkitnet0,bus={bus},addr=0x10,romfile="
    assert libvirt_xml.forwards_of(root) == ["hostfwd=tcp:127.0.0.1:18080-:8080"]


def test_kvm_domain_and_no_fpr():
    root = domain_element(spec_for("osv", accel="kvm", free_page_reporting=False, disk_aio="io_uring"))
    assert root.get("type") == "kvm" and root.find("cpu").get("mode") == "host-passthrough"
    assert root.find("features/tcg") is None
    assert root.find("devices/memballoon").get("freePageReporting") == "off"
    driver = root.find("devices/disk/driver")
    assert driver.get("io") == "io_uring" and driver.get("ioeventfd") is None and driver.get("cache") == "unsafe"


def test_seed_reaches_the_guest_as_the_runner_delivers_it(tmp_path):
    """linux: the seed and run-time args as fw_cfg files (paths only); osv: a second read-only disk."""
    request = BootRequest(args=("a b", "c"), seed=b"jmx.password=secret\n")
    plan, written = plan_for("linux", tmp_path, request)
    root = domain_element(spec_for("linux", plan=plan))
    entries = {e.get("name"): e.get("file") for e in root.findall("sysinfo/entry")}
    assert root.find("sysinfo").get("type") == "fwcfg"
    assert entries == {"opt/io.jvmkit/seed": str(tmp_path / "seed"), "opt/io.jvmkit/args": str(tmp_path / "args")}
    assert "secret" not in domain_xml(spec_for("linux", plan=plan))
    plan, written = plan_for("osv", tmp_path, request)
    root = domain_element(spec_for("osv", plan=plan))
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]
    assert disks[1].find("source").get("file") == str(tmp_path / "seed.img") and disks[1].find("readonly") is not None
    assert "a b" in root.findtext("os/cmdline") or "'a b'" in root.findtext("os/cmdline")


def test_xml_is_deterministic_and_parses():
    first, second = domain_xml(spec_for("linux")), domain_xml(spec_for("linux"))
    assert first == second and first.endswith("\n")
    root = ET.fromstring(first)
    assert root.tag == "domain" and root.findtext("name") == "app"
    assert root.find("metadata/{https://jvmkit.dev/libvirt/1}image").attrib == {"name": "app", "target": "linux"}


def test_unknown_machine_or_accel_is_refused():
    plan, _ = plan_for("linux")
    import dataclasses

    with pytest.raises(ValueError, match="machine"):
        domain_element(spec_for("linux", plan=dataclasses.replace(plan, machine="virt")))
    with pytest.raises(ValueError, match="accelerator"):
        domain_element(spec_for("linux", accel="hvf"))


def test_generator_holds_no_target_names():
    """Everything that differs between targets comes through the boot plan."""
    for module in ("libvirt_xml.py", "libvirt.py", "export.py", "kubevirt.py"):  # oci.py's "linux" is the OCI os
        source = (ROOT / "jvmkit" / "engines" / module).read_text()
        code = "\n".join(line.split("#")[0] for line in source.splitlines())
        assert not re.search(r"""["'](linux|osv)["']""", code), module
        assert "== \"linux\"" not in code and "target.name ==" not in code, module


# ---- the CLI and settings rows ------------------------------------------------------------------

def test_cli_export_formats_are_the_targets():
    from jvmkit import cli

    union = tuple(dict.fromkeys(f for t in targets.all_targets() for f in t.export_formats))
    assert cli.EXPORT_FORMATS == union
    for t in targets.all_targets():
        assert {"libvirt", "kubevirt"} <= set(t.export_formats)


def test_engine_and_connect_settings(tmp_path):
    from jvmkit import config

    options = config.run_options({}, None)
    assert options.engine == "qemu" and options.connect == "qemu:///system"
    toml = tmp_path / "jvmkit.toml"
    toml.write_text('[run]\nengine = "libvirt"\nconnect = "qemu+ssh://host/system"\n')
    options = config.run_options({}, toml)
    assert options.engine == "libvirt" and options.connect == "qemu+ssh://host/system"
    toml.write_text('[run]\nengine = "xen"\n')
    with pytest.raises(Exception, match="engine"):
        config.run_options({}, toml)


def test_missing_bindings_are_one_line(monkeypatch):
    from jvmkit.engines import libvirt as engine
    from jvmkit.errors import JvmkitError

    monkeypatch.setitem(sys.modules, "libvirt", None)  # as if libvirt-python were not installed
    with pytest.raises(JvmkitError) as info:
        engine.libvirt_module()
    assert "jvmkit[libvirt]" in str(info.value) and "\n" not in str(info.value)


def test_is_local():
    from jvmkit.engines.libvirt import is_local

    assert is_local("qemu:///system") and is_local("qemu:///session")
    assert not is_local("qemu+ssh://host/system") and not is_local("qemu+tcp://10.0.0.1/system")


class FakeDomain:
    """Stands in for a libvirt virDomain (libvirtd is exercised in test_libvirt_vm.py): only the
    mapping of libvirt's memoryStats() names onto the controller's is checked here."""

    def __init__(self, stats):
        self.stats = stats
        self.set_to = None

    def memoryStats(self):
        return self.stats

    def setMemoryFlags(self, kib, flags):
        self.set_to = (kib, flags)


def test_libvirt_balloon_maps_stats():
    pytest.importorskip("libvirt")
    from jvmkit.engines.libvirt import LibvirtBalloon

    linux = FakeDomain({"actual": 393216, "unused": 252280, "available": 352272, "usable": 254584,
                        "last_update": 1796165842, "rss": 430364})
    device = LibvirtBalloon(linux)
    assert device.read() == {"actual": 393216 * 1024, "updated": 1796165842, "total": 352272 * 1024,
                             "available": 254584 * 1024, "free": 252280 * 1024}
    osv = LibvirtBalloon(FakeDomain({"actual": 393216, "last_update": 0, "rss": 245828}))  # as measured: actual only
    assert osv.read() == {"actual": 393216 * 1024, "updated": 0, "total": None, "available": None, "free": None}
    device.set(200 << 20)
    import libvirt

    assert linux.set_to == (200 << 10, libvirt.VIR_DOMAIN_AFFECT_LIVE) and device.changed_at > 0
