"""`jvmkit export IMAGE --format kubevirt -o DIR`: a containerDisk OCI image and a VirtualMachine.

DIR/containerdisk/      the OCI image layout (`skopeo inspect oci:DIR/containerdisk:REF`)
DIR/containerdisk.tar   the same as an oci-archive (`skopeo copy oci-archive:... docker://REGISTRY/...`,
                        `podman load -i`)
DIR/virtualmachine.yaml a kubevirt.io/v1 VirtualMachine and, with --publish, a v1 Service

What the image holds is the target's `cluster_boot`: `kernel` (linux) is KubeVirt's kernelBoot
container, /boot/<kernel> and /boot/<initrd>, booted with the runner's kernel command line; `disk`
(osv) is a containerDisk, /disk/disk.img (owned by 107:107, KubeVirt's qemu user, mode 0440), the
target's own bootable disk export. The manifest's fields were written against KubeVirt's API
types (staging/src/kubevirt.io/api/core/v1/{types,schema}.go); docs/engines/kubevirt.md says what
maps to what and what does not.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from jvmkit import fileio, ui
from jvmkit.engines import oci
from jvmkit.engines.export import (_no_secrets, prepare_dest, publish_dir, raw_name, run_settings, unpack_file)
from jvmkit.errors import UsageError
from jvmkit.packager.targets.base import BootRequest

QEMU_UID = 107                      # KubeVirt's virt-launcher runs QEMU as qemu (107:107)
MACHINE = "q35"                     # KubeVirt's default emulatedMachines on x86_64 are q35 only
DISK_VOLUME = "containerdisk"
LAYOUT, ARCHIVE, MANIFEST_FILE = "containerdisk", "containerdisk.tar", "virtualmachine.yaml"


def k8s_name(name: str) -> str:
    """A DNS-1123 label from an image name (pure): lower case, [a-z0-9-], at most 63 characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "jvmkit"


def split_ref(ref: str) -> tuple[str, str]:
    """(repository, tag) of an image reference (a digest reference is refused: the export makes the image)."""
    last = ref.rsplit("/", 1)[-1]
    if "@" in ref:
        raise UsageError(f"--image-ref {ref!r}: give a tag, not a digest", hint="e.g. registry.example/app:1.0")
    if ":" in last:
        repo, tag = ref.rsplit(":", 1)
        return repo, tag
    return ref, "latest"


def mi(mib: int) -> str:
    return f"{mib}Mi"


def virtual_machine(*, name: str, image_ref: str, memory_mib: int, cpus: int, boot: dict,
                    ports: tuple = (), image: str = "", target: str = "") -> dict:
    """The VirtualMachine object (pure). `boot` is {"kernel": path, "initrd": path, "cmdline": str}
    for kernelBoot, or {"disk": path} for a containerDisk."""
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "jvmkit"}
    domain: dict = {
        "cpu": {"cores": cpus},
        "memory": {"guest": mi(memory_mib)},
        "resources": {"requests": {"memory": mi(memory_mib)}},
        "machine": {"type": MACHINE},
        "devices": {
            "autoattachMemBalloon": True,       # virtio balloon; stats period and free page reporting: cluster-wide
            "autoattachGraphicsDevice": False,
            "autoattachSerialConsole": True,
            "logSerialConsole": True,           # ttyS0 (the guest console) as the guest-console-log container
            "rng": {},
            "disks": [],
            "interfaces": [{"name": "default", "masquerade": {},
                            **({"ports": [{"name": f"p{p.guest_port}", "port": p.guest_port, "protocol": "TCP"}
                                          for p in ports]} if ports else {})}],
        },
    }
    volumes = []
    if "disk" in boot:
        domain["devices"]["disks"].append({"name": DISK_VOLUME, "disk": {"bus": "virtio"}})
        volumes.append({"name": DISK_VOLUME, "containerDisk": {"image": image_ref, "path": boot["disk"],
                                                                "imagePullPolicy": "IfNotPresent"}})
    else:
        container = {"image": image_ref, "kernelPath": boot["kernel"], "imagePullPolicy": "IfNotPresent"}
        if boot.get("initrd"):
            container["initrdPath"] = boot["initrd"]
        domain["firmware"] = {"kernelBoot": {"kernelArgs": boot["cmdline"], "container": container}}
        del domain["devices"]["disks"]
    spec: dict = {"domain": domain, "networks": [{"name": "default", "pod": {}}],
                  "terminationGracePeriodSeconds": 10}
    if volumes:
        spec["volumes"] = volumes
    annotations = {k: v for k, v in (("jvmkit.dev/image", image), ("jvmkit.dev/target", target)) if v}
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": labels, **({"annotations": annotations} if annotations else {})},
        "spec": {
            # A clean exit stays down (OSv powers off); a failure is started again.
            "runStrategy": "RerunOnFailure",
            "template": {"metadata": {"labels": {**labels, "kubevirt.io/domain": name}}, "spec": spec},
        },
    }


def service(name: str, ports: tuple) -> dict:
    """A v1 Service in front of the VM's published ports (pure): HOST port -> GUEST port."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name,
                                                  "app.kubernetes.io/managed-by": "jvmkit"}},
            "spec": {"selector": {"kubevirt.io/domain": name},
                     "ports": [{"name": f"p{p.guest_port}", "port": p.host_port, "targetPort": p.guest_port,
                                "protocol": "TCP"} for p in ports]}}


# ---- a small YAML writer (block style; scalars as JSON, which YAML reads the same) -------------------

def _yaml(value, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines += _yaml(item, indent + 2)
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            inner = _yaml(item, indent + 2)
            lines.append(pad + "- " + inner[0][indent + 2:])
            lines += inner[1:]
        return lines or [pad + "[]"]
    return [pad + _scalar(value)]


def _scalar(value) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return json.dumps(value)


def to_yaml(documents: list[dict]) -> str:
    """YAML documents (pure, deterministic)."""
    return "".join("---\n" + "\n".join(_yaml(doc, 0)) + "\n" for doc in documents)


# ---- what goes into the image ------------------------------------------------------------------------

def kernel_boot(plan, cmdline: str | None = None) -> tuple[dict, list[oci.LayerFile]]:
    """kernelBoot from a boot plan (pure): the `boot` of `virtual_machine` and the layer's files,
    /boot/<kernel> and /boot/<initrd>, booted with the plan's command line (or `cmdline`)."""
    files = [oci.LayerFile(f"boot/{plan.kernel.name}", plan.kernel, 0o444)]
    boot = {"kernel": f"/boot/{plan.kernel.name}", "cmdline": cmdline or plan.append}
    if plan.initrd is not None:
        files.append(oci.LayerFile(f"boot/{plan.initrd.name}", plan.initrd, 0o444))
        boot["initrd"] = f"/boot/{plan.initrd.name}"
    return boot, files


def disk_boot(disk: Path) -> tuple[dict, list[oci.LayerFile]]:
    """A containerDisk (pure): /disk/disk.img, owned by KubeVirt's qemu user, read-only."""
    return {"disk": "/disk/disk.img"}, [oci.LayerFile("disk/disk.img", disk, 0o440, QEMU_UID, QEMU_UID)]


# ---- export ------------------------------------------------------------------------------------------

def export_kubevirt(target, image, dest: Path, *, publish: tuple[str, ...] = (), memory_mib: int | None = None,
                    cpus: int | None = None, image_ref: str | None = None, loader: Path | None = None, **_) -> Path:
    manifest = image.manifest
    memory, cpus, forwards = run_settings(image, target, memory_mib=memory_mib, cpus=cpus, publish=publish)
    name = k8s_name(manifest.name)
    ref = image_ref or f"jvmkit/{name}:latest"
    split_ref(ref)  # refuses a digest reference
    cluster = target.cluster_boot(manifest)
    dest = prepare_dest(dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial.", dir=dest.parent))
    try:
        work = staging / ".files"
        work.mkdir()
        if cluster.kind == "disk":
            boot, files = disk_boot(target.export(image, cluster.export_format, work / "disk.img", loader=loader,
                                                  cmdline=cluster.cmdline))
        else:
            unpacked = {role: unpack_file(image, role, work / raw_name(record.path))
                        for role, record in sorted(manifest.files.items())}
            boot, files = kernel_boot(target.boot_plan(manifest, unpacked, BootRequest(), _no_secrets), cluster.cmdline)
        annotations = {"org.opencontainers.image.title": name, "dev.jvmkit.image": manifest.name,
                       "dev.jvmkit.target": manifest.target}
        with ui.current().step(f"OCI image {ref} ({cluster.kind})"):
            oci.write_layout(staging / LAYOUT, files, ref=ref, mtime=manifest.source_date_epoch,
                             annotations=annotations)
            oci.write_archive(staging / LAYOUT, staging / ARCHIVE, manifest.source_date_epoch)
        shutil.rmtree(work)
        docs = [virtual_machine(name=name, image_ref=ref, memory_mib=memory, cpus=cpus, boot=boot, ports=forwards,
                                image=manifest.name, target=manifest.target)]
        if forwards:
            docs.append(service(name, forwards))
        fileio.atomic_write_bytes(staging / MANIFEST_FILE, to_yaml(docs).encode())
        staging.chmod(0o755)
        publish_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
