"""The balloon policy as a table: sensor readings in, decisions out (pure, no VM)."""

import pytest

from jvmkit.balloon.policy import MIB, Inputs, Settings, decide, default_floor_mib, on_lost_contact

S = Settings(memory_mib=1024, min_memory_mib=256)


def inputs(**kw):
    base = dict(heap_used=50 * MIB, heap_committed=600 * MIB, heap_max=700 * MIB, gc_time_delta_ms=0,
                interval_s=2.0, balloon_actual_mib=1024, guest_total=1000 * MIB, guest_available=300 * MIB,
                host_total=24 * 1024 * MIB, host_available=20 * 1024 * MIB, host_psi_some_avg10=0.0)
    base.update(kw)
    return Inputs(**base)


CASES = [
    # name, inputs, expected action, check
    ("idle heap is reclaimed", inputs(), "shrink",
     lambda d: d.heap_target < 600 * MIB and 256 <= d.balloon_target_mib < 1024),
    ("never below the floor", inputs(heap_used=5 * MIB, guest_available=900 * MIB, heap_committed=10 * MIB), "shrink",
     lambda d: d.balloon_target_mib == 256),
    ("GC overhead grows to the ceiling", inputs(gc_time_delta_ms=600, balloon_actual_mib=512), "grow",
     lambda d: d.balloon_target_mib == 1024 and d.heap_target == 700 * MIB),
    ("heap used near committed grows when ballooned", inputs(heap_used=290 * MIB, heap_committed=300 * MIB,
                                                            balloon_actual_mib=500), "grow",
     lambda d: d.balloon_target_mib == 1024),
    ("guest nearly out of memory grows", inputs(guest_available=10 * MIB, balloon_actual_mib=400), "grow",
     lambda d: d.balloon_target_mib == 1024),
    ("small change is held", inputs(heap_used=500 * MIB, heap_committed=560 * MIB, guest_available=100 * MIB,
                                    balloon_actual_mib=1024), "hold", lambda d: d.balloon_target_mib == 1024),
    ("never above the ceiling", inputs(heap_used=650 * MIB, heap_committed=700 * MIB, guest_available=40 * MIB,
                                       balloon_actual_mib=1024, gc_time_delta_ms=0), "hold",
     lambda d: d.balloon_target_mib <= 1024),
]


@pytest.mark.parametrize("name,i,action,check", CASES, ids=[c[0] for c in CASES])
def test_policy_table(name, i, action, check):
    d = decide(i, S)
    assert d.action == action, d.reason
    assert check(d), d
    assert S.min_memory_mib <= d.balloon_target_mib <= S.memory_mib
    assert d.heap_target >= min(i.heap_used, i.heap_max) or d.action == "grow"


def test_host_pressure_shrinks_further():
    calm = decide(inputs(heap_used=200 * MIB), S)
    pressed = decide(inputs(heap_used=200 * MIB, host_available=1 * 1024 * MIB), S)
    assert pressed.host_pressure and not calm.host_pressure
    assert pressed.heap_target < calm.heap_target
    assert pressed.balloon_target_mib <= calm.balloon_target_mib
    psi = decide(inputs(heap_used=200 * MIB, host_psi_some_avg10=25.0), S)
    assert psi.host_pressure


def test_heap_target_keeps_headroom_above_live_heap():
    d = decide(inputs(heap_used=100 * MIB), S)
    assert d.heap_target >= 100 * MIB + S.min_headroom_mib * MIB


def test_lost_contact_deflates_and_backs_off():
    d, wait = on_lost_contact(S, 1, "the guest agent")
    assert d.action == "grow" and d.balloon_target_mib == S.memory_mib and wait == 2
    assert on_lost_contact(S, 10, "QMP")[1] == 30


def test_default_floor():
    assert default_floor_mib(1024) == 256
    assert default_floor_mib(256) == 128
    assert default_floor_mib(100) == 100


def test_manual_request_asks_hooks_then_stops_at_the_safe_floor():
    from jvmkit.balloon.policy import final_balloon_target, safe_floor_mib, with_manual_ceiling

    i = inputs(heap_used=300 * MIB, heap_committed=400 * MIB)
    settings = with_manual_ceiling(S, 100)
    assert settings.ceiling == S.min_memory_mib and settings.memory_mib == S.memory_mib
    d = decide(i, settings)
    assert d.action == "shrink"
    assert d.heap_target < 300 * MIB  # below the used heap: the shrinker hooks are asked
    assert d.heap_target >= 150 * MIB  # but never more than max_release of it at once
    # the hooks freed nothing: the guest keeps what the live heap needs
    assert final_balloon_target(d, i, S) == safe_floor_mib(i, S) > 300
    # the hooks freed most of it: the request's ceiling holds
    freed = inputs(heap_used=20 * MIB, heap_committed=40 * MIB)
    assert final_balloon_target(d, freed, S) == max(d.balloon_target_mib, safe_floor_mib(freed, S))
    assert with_manual_ceiling(S, 5000).ceiling == S.memory_mib


def test_host_pressure_asks_shrinker_hooks():
    d = decide(inputs(heap_used=200 * MIB, host_available=1 * 1024 * MIB), S)
    assert d.heap_target < 200 * MIB


def test_stale_guest_stats_never_shrink():
    d = decide(inputs(stats_fresh=False), S)
    assert d.action == "hold" and "guest stats" in d.reason
    grow = decide(inputs(stats_fresh=False, gc_time_delta_ms=600, balloon_actual_mib=512), S)
    assert grow.action == "grow"


def test_host_agent_reads_guest_stats_defensively(monkeypatch):
    """QEMU reports -1 / 2**64-1 for stats a guest does not give, and OSv gives none (last-update 0)."""
    from jvmkit.balloon import host

    replies = {"query-balloon": {"actual": 1024 * MIB}}

    class FakeQmp:  # stands in for QEMU's QMP socket, which needs a running VM
        def __init__(self, stats, updated):
            self.reply = {"stats": stats, "last-update": updated}

        def execute(self, command, **kw):
            return self.reply if command == "qom-get" else replies.get(command, {})

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    balloon = host.QmpBalloon("/nonexistent")
    balloon._polling = True
    monkeypatch.setattr(balloon, "_client", lambda: FakeQmp({"stat-total-memory": 2**64 - 1,
                                                             "stat-available-memory": 900 * MIB}, 0))
    read = balloon.read()
    assert read["total"] is None and read["available"] is None and balloon.fresh(read)
    monkeypatch.setattr(balloon, "_client", lambda: FakeQmp({"stat-total-memory": 1000 * MIB,
                                                             "stat-available-memory": -1}, 12345))
    read = balloon.read()
    assert read["total"] == 1000 * MIB and read["available"] is None


def test_after_shrink_counts_the_freed_heap_as_available():
    from jvmkit.balloon.policy import after_shrink, safe_floor_mib

    before = inputs(heap_used=5 * MIB, heap_committed=600 * MIB, guest_available=300 * MIB)
    after = after_shrink(before, 5 * MIB, 20 * MIB)
    assert after.guest_available == 880 * MIB
    # the non-heap estimate is what it was before the shrink, not inflated by the freed heap
    from jvmkit.balloon.policy import non_heap_bytes
    assert non_heap_bytes(after, S) == non_heap_bytes(before, S)
    assert safe_floor_mib(after, S) < safe_floor_mib(before, S) + 1


def test_heap_rising_grows_at_once():
    d = decide(inputs(heap_used=200 * MIB, heap_committed=300 * MIB, balloon_actual_mib=400,
                      heap_used_prev=20 * MIB), S)
    assert d.action == "grow" and "rising" in d.reason and d.balloon_target_mib == 1024
    calm = decide(inputs(heap_used=25 * MIB, heap_committed=300 * MIB, balloon_actual_mib=400,
                         heap_used_prev=20 * MIB), S)
    assert calm.action != "grow"


def test_final_target_never_takes_committed_heap():
    """The GC could not uncommit as far as asked: the balloon must leave room for what is committed."""
    from jvmkit.balloon.policy import after_shrink, final_balloon_target, kernel_reserved_bytes, non_heap_bytes

    before = inputs(heap_used=200 * MIB, heap_committed=424 * MIB, guest_available=425 * MIB)
    d = decide(before, S)
    after = after_shrink(before, 200 * MIB, 420 * MIB)  # barely uncommitted anything
    target = final_balloon_target(d, after, S)
    need = (kernel_reserved_bytes(after, S) + non_heap_bytes(after, S) + 420 * MIB) / MIB
    assert target >= need
