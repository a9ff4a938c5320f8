"""`jvmkit up` / `down` without booting guests: admission refusal, one-line errors, the pure parts.

Admission happens before any `jvmkit run` starts, so a fleet whose VMs do not fit is refused here
for real (the images are stand-ins: no VM gets far enough to read one). Booting fleets are in
tests/test_fleet_vm.py.
"""

import json
import os
import subprocess
import sys

import pytest

from jvmkit.fleet.state import Admission, vm_floor_mib
from jvmkit.fleet.up import backoff_s, wants_restart


@pytest.fixture
def run_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir()
    image = tmp_path / "app.jvmkit"
    image.mkdir()
    (image / "manifest.json").write_text("{}")
    return tmp_path


def jvmkit(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "jvmkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=os.environ)


def test_a_vm_whose_floor_does_not_fit_is_not_started(run_root):
    fleet = run_root / "tight.toml"
    fleet.write_text('host_memory = "600M"\n[[vm]]\nname = "big"\nimage = "app.jvmkit"\nmemory = "1G"\n'
                     'min_memory = "512M"\naccel = "tcg"\n')
    for argv in (("up", fleet), ("up", "-d", fleet)):
        proc = jvmkit(*argv)
        assert proc.returncode == 1, proc
        assert "-d" not in argv or proc.stdout.startswith("fleet tight started no VM"), proc.stdout
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert lines[0] == ("jvmkit up: big not started: its floor 512M + 228M for QEMU does not fit in what is "
                            "left of the host budget (600M of 600M, host_memory of fleet tight): 140M missing"), lines
        assert not list((run_root / "xdg" / "jvmkit").glob("big*")), "no run directory, no VM"
    assert json.loads(jvmkit("ps", "--json").stdout)["vms"] == []


def test_without_the_balloon_a_vm_reserves_all_of_its_memory(run_root):
    fleet = run_root / "plain.toml"
    fleet.write_text('host_memory = "1G"\n[[vm]]\nname = "plain"\nimage = "app.jvmkit"\nmemory = "1G"\n'
                     'min_memory = "128M"\nballoon = false\naccel = "kvm"\n')
    proc = jvmkit("up", fleet)
    assert proc.returncode == 1 and "its floor 1024M + 100M for QEMU" in proc.stderr and "100M missing" in proc.stderr


def test_up_d_of_a_fleet_whose_vm_ends_at_once_says_so_and_why(run_root):
    """`jvmkit up -d` used to exit 1 with nothing on stderr when a VM ended while booting (seen in
    benchmarks/density.py); the stand-in image makes its `jvmkit run` end at once with status 2."""
    fleet = run_root / "short.toml"
    fleet.write_text('host_memory = "4G"\n[[vm]]\nname = "short"\nimage = "app.jvmkit"\nmemory = "512M"\n'
                     'accel = "tcg"\n')
    proc = jvmkit("up", "-d", fleet)
    assert proc.returncode == 1, proc
    assert proc.stdout.startswith("fleet short ended"), proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jvmkit up: short ended before the fleet was up (exit status 2): jvmkit: error: image ")
    assert "manifest format" in lines[0] and ".fleet/short.log" in lines[0], lines[0]


def test_down_of_a_fleet_that_is_not_up(run_root):
    proc = jvmkit("down", "nope")
    assert proc.returncode == 2 and proc.stderr.strip() == ("jvmkit: error: no fleet named 'nope' is up "
                                                            "(no fleet is up; see `jvmkit ps`)")


def test_admission_arithmetic():
    a = Admission("x", floor_mib=300, overhead_mib=228, budget_mib=3072, budget_from="host_memory of fleet f",
                  reserved_mib=2700)
    assert (a.left_mib, a.missing_mib, a.admitted) == (372, 156, False)
    assert "156M missing" in a.refusal() and "372M of 3G" in a.refusal()
    assert Admission("y", 100, 100, 1000, "", 800).admitted
    assert vm_floor_mib(True, 1024, None) == 256 and vm_floor_mib(True, 1024, 384) == 384
    assert vm_floor_mib(False, 1024, 384) == 1024


def test_the_heap_max_a_guest_jvm_will_have():
    from jvmkit.fleet.state import heap_max_mib

    assert heap_max_mib(["java", "-XX:MaxRAMPercentage=75"], 1024) == 768
    assert heap_max_mib(["java", "-XX:MaxRAMPercentage=75", "-Xmx600m"], 1024) == 600   # the user's -Xmx wins
    assert heap_max_mib(["java", "-Xmx1g", "-XX:MaxHeapSize=536870912"], 2048) == 512    # the last one, in bytes
    assert heap_max_mib(["java", "-Xmx2G", "-XX:MaxRAMPercentage=50"], 2048) == 1024     # ...whichever comes last
    assert heap_max_mib(["java"], 2048) == 512                                            # HotSpot's default 25%
    assert heap_max_mib(["java", "-Xmxbogus"], 1024) == 256


def test_a_guest_that_cannot_deflate_on_oom_is_admitted_with_room_for_its_heap():
    """An OSv VM's floor holds its heap's max (policy.Settings.deflate_on_oom): admitting it at its
    --min-memory let a third OSv cache-service VM into a 3G budget whose floors then came to 3423M
    (benchmarks/density.py). Linux guests are admitted at --min-memory as before."""
    from types import SimpleNamespace

    from jvmkit.fleet.state import start_floor_mib

    def image(target, *java):
        return SimpleNamespace(target=target, command=SimpleNamespace(java=("/jvm/bin/java", *java)))

    assert start_floor_mib(image("osv", "-XX:MaxRAMPercentage=75"), 1024) == 1008     # 768 + 192 + 48
    assert start_floor_mib(image("osv", "-XX:MaxRAMPercentage=75", "-Xmx600m"), 1024) == 840
    assert start_floor_mib(image("osv", "-Xmx4g"), 1024) == 1024                       # never above --memory
    assert start_floor_mib(image("linux", "-XX:MaxRAMPercentage=75"), 1024) is None
    assert vm_floor_mib(True, 1024, 256, 840) == 840 and vm_floor_mib(True, 1024, 900, 840) == 900
    assert vm_floor_mib(False, 1024, 256, 840) == 1024


def test_a_running_osv_vm_counts_at_its_start_floor_until_the_brain_has_one(tmp_path, monkeypatch):
    from jvmkit.fleet.state import overhead_mib, reserved_now

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    plain = tmp_path / "jvmkit" / "plain-1"   # a VM without the balloon: its --memory
    plain.mkdir(parents=True, mode=0o700)
    (plain / "state.json").write_text(json.dumps({"name": "plain-1", "qemu_pid": os.getpid(), "accel": "kvm",
                                                  "jvmkit_pid": os.getpid(), "memory_mib": 512}))
    run = tmp_path / "jvmkit" / "osv-1"
    run.mkdir(parents=True, mode=0o700)
    state = {"name": "osv-1", "qemu_pid": os.getpid(), "jvmkit_pid": os.getpid(), "memory_mib": 1024,
             "accel": "kvm", "balloon": {"brain": 1, "floor_mib": 256, "ceiling_mib": 1024, "start_floor_mib": 1008}}
    (run / "state.json").write_text(json.dumps(state))
    qemu = overhead_mib(state)
    assert reserved_now(tmp_path, None, {}) == 512 + 1008 + 2 * qemu
    assert reserved_now(tmp_path, {"vms": {"osv-1": {"floor_mib": 917}}}, {}) == 512 + 917 + 2 * qemu  # measured
    state["balloon"].pop("start_floor_mib")                                                             # linux
    (run / "state.json").write_text(json.dumps(state))
    assert reserved_now(tmp_path, None, {"new-1": 300, "osv-1": 999}) == 512 + 256 + 2 * qemu + 300


def test_restart_policy_and_backoff():
    assert [backoff_s(n) for n in (1, 2, 3, 4, 7, 20)] == [1, 2, 4, 8, 60, 60]
    assert wants_restart("always", 0) and wants_restart("on-failure", 3) and not wants_restart("on-failure", 0)
    assert not wants_restart("no", 1)
    assert not wants_restart("always", 130), "`jvmkit stop NAME` of a fleet VM is not undone"


def test_up_and_down_appear_in_help():
    out = jvmkit("--help").stdout
    assert " up " in out and " down " in out
    assert "18080+:8080" in jvmkit("up", "--help").stdout
