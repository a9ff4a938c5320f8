"""The balloon on an OSv guest, end to end: samples/phases under `jvmkit run --balloon` with a real
OSv kernel, the real agent, JMX and QMP (TCG here).

OSv's virtio-balloon has no stats queue, so the host agent reads the guest's memory from its JVM
(the OperatingSystem MXBean: OSv's sysinfo). The test checks that the floor of a `balloon set`
comes from that reading and not from the 192M guess, that the reading counts the balloon's pages
as taken (OSv's driver allocates them: free memory falls, the total stays; the policy subtracts
them from used memory on that premise), and that the floor keeps room for the heap's max: OSv
cannot take ballooned pages back when it runs out (a regrowth under a balloon squeezed to 256M
stalled the guest or hung it for good). Then the app grows again and exits 0 without
OutOfMemoryError. About 2 minutes.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from support.images import jvmkit, pack_image
from support.servers import free_port
from support.vms import PhasesRun, read_log, require_osv_kernel, wait_for, wake_app

pytestmark = [pytest.mark.vm, pytest.mark.osv]

KERNEL = require_osv_kernel("the OSv balloon test")

GROW_MB = 200
XMX_MIB = 600
IDLE_S = 150   # at most: the test ends the idle phase once it has checked the set
WAKE_GUEST_PORT = 9099
LOW_MARK_MIB = 24  # policy.Settings.guest_low_available_mib


def test_an_osv_guest_is_steered_by_its_jvms_reading_and_never_starves(samples, tmp_path):
    image = pack_image(samples["phases"], tmp_path / "phases.jvmkit", "osv", "--kernel", KERNEL, "--memory", "1G",
                       f"--jvm-arg=-Xmx{XMX_MIB}m")
    log = tmp_path / "balloon.jsonl"
    name = f"osv-balloon-{os.getpid()}"
    wake = free_port()
    run = PhasesRun(image, log, name, wake, GROW_MB, IDLE_S, WAKE_GUEST_PORT)
    try:
        run.wait_phase("dropped", 300)
        decisions = lambda: [r for r in read_log(log) if r["event"] == "decision"]  # noqa: E731
        # The controller has a reading of the guest's memory although the balloon reports none.
        seen = wait_for(lambda: [r for r in decisions() if r["numbers"].get("guest_available_mib") is not None],
                        60, "a decision with the guest's memory read from its JVM")
        print("first JVM readings:", [(r["numbers"]["balloon_actual_mib"], r["numbers"]["guest_available_mib"],
                                       r["numbers"].get("non_heap_mib")) for r in seen[:3]])

        asked = time.time()
        result = jvmkit("balloon", "set", name, "100M", "--json", timeout=120)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        floor = answer["floor"]
        print("balloon set:", answer["why"])
        assert floor["from_stats"], floor            # measured from the JVM's reading, not assumed
        assert "assumed" not in answer["why"], answer["why"]
        assert floor["to_heap_max"] and floor["headroom_mib"] + floor["heap_live_mib"] >= XMX_MIB, floor
        assert XMX_MIB < answer["target_mib"] < 1024, answer

        def inflated():
            late = [r for r in decisions() if r["time"] >= asked + 4]
            return [r for r in late if r["numbers"]["balloon_actual_mib"] < 900]

        late = wait_for(inflated, 60, "the balloon to take memory from the OSv guest")
        time.sleep(6)
        late = inflated()
        for r in late:
            n = r["numbers"]
            total = 1024 - n["kernel_reserved_mib"]
            inflated_mib = 1024 - n["balloon_actual_mib"]
            # The balloon's pages are not free in the guest: what it reads as available fits in
            # what the balloon left it (a few MiB of slack for pages moving between the readings).
            assert n["guest_available_mib"] <= total - inflated_mib + 16, n
            assert n["guest_available_mib"] >= LOW_MARK_MIB, n
            assert n["balloon_actual_mib"] > XMX_MIB, n
        print("after the set (actual, available, non-heap):",
              [(r["numbers"]["balloon_actual_mib"], r["numbers"]["guest_available_mib"], r["numbers"]["non_heap_mib"])
               for r in late[-4:]])

        # The second growth gets memory back and completes; the app exits 0.
        wake_app(wake)
        output, err = run.finish(300)
        assert run.proc.returncode == 0, err
        assert f"regrew {GROW_MB} MiB" in output and "OutOfMemoryError" not in output
        for r in read_log(log):
            if r["event"] == "decision":
                assert 256 <= r["balloon_target_mib"] <= 1024, r
    finally:
        run.kill()
