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


def test_a_vm_that_does_not_fit_waits_while_the_brain_makes_room(run_root, monkeypatch):
    """`jvmkit up` claims room for a VM that does not fit when the brain could free it from the idle
    VMs' live heaps, then starts it once the floors dropped, or refuses it after ADMIT_WAIT_S. The
    brain is stood in for by its lock, heartbeat and status files (the real one needs running VMs:
    benchmarks/density.py runs it); admission, claims and the supervisor are the real ones."""
    import fcntl
    import io
    import time

    from jvmkit.fleet import lease, up
    from jvmkit.fleet.file import load
    from jvmkit.fleet.state import overhead_mib

    root = run_root / "xdg" / "jvmkit"
    run = root / "idle-1"                     # a running balloon VM (its floor: the brain status below)
    run.mkdir(parents=True, mode=0o700)
    state = {"name": "idle-1", "qemu_pid": os.getpid(), "jvmkit_pid": os.getpid(), "memory_mib": 1024,
             "accel": "kvm", "balloon": {"brain": 1, "floor_mib": 256, "ceiling_mib": 1024}}
    (run / "state.json").write_text(json.dumps(state))
    bdir = lease.brain_dir(root)
    lock = os.open(bdir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)          # held, as by a live brain

    def brain(floor, releasable):
        lease.write_json(bdir / "heartbeat.json", {"pid": os.getpid(), "time": time.time()})
        lease.write_json(bdir / "status.json", {"vms": {"idle-1": {"floor_mib": floor, "role": "idle"}},
                                                "releasable_mib": releasable})

    fleet_file = run_root / "more.toml"
    fleet_file.write_text('host_memory = "1400M"\n[[vm]]\nname = "new"\nimage = "app.jvmkit"\nmemory = "1G"\n'
                          'min_memory = "300M"\naccel = "kvm"\n')
    qemu = overhead_mib({"accel": "kvm"})
    try:
        out = io.StringIO()
        sup = up.Supervisor(load(fleet_file), out=out)
        m = sup.members[0]
        brain(800, 400)                       # 1400 - 800 - 100 = 500M left; new needs 300 + 100
        assert sup.admit(m)
        brain(1000, 400)                      # 300M left: 100M missing, 400M could be released
        assert not sup.admit(m) and m.phase == "admitting"
        assert lease.read_claims(root) == {"new": 300 + qemu}
        assert "new | waiting for 100M of the host budget: the idle VMs' shrinker hooks are asked" in out.getvalue()
        assert not sup.admit(m) and m.phase == "admitting"   # still short: still waiting
        brain(900, 300)                       # the hooks released 100M
        assert sup.admit(m)
        assert "new | admitted after" in out.getvalue() and lease.read_claims(root) == {}
        # the wait runs out
        m.phase = "pending"
        brain(1000, 400)
        assert not sup.admit(m) and m.phase == "admitting"
        m.admit_until = 0.0
        assert not sup.admit(m) and m.phase == "refused"
        assert m.note.endswith("100M missing (after 60s of asking the idle VMs to make room)"), m.note
        assert lease.read_claims(root) == {}
        # nothing to release that would cover it: refused at once, no claim
        m.phase = "pending"
        brain(1000, 50)
        assert not sup.admit(m) and m.phase == "refused" and "after" not in m.note
        assert not list(lease.claims_dir(root).iterdir())
    finally:
        os.close(lock)


def test_claims_of_a_dead_writer_or_out_of_time_count_no_more(tmp_path):
    import time

    from jvmkit.fleet import lease

    lease.write_claim("live", 400, time.time() + 60, tmp_path)
    lease.write_claim("late", 400, time.time() - 1, tmp_path)
    lease.write_json(lease.claims_dir(tmp_path) / "dead.json", {"name": "dead", "mib": 400, "pid": 2**22 + 12345,
                                                                "until": time.time() + 60})
    assert lease.read_claims(tmp_path) == {"live": 400}
    assert sorted(p.name for p in lease.claims_dir(tmp_path).iterdir()) == ["live.json"]
    lease.remove_claim("live", tmp_path)
    assert lease.read_claims(tmp_path) == {}


def test_balloon_status_names_the_vms_waiting_for_admission():
    from jvmkit.balloon.control import budget_line

    line = budget_line({"budget_mib": 3072, "budget_from": "host_memory of fleet shop", "counted_mib": 2990,
                        "floors_mib": 2900, "allotted_mib": 3072, "pid": 42, "waiting": {"cache-8": 388}})
    assert line.endswith("brain pid 42; waiting for admission: cache-8 (388M)"), line
    assert "waiting" not in budget_line({"budget_mib": 3072, "counted_mib": 0, "pid": 42, "waiting": {}})
