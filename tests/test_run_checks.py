"""What `jvmkit run` refuses before QEMU starts, and with which status (issue 13, item 3): a port
published twice, a guest larger than the host or below the image's floor (one rule, worded the same
by pack and run), `--accel kvm` where the probe says KVM cannot run guests, and corrupt or foreign
images, all bad input (2); never the status of a jvmkit bug (70) or an environment problem (1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jvmkit.errors import UsageError
from jvmkit.packager.manifest import FileRecord
from jvmkit.packager.targets import get
from jvmkit.packager.targets.base import MemoryFloor
from jvmkit.vm import kvm, runner
from jvmkit.vm.qemu import PortForward

JVMKIT = [sys.executable, "-m", "jvmkit"]


def fwd(spec: str) -> PortForward:
    return runner.parse_publish(spec)


@pytest.mark.parametrize("specs, message", [
    (["8080:80", "8080:81"], "host port 8080 is published twice (127.0.0.1:8080:80 and 127.0.0.1:8080:81)"),
    (["0.0.0.0:8080:80", "127.0.0.1:8080:81"], "host port 8080 is published twice"),
    (["8080:80", "8081:80"], "guest port 80 is published twice (127.0.0.1:8080:80 and 127.0.0.1:8081:80)"),
])
def test_a_port_published_twice_is_refused(specs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        runner.check_publish([fwd(s) for s in specs])
    assert err.value.exit_code == 2


def test_distinct_ports_and_addresses_pass():
    runner.check_publish([fwd("8080:80"), fwd("8081:81"), fwd("127.0.0.2:8080:82")])


def test_memory_above_the_host_is_refused_in_the_users_words():
    with pytest.raises(UsageError, match=r"--memory 1T is more than this host has \(24G in all\)"):
        runner.check_memory(1 << 20, "--memory 1T", 24 * 1024)
    runner.check_memory(24 * 1024, "--memory 24G", 24 * 1024)
    runner.check_memory(1 << 20, "--memory 1T", None)  # no /proc/meminfo: nothing to check against


def test_one_memory_floor_rule_for_both_targets():
    linux, osv = get("linux"), get("osv")
    files = {"initramfs": FileRecord(path="i", sha256="0" * 64, size=1, raw_size=57 << 20)}
    assert linux.memory_floor(files) == MemoryFloor(256, "its initramfs unpacks to 57 MiB in guest memory")
    assert osv.memory_floor({}).mib == 72
    disk = lambda mib: {"disk": FileRecord(path="d", sha256="0" * 64, size=1, raw_size=mib << 20)}  # noqa: E731
    # measured: 51 MiB of runtime disk started at 76M (not 72M), 272 MiB at 84M (not 76M)
    assert (osv.memory_floor(disk(51)).mib, osv.memory_floor(disk(272)).mib) == (76, 84)
    for floor, memory in ((linux.memory_floor(files), "--memory 64M"), (osv.memory_floor({}), "--memory 1M")):
        with pytest.raises(UsageError) as err:
            floor.check(int(memory.split()[1][:-1]), memory, "x.jvmkit")
        assert err.value.message.startswith(f"{memory} is too small for image x.jvmkit: it needs at least {floor.mib}M")
        assert err.value.hint == f"use --memory {floor.mib}M or more"


def test_accel_kvm_where_kvm_cannot_run_guests_is_bad_input():
    verdict = kvm.KvmVerdict(False, "/dev/kvm exists but cannot run guests", "h", 0.0)
    with pytest.raises(UsageError, match="--accel kvm: KVM is not usable here") as err:
        runner.choose_accel("kvm", lambda: verdict)
    assert err.value.exit_code == 2


@pytest.mark.parametrize("damage", ["not-json", "foreign-format", "wrong-type", "escaping-path", "missing"])
def test_corrupt_or_foreign_images_exit_2_in_one_line(tmp_path, damage):
    image = tmp_path / "x.jvmkit"
    image.mkdir()
    manifest = json.loads((Path(__file__).parent / "data" / "manifest-v1-linux.json").read_text())
    text = {
        "not-json": "{ this is not json",
        "foreign-format": json.dumps({**manifest, "format": 99}),
        "wrong-type": json.dumps({**manifest, "defaults": {"memory_mib": "lots", "cpus": 1}}),
        "escaping-path": json.dumps({**manifest, "files": {"kernel": {**manifest["files"]["kernel"],
                                                                       "path": "../../etc/passwd"}}}),
        "missing": json.dumps(manifest),  # the files it lists are not there
    }[damage]
    (image / "manifest.json").write_text(text)
    proc = subprocess.run([*JVMKIT, "run", str(image)], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("jvmkit: error: ") and str(image) in lines[0], proc.stderr
