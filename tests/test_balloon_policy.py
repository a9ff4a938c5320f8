"""The balloon policy as a table: sensor readings in, decisions out (pure, no VM)."""

import json
import os
import subprocess
import sys

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
    d = decide(i, settings, request=True)
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


def test_a_guest_that_cannot_deflate_on_oom_keeps_room_for_its_whole_heap():
    """OSv's balloon driver does not give pages back when the guest runs out (an OSv guest stalled
    or hung regrowing its heap under a squeezed balloon): every floor holds the heap's max."""
    from dataclasses import replace

    from jvmkit.balloon.policy import floor_for, guest_need, squeeze_floor_mib, with_manual_ceiling

    idle = inputs(heap_used=5 * MIB, heap_committed=10 * MIB, guest_available=900 * MIB)
    osv = replace(S, deflate_on_oom=False)
    need = guest_need(idle, osv)
    assert need.to_heap_max and need.heap_live_mib + need.headroom_mib == 700
    assert "to the heap's max" in need.describe()
    assert floor_for(idle, osv).mib >= 700 + need.non_heap_mib + need.reserve_mib
    assert squeeze_floor_mib(idle, osv) == floor_for(idle, osv).mib
    assert decide(idle, osv).balloon_target_mib >= floor_for(idle, osv).mib
    request = with_manual_ceiling(osv, 100)
    assert decide(idle, request, request=True).balloon_target_mib >= floor_for(idle, osv).mib
    # Its first reading, taken while committed heap was still untouched, says 0M besides the heap:
    # the generous share holds until a settled reading is seen.
    from jvmkit.balloon.policy import non_heap_bytes, non_heap_reading

    first = inputs(heap_used=270 * MIB, heap_committed=483 * MIB, guest_available=517 * MIB)
    assert non_heap_reading(first, osv) == 0
    assert non_heap_bytes(first, osv) == 192 * MIB and non_heap_bytes(first, S) == 0
    assert non_heap_bytes(replace(first, non_heap_seen=101 * MIB), osv) == 101 * MIB
    # Before any reading the floor is what a fleet admits such a VM at.
    from jvmkit.balloon.policy import unmeasured_floor_mib

    unread = inputs(heap_used=0, heap_committed=0, guest_total=None, guest_available=None)
    assert guest_need(unread, osv).total_mib == unmeasured_floor_mib(700, osv) == 700 + 192 + 48
    # With deflate-on-OOM (Linux) the same idle guest goes down to its floor of 256M.
    assert not guest_need(idle, S).to_heap_max and decide(idle, S).balloon_target_mib == 256

# ---- `balloon set`: the floor, the low-memory mark, growth above the ceiling -----------------------
#
# The guest below is laid out like the 1 GiB `--balloon` guest of issue 13: MemTotal 1000 MiB
# (24 MiB kept by the kernel), 144 MiB used besides the heap (runtime files in RAM, metaspace,
# threads), so "guest non-heap" is 168 MiB; balloon deflated (1024 MiB).

def guest(heap_used_mib, heap_committed_mib, *, actual=1024, non_heap_mib=144, **kw):
    """Inputs whose guest stats add up: available = what the balloon leaves - non-heap - committed."""
    available = 1000 - (1024 - actual) - non_heap_mib - heap_committed_mib
    assert available >= 0, "inconsistent row"
    return inputs(heap_used=heap_used_mib * MIB, heap_committed=heap_committed_mib * MIB,
                  balloon_actual_mib=actual, guest_available=available * MIB, **kw)


SET_CASES = [
    # name, settings, inputs before, heap (used, committed) after the shrink, SIZE asked,
    #   target expected, stopped_by expected, text the answer must hold
    ("floor from the guest's stats, above --min-memory", S, guest(180, 600), (180, 200), 100,
     428, "guest", "stopped at 428M: live heap 180M + headroom 32M + guest non-heap 168M + reserve 48M; "
                   "--min-memory is 256M"),
    # at 256M this guest would have 18 MiB available, under the 24 MiB low mark (the case)
    ("a 256M ceiling under the low mark is refused", S, guest(60, 300), (60, 70), 100,
     308, "guest", "live heap 60M + headroom 32M + guest non-heap 168M"),
    ("--min-memory above what the guest needs", Settings(memory_mib=1024, min_memory_mib=400),
     guest(20, 300, non_heap_mib=60), (20, 30), 100,
     400, "min-memory", "stopped at 400M: --min-memory; the guest needs 184M"),
    ("the committed heap the GC kept counts", S, guest(100, 600), (100, 300), 100,
     516, "guest", "live heap 100M + headroom 200M"),
    ("no guest stats: non-heap assumed", S, inputs(heap_used=100 * MIB, heap_committed=500 * MIB,
                                                   guest_total=None, guest_available=None), (100, 120), 100,
     372, "guest", "guest non-heap 192M (assumed"),
    ("the guest needs all of --memory", Settings(memory_mib=512, min_memory_mib=128),
     inputs(heap_used=350 * MIB, heap_committed=400 * MIB, balloon_actual_mib=512, guest_total=490 * MIB,
            guest_available=30 * MIB), (350, 400), 100,
     512, "memory", "stopped at 512M: all of --memory"),
    # asked more than it needs: the guest gets what it needs (heap target + non-heap + reserve)
    ("a request above the need is not a floor", S, guest(180, 600), (180, 200), 600,
     24 + 144 + 225 + 48, None, ""),
]


@pytest.mark.parametrize("name,s,before,after_heap,asked,target,by,text", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_set_stops_at_the_floor_and_says_why(name, s, before, after_heap, asked, target, by, text):
    from jvmkit.balloon.policy import after_shrink, final_balloon_target, floor_for, set_outcome, with_manual_ceiling

    settings = with_manual_ceiling(s, asked)
    d = decide(before, settings, request=True)
    after = after_shrink(before, after_heap[0] * MIB, after_heap[1] * MIB) if d.action == "shrink" else before
    got = final_balloon_target(d, after, settings)
    answer = set_outcome(asked, got, floor_for(after, settings), d)
    assert (got, answer["stopped_by"]) == (target, by), answer
    assert text in answer["why"], answer["why"]
    assert answer["floor_limited"] == (by is not None)
    assert answer["floor"]["min_memory_mib"] == s.min_memory_mib and answer["floor"]["floor_by"] in (
        "guest", "min-memory", "memory")


@pytest.mark.parametrize("asked", [64, 100, 200, 256, 300, 400])
@pytest.mark.parametrize("heap", [(5, 20), (60, 70), (180, 200), (300, 400)])
def test_set_never_leaves_the_guest_under_its_low_mark(asked, heap):
    """Whatever is asked, the target applied after the shrink leaves the guest above its low mark."""
    from jvmkit.balloon.policy import after_shrink, final_balloon_target, projected_available_mib, with_manual_ceiling

    before = guest(heap[0], 600)
    settings = with_manual_ceiling(S, asked)
    d = decide(before, settings, request=True)
    after = after_shrink(before, heap[0] * MIB, heap[1] * MIB)
    target = final_balloon_target(d, after, settings)
    assert projected_available_mib(after, target) >= 2 * S.guest_low_available_mib, (target, d)


GROWTH_CASES = [
    # name, inputs (under a `balloon set 100M` ceiling of 256M), action, check
    ("guest low at the set ceiling gets memory back above it", guest(60, 70, actual=256, non_heap_mib=147),
     "grow", lambda d, i: d.balloon_target_mib > 256 and d.numbers["above_set_ceiling"]
     and d.balloon_target_mib - i.balloon_actual_mib + i.guest_available / MIB >= 2 * S.guest_low_available_mib),
    ("heap rising above the set ceiling grows, not shrinks", guest(100, 110, actual=320, heap_used_prev=50 * MIB),
     "grow", lambda d, i: d.balloon_target_mib > 320 and "rising" in d.reason and "balloon set" in d.reason),
    ("slow growth at the set ceiling gets what the live heap needs", guest(50, 60, actual=256, heap_used_prev=45 * MIB),
     "grow", lambda d, i: d.balloon_target_mib == 50 + 32 + 168 + 48 and "balloon set" in d.reason),
    ("heap used near committed at the set ceiling grows above it", guest(58, 60, actual=256, heap_used_prev=56 * MIB),
     "grow", lambda d, i: d.balloon_target_mib > 256),
    ("after a set, later rounds never squeeze below the live heap", guest(300, 400, actual=800),
     "shrink", lambda d, i: d.heap_target >= 300 * MIB and d.balloon_target_mib >= 300 + 32 + 168 + 48),
    ("an idle guest still gives memory back down to the set ceiling", guest(5, 400, actual=800),
     "shrink", lambda d, i: d.balloon_target_mib == 256 and not d.numbers["above_set_ceiling"]),
]


@pytest.mark.parametrize("name,i,action,check", GROWTH_CASES, ids=[c[0] for c in GROWTH_CASES])
def test_growth_after_a_set_goes_above_the_ceiling(name, i, action, check):
    from jvmkit.balloon.policy import with_manual_ceiling

    settings = with_manual_ceiling(S, 100)
    assert settings.ceiling == 256
    d = decide(i, settings)
    assert d.action == action, d.reason
    assert check(d, i), d
    assert d.balloon_target_mib <= S.memory_mib


def test_guest_low_with_nothing_left_to_give_holds():
    """Fully deflated and still low: a 'deflate to the ceiling' every round could not act (issue 13)."""
    d = decide(inputs(guest_available=10 * MIB, balloon_actual_mib=1024), S)
    assert d.action == "hold" and "all of --memory" in d.reason


def test_set_answer_waits_for_fresh_stats():
    from jvmkit.balloon.policy import with_manual_ceiling

    d = decide(guest(180, 600, stats_fresh=False), with_manual_ceiling(S, 100), request=True)
    assert d.action == "hold" and d.stale_stats


# ---- `balloon status` rows and `balloon set` on a VM without the agent --------------------------------

def test_status_row_without_agent_says_so():
    from jvmkit.balloon.control import NO_AGENT, status_row

    row = status_row("plain", {"memory_mib": 1024, "jmx": None}, None, 1024 * MIB)
    assert not row["controlled"] and row["note"] == NO_AGENT and row["guest_mib"] is None


def test_status_row_names_guest_memory_and_balloon_and_growth_above_the_ceiling():
    from jvmkit.balloon.control import status_row

    last = {"event": "decision", "action": "grow", "reason": "heap use rising fast: above the 256M ceiling",
            "balloon_target_mib": 354, "set_ceiling_mib": 256, "achieved": {"balloon_target_mib": 354},
            "numbers": {"heap_used_mib": 100.0, "heap_committed_mib": 110.0, "set_ceiling_mib": 256}}
    row = status_row("vm", {"memory_mib": 1024, "balloon": {"floor_mib": 256}}, {"last": last}, 354 * MIB)
    assert row["guest_mib"] == 354 and row["balloon_mib"] == 1024 - 354
    assert row["above_set_ceiling"] and "above the 256M set by `balloon set`" in row["note"]
    calm = dict(last, set_ceiling_mib=None, numbers={"heap_used_mib": 5.0})
    assert not status_row("vm", {"memory_mib": 1024, "balloon": {"floor_mib": 256}}, {"last": calm},
                          300 * MIB)["above_set_ceiling"]


@pytest.fixture
def fake_runs(tmp_path, monkeypatch):
    """Run directories as `jvmkit run` writes them, for VMs that are not really there (the real
    thing is in test_balloon_vm.py): this process's pid stands in for QEMU's so they count as
    running; QMP is absent, so the guest memory reads as unknown."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    root = tmp_path / "jvmkit"

    def make(name, *, balloon, status=None):
        path = root / name
        path.mkdir(parents=True, mode=0o700)
        state = {"name": name, "qemu_pid": os.getpid(), "jvmkit_pid": os.getpid(), "memory_mib": 1024,
                 "qmp": str(path / "qmp.sock"), "jmx": {"host": "127.0.0.1", "port": 1} if balloon else None}
        if balloon:
            state["balloon"] = {"floor_mib": 256, "ceiling_mib": 1024, "interval": 2.0}
        (path / "state.json").write_text(json.dumps(state))
        if status:
            (path / "balloon.json").write_text(json.dumps(status))
        return name

    return make


def jvmkit_cli(*args):
    return subprocess.run([sys.executable, "-m", "jvmkit", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_set_without_agent_is_one_line_and_fails(fake_runs):
    name = fake_runs("plain-vm", balloon=False)
    proc = jvmkit_cli("balloon", "set", name, "100M")
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no balloon agent" in proc.stderr and "--balloon" in proc.stderr


def test_status_columns_agree_with_json(fake_runs):
    last = {"event": "decision", "action": "hold", "reason": "change of +3 MiB is below the hysteresis (32 MiB)",
            "balloon_target_mib": 400, "numbers": {"heap_used_mib": 120.0, "heap_committed_mib": 150.0}}
    fake_runs("agent-vm", balloon=True, status={"last": last})
    fake_runs("plain-vm", balloon=False)
    human = jvmkit_cli("balloon", "status")
    assert human.returncode == 0, human.stderr
    header, *lines = human.stdout.splitlines()
    assert "GUEST MEM" in header and "BALLOON" in header
    plain = next(line for line in lines if line.startswith("plain-vm"))
    assert plain.split() == ["plain-vm", "1024M", "no", "balloon", "agent", "(started", "without", "--balloon)"]
    agent = next(line for line in lines if line.startswith("agent-vm")).split()
    assert agent[:6] == ["agent-vm", "1024M", "-", "-", "120M", "150M"], agent  # QMP is absent here
    rows = {r["name"]: r for r in json.loads(jvmkit_cli("balloon", "status", "--json").stdout)["vms"]}
    assert {"guest_mib", "balloon_mib"} <= set(rows["agent-vm"]) and rows["agent-vm"]["heap_used_mib"] == 120.0
    assert rows["plain-vm"]["controlled"] is False and "no balloon agent" in rows["plain-vm"]["note"]
