"""`jvmkit export --format kubevirt`, offline: the VirtualMachine/Service generator (pure, over the
manifest), the YAML writer, and the OCI layout writer.

No cluster runs here, so what is checked is:
- every key of the generated VirtualMachine against KubeVirt's API types: against a schema written
  here from those types (always), and against the Go types themselves, parsed from
  staging/src/kubevirt.io/api/core/v1/{types,schema}.go, when a KubeVirt source tree is given in
  JVMKIT_KUBEVIRT_SRC (a git directory or a checkout; none is committed here);
- the YAML reads back (PyYAML) to the same objects;
- the OCI layout: byte-for-byte reproducible, digests and sizes right, the layer's tar headers as
  KubeVirt wants them, and `skopeo inspect` accepting it where skopeo is installed.
What is not checked: that a KubeVirt cluster schedules and boots it (tests/test_libvirt_vm.py boots
the same files under libvirt and plain QEMU).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from jvmkit.engines import kubevirt, oci
from jvmkit.vm.qemu import PortForward

PORTS = (PortForward("127.0.0.1", 80, 8080), PortForward("127.0.0.1", 9090, 9090))
KERNEL_BOOT = {"kernel": "/boot/vmlinux", "initrd": "/boot/initramfs.cpio", "cmdline": "console=ttyS0 quiet"}
DISK_BOOT = {"disk": "/disk/disk.img"}


def vm(boot, ports=PORTS) -> dict:
    return kubevirt.virtual_machine(name="httpd", image_ref="registry.example/jvmkit/httpd:1.0", memory_mib=512,
                                    cpus=2, boot=boot, ports=ports, image="httpd", target="t")


# ---- a schema written from KubeVirt's API types (kubevirt.io/api/core/v1), the fields jvmkit uses ----
# A dict: allowed keys -> schema; "!" marks a required key (no omitempty in the Go tag).
STR, INT, BOOL, ANY = "str", "int", "bool", "any"
OBJECT_META = {"name": STR, "labels": {"*": STR}, "annotations": {"*": STR}, "namespace": STR}
QUANTITIES = {"*": STR}
SCHEMA = {
    "!apiVersion": STR, "!kind": STR, "metadata": OBJECT_META,
    "!spec": {                                                           # VirtualMachineSpec
        "runStrategy": STR,
        "!template": {                                                   # VirtualMachineInstanceTemplateSpec
            "metadata": OBJECT_META,
            "spec": {                                                    # VirtualMachineInstanceSpec
                "!domain": {                                             # DomainSpec
                    "cpu": {"cores": INT, "sockets": INT, "threads": INT, "model": STR},
                    "memory": {"guest": STR, "maxGuest": STR},
                    "resources": {"requests": QUANTITIES, "limits": QUANTITIES},
                    "machine": {"type": STR},
                    "firmware": {"kernelBoot": {"kernelArgs": STR,
                                                "container": {"!image": STR, "kernelPath": STR, "initrdPath": STR,
                                                              "imagePullPolicy": STR}}},
                    "!devices": {
                        "autoattachMemBalloon": BOOL, "autoattachGraphicsDevice": BOOL,
                        "autoattachSerialConsole": BOOL, "logSerialConsole": BOOL, "rng": {},
                        "disks": [{"!name": STR, "disk": {"bus": STR}}],
                        "interfaces": [{"!name": STR, "masquerade": {},
                                        "ports": [{"name": STR, "protocol": STR, "!port": INT}]}],
                    },
                },
                "networks": [{"!name": STR, "pod": {"vmNetworkCIDR": STR}}],
                "volumes": [{"!name": STR, "containerDisk": {"!image": STR, "path": STR, "imagePullPolicy": STR}}],
                "terminationGracePeriodSeconds": INT,
            },
        },
    },
}
SERVICE_SCHEMA = {"!apiVersion": STR, "!kind": STR, "metadata": OBJECT_META,
                  "spec": {"selector": {"*": STR},
                           "ports": [{"name": STR, "!port": INT, "targetPort": INT, "protocol": STR}]}}


def check(value, schema, where="$") -> list[str]:
    """Every key of `value` allowed by `schema`, required keys present, leaf types right."""
    errors = []
    if schema == ANY:
        return errors
    if isinstance(schema, str):
        types = {STR: str, INT: int, BOOL: bool}[schema]
        if not isinstance(value, types) or (types is int and isinstance(value, bool)):
            errors.append(f"{where}: {value!r} is not {schema}")
        return errors
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        for i, item in enumerate(value):
            errors += check(item, schema[0], f"{where}[{i}]")
        return errors
    if not isinstance(value, dict):
        return [f"{where}: not an object"]
    keys = {k.lstrip("!"): s for k, s in schema.items()}
    for key in (k[1:] for k in schema if k.startswith("!")):
        if key not in value:
            errors.append(f"{where}.{key}: required, missing")
    for key, item in value.items():
        if key in keys:
            errors += check(item, keys[key], f"{where}.{key}")
        elif "*" in keys:
            errors += check(item, keys["*"], f"{where}.{key}")
        else:
            errors.append(f"{where}.{key}: not a field here")
    return errors


def test_check_itself_finds_wrong_fields():
    bad = vm(KERNEL_BOOT)
    bad["spec"]["template"]["spec"]["domain"]["devices"]["memBalloon"] = True
    del bad["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]["name"]
    bad["spec"]["template"]["spec"]["domain"]["cpu"]["cores"] = "2"
    errors = check(bad, SCHEMA)
    assert len(errors) == 3, errors


@pytest.mark.parametrize("boot", [KERNEL_BOOT, DISK_BOOT], ids=["kernelBoot", "containerDisk"])
def test_virtual_machine_fields_are_kubevirts(boot):
    doc = vm(boot)
    assert check(doc, SCHEMA) == []
    assert doc["apiVersion"] == "kubevirt.io/v1" and doc["kind"] == "VirtualMachine"
    spec = doc["spec"]["template"]["spec"]
    domain = spec["domain"]
    assert domain["memory"]["guest"] == "512Mi" and domain["resources"]["requests"]["memory"] == "512Mi"
    assert domain["cpu"]["cores"] == 2 and domain["machine"]["type"] == "q35"
    assert domain["devices"]["autoattachMemBalloon"] is True and domain["devices"]["rng"] == {}
    ports = domain["devices"]["interfaces"][0]["ports"]
    assert [(p["port"], p["protocol"]) for p in ports] == [(8080, "TCP"), (9090, "TCP")]
    assert doc["spec"]["template"]["metadata"]["labels"]["kubevirt.io/domain"] == "httpd"
    if "disk" in boot:
        assert spec["volumes"] == [{"name": "containerdisk", "containerDisk": {
            "image": "registry.example/jvmkit/httpd:1.0", "path": "/disk/disk.img", "imagePullPolicy": "IfNotPresent"}}]
        assert domain["devices"]["disks"] == [{"name": "containerdisk", "disk": {"bus": "virtio"}}]
        assert "firmware" not in domain
    else:
        kb = domain["firmware"]["kernelBoot"]
        assert kb["kernelArgs"] == "console=ttyS0 quiet"
        assert kb["container"] == {"image": "registry.example/jvmkit/httpd:1.0", "kernelPath": "/boot/vmlinux",
                                   "initrdPath": "/boot/initramfs.cpio", "imagePullPolicy": "IfNotPresent"}
        assert "volumes" not in spec and "disks" not in domain["devices"]


def test_service_for_published_ports():
    svc = kubevirt.service("httpd", PORTS)
    assert check(svc, SERVICE_SCHEMA) == []
    assert svc["spec"]["selector"] == {"kubevirt.io/domain": "httpd"}
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(80, 8080), (9090, 9090)]
    assert "ports" not in vm(DISK_BOOT, ports=())["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]


def test_yaml_reads_back():
    yaml = pytest.importorskip("yaml")
    docs = [vm(KERNEL_BOOT), kubevirt.service("httpd", PORTS)]
    text = kubevirt.to_yaml(docs)
    assert list(yaml.safe_load_all(text)) == docs
    assert text == kubevirt.to_yaml(docs) and text.startswith("---\n")
    tricky = {"a": "yes", "b": "0123", "c": "x: y", "d": [], "e": {}, "f": [{"g": [1, 2]}], "h": 'q"uote'}
    assert list(yaml.safe_load_all(kubevirt.to_yaml([tricky]))) == [tricky]


def test_names_and_refs():
    assert kubevirt.k8s_name("My_App.v2") == "my-app-v2"
    assert kubevirt.k8s_name("---") == "jvmkit" and len(kubevirt.k8s_name("a" * 100)) == 63
    assert kubevirt.split_ref("registry:5000/x/app:1.2") == ("registry:5000/x/app", "1.2")
    assert kubevirt.split_ref("registry:5000/x/app") == ("registry:5000/x/app", "latest")
    with pytest.raises(Exception, match="digest"):
        kubevirt.split_ref("app@sha256:" + "0" * 64)


@pytest.mark.parametrize("target", ["linux", "osv"])
def test_the_targets_cluster_boot(target):
    """linux boots its kernel and initrd (kernelBoot); osv its classic disk, on DHCP (KubeVirt's pod
    network does not have QEMU's user network's fixed addresses)."""
    from test_libvirt_xml import manifest

    from jvmkit.packager import targets

    boot = targets.get(target).cluster_boot(manifest(target))
    if boot.kind == "disk":
        assert boot.export_format in targets.get(target).export_formats
        assert "--ip=" not in boot.cmdline and "--defaultgw" not in boot.cmdline and "--rootfs=rofs" in boot.cmdline
        assert "-javaagent" not in boot.cmdline and "io.jvmkit.agent.Launcher app.Main" in boot.cmdline
    else:
        from test_libvirt_xml import runner_append

        assert boot.kind == "kernel" and boot.cmdline == runner_append("linux") + " jvmkit.net=dhcp"


def test_from_the_manifest_to_the_virtual_machine():
    """linux: kernelBoot with the runner's own kernel command line plus `jvmkit.net=dhcp` (/init asks
    KubeVirt's pod network for its address by DHCP), the plan's kernel and initrd."""
    from test_libvirt_xml import manifest, plan_for, runner_append

    from jvmkit.packager import targets

    plan, _ = plan_for("linux")
    cluster = targets.get("linux").cluster_boot(manifest("linux"))
    boot, files = kubevirt.kernel_boot(plan, cluster.cmdline)
    expected = runner_append("linux") + " jvmkit.net=dhcp"
    assert boot == {"kernel": "/boot/kernel", "initrd": "/boot/initramfs", "cmdline": expected}
    assert [(f.path, f.source, f.mode) for f in files] == [("boot/kernel", plan.kernel, 0o444),
                                                           ("boot/initramfs", plan.initrd, 0o444)]
    doc = vm(boot)
    assert check(doc, SCHEMA) == []
    assert doc["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]["kernelArgs"] == expected
    assert kubevirt.kernel_boot(plan)[0]["cmdline"] == runner_append("linux")  # no cluster line: the plan's


def test_only_the_cluster_boot_asks_for_dhcp():
    """The exported kernelArgs ask /init for DHCP; jvmkit's own boot plan (slirp/passt, the fixed
    10.0.2.15) never does, verbose or not, and the flag is the one /init looks for."""
    from test_libvirt_xml import manifest, plan_for

    from jvmkit.packager import targets
    from jvmkit.packager.targets.base import BootRequest
    from jvmkit.packager.targets.linux import initramfs

    cluster = targets.get("linux").cluster_boot(manifest("linux"))
    assert "jvmkit.net=dhcp" in cluster.cmdline.split()
    for request in (BootRequest(), BootRequest(verbose=True), BootRequest(args=("a",), seed=b"s")):
        plan, _ = plan_for("linux", request=request)
        assert "jvmkit.net=dhcp" not in plan.append and "jvmkit.net" not in plan.append
    init = initramfs.init_script(["/jvm/bin/java", "app.Main"], [], [])
    assert f'*" {initramfs.NET_DHCP} "*)' in init and "udhcpc -i eth0" in init
    assert initramfs.NET_DHCP == "jvmkit.net=dhcp"
    fixed = "ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2"
    assert fixed in init and "echo 'nameserver 10.0.2.3' > /etc/resolv.conf" in init  # the default: unchanged
    boot, files = kubevirt.disk_boot(Path("/x/disk.img"))
    assert boot == DISK_BOOT and (files[0].uid, files[0].gid, files[0].mode) == (107, 107, 0o440)


# ---- the Go types themselves, when a KubeVirt source tree is given -------------------------------

def _go_sources() -> list[str] | None:
    src = os.environ.get("JVMKIT_KUBEVIRT_SRC")
    if not src:
        return None
    files = ("staging/src/kubevirt.io/api/core/v1/types.go", "staging/src/kubevirt.io/api/core/v1/schema.go")
    root = Path(src)
    if (root / files[0]).exists():
        return [(root / f).read_text() for f in files]
    return [subprocess.run(["git", "-C", src, "show", f"HEAD:{f}"], capture_output=True, text=True, check=True).stdout
            for f in files]


def go_structs(sources: list[str]) -> dict[str, dict[str, tuple[str, bool]]]:
    """struct name -> json key -> (Go type, required); inline members merged in afterwards."""
    structs: dict[str, dict] = {}
    inline: dict[str, list[str]] = {}
    for text in sources:
        for match in re.finditer(r"^type (\w+) struct \{\n(.*?)^\}", text, re.M | re.S):
            name, body = match.groups()
            fields, embeds = {}, []
            for line in body.splitlines():
                m = re.match(r'\s*(?:(\w+)\s+)?([\w.\[\]*]+)\s+`json:"([^"]*)"', line)
                if not m:
                    continue
                _, gotype, tag = m.groups()
                key, _, opts = tag.partition(",")
                if "inline" in opts:
                    embeds.append(gotype.split(".")[-1])
                elif key and key != "-":
                    fields[key] = (gotype, "omitempty" not in opts)
            structs[name], inline[name] = fields, embeds
    for name in structs:
        pending, seen = list(inline[name]), {name}
        while pending:
            member = pending.pop()
            if member in structs and member not in seen:
                seen.add(member)
                structs[name].update(structs[member])
                pending += inline.get(member, [])
    return structs


def go_check(value, gotype: str, structs, where: str) -> list[str]:
    base = gotype.lstrip("*")
    if base.startswith("[]"):
        return [e for i, v in enumerate(value) for e in go_check(v, base[2:], structs, f"{where}[{i}]")]
    if base.startswith("map["):
        return []
    name = base.split(".")[-1]
    if "." in base or name not in structs:  # a Kubernetes or builtin type: ObjectMeta, ResourceList, string...
        return []
    if not isinstance(value, dict):
        return [f"{where}: {name} must be an object"]
    fields = structs[name]
    errors = [f"{where}.{k}: no such field in {name}" for k in value if k not in fields]
    errors += [f"{where}.{k}: required by {name}" for k, (_, required) in fields.items()
               if required and k not in value and k not in ("status",)]
    for key, item in value.items():
        if key in fields:
            errors += go_check(item, fields[key][0], structs, f"{where}.{key}")
    return errors


@pytest.mark.parametrize("boot", [KERNEL_BOOT, DISK_BOOT], ids=["kernelBoot", "containerDisk"])
def test_virtual_machine_against_kubevirt_go_types(boot):
    sources = _go_sources()
    if sources is None:
        pytest.skip("set JVMKIT_KUBEVIRT_SRC to a kubevirt/kubevirt source tree or git directory to check "
                    "the manifest against its Go API types")
    structs = go_structs(sources)
    assert {"VirtualMachine", "VirtualMachineSpec", "DomainSpec", "KernelBoot", "Devices"} <= set(structs)
    doc = vm(boot)
    top = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}  # TypeMeta (inline, k8s)
    errors = go_check(top, "VirtualMachine", structs, "$")
    assert errors == []
    bad = vm(boot)
    bad["spec"]["template"]["spec"]["domain"]["devices"]["balloon"] = {}
    assert go_check(bad, "VirtualMachine", structs, "$")  # the check does find a wrong field


# ---- the OCI layout -------------------------------------------------------------------------------

def small_files(tmp_path) -> list[oci.LayerFile]:
    (tmp_path / "in").mkdir()
    kernel, initrd = tmp_path / "in" / "vmlinux", tmp_path / "in" / "initrd"
    kernel.write_bytes(os.urandom(0) + b"K" * 5000)
    initrd.write_bytes(bytes(range(256)) * 40)
    return [oci.LayerFile("disk/disk.img", initrd, 0o440, 107, 107), oci.LayerFile("boot/vmlinux", kernel)]


def blob(layout: Path, digest: str) -> bytes:
    data = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    return data


def test_oci_layout_is_reproducible_and_consistent(tmp_path):
    files = small_files(tmp_path)
    one = oci.write_layout(tmp_path / "one", files, ref="1.0", mtime=1700000000, annotations={"b": "2", "a": "1"})
    two = oci.write_layout(tmp_path / "two", list(reversed(files)), ref="1.0", mtime=1700000000,
                           annotations={"a": "1", "b": "2"})
    assert one == two
    for name in ("index.json", "oci-layout"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    layout = tmp_path / "one"
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"] == {oci.REF_NAME: "1.0", oci.CONTAINERD_NAME: "1.0"}
    assert entry["mediaType"] == oci.MANIFEST
    manifest = json.loads(blob(layout, entry["digest"]))
    assert entry["size"] == len(blob(layout, entry["digest"]))
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    (layer,) = manifest["layers"]
    data = blob(layout, layer["digest"])
    assert layer["size"] == len(data) and layer["mediaType"] == oci.LAYER_GZIP
    assert data[4:8] == b"\0\0\0\0"  # gzip MTIME 0
    raw = gzip.decompress(data)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == ["boot", "disk", "boot/vmlinux", "disk/disk.img"]
    disk = members["disk/disk.img"]
    assert (disk.uid, disk.gid, disk.mode, disk.mtime, disk.uname) == (107, 107, 0o440, 1700000000, "")
    assert members["boot"].isdir()


def test_oci_archive_is_reproducible(tmp_path):
    files = small_files(tmp_path)
    oci.write_layout(tmp_path / "layout", files, ref="latest", mtime=1)
    a = oci.write_archive(tmp_path / "layout", tmp_path / "a.tar", 1)
    b = oci.write_archive(tmp_path / "layout", tmp_path / "b.tar", 1)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        names = tar.getnames()
    assert "index.json" in names and "oci-layout" in names and any(n.startswith("blobs/sha256/") for n in names)


def test_skopeo_accepts_the_layout_and_archive(tmp_path):
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    files = small_files(tmp_path)
    desc = oci.write_layout(tmp_path / "layout", files, ref="latest", mtime=1)
    oci.write_archive(tmp_path / "layout", tmp_path / "image.tar", 1)
    for ref in (f"oci:{tmp_path / 'layout'}:latest", f"oci-archive:{tmp_path / 'image.tar'}"):
        proc = subprocess.run(["skopeo", "inspect", ref], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["Digest"] == desc.digest and info["Os"] == "linux" and len(info["Layers"]) == 1
    # A copy verifies every blob's digest and size on the way.
    proc = subprocess.run(["skopeo", "copy", "-q", f"oci:{tmp_path / 'layout'}:latest", f"dir:{tmp_path / 'copy'}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_podman_load_round_trip(tmp_path):
    """podman loads the archive under the reference the manifest pulls, with our manifest digest,
    config (image id) and layer diff_id. (Where podman is installed: .ci/run does not install it.)"""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install podman)")
    files = small_files(tmp_path)
    ref = f"localhost/jvmkit-test-{os.getpid()}:1"
    desc = oci.write_layout(tmp_path / "layout", files, ref=ref, mtime=1)
    oci.write_archive(tmp_path / "layout", tmp_path / "image.tar", 1)
    manifest = json.loads(blob(tmp_path / "layout", desc.digest))
    config = json.loads(blob(tmp_path / "layout", manifest["config"]["digest"]))
    loaded = subprocess.run(["podman", "load", "-q", "-i", str(tmp_path / "image.tar")], capture_output=True,
                            text=True, timeout=120)
    if loaded.returncode != 0 and "storage" in loaded.stderr.lower():
        pytest.skip(f"podman cannot run here: {loaded.stderr.strip().splitlines()[-1]}")
    try:
        assert loaded.returncode == 0 and ref in loaded.stdout, loaded.stderr
        info = json.loads(subprocess.run(["podman", "image", "inspect", ref], capture_output=True, text=True,
                                         timeout=60, check=True).stdout)[0]
        assert info["Digest"] == desc.digest
        assert "sha256:" + info["Id"] == manifest["config"]["digest"]
        assert info["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
    finally:
        subprocess.run(["podman", "rmi", "-f", ref], capture_output=True, timeout=60)
