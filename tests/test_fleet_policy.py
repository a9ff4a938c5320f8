"""The host-wide balloon policy as tables: every VM's readings and the budget in, targets out (pure)."""

from dataclasses import replace

import pytest

from jvmkit.balloon import policy
from jvmkit.balloon.policy import MIB, Inputs, Settings
from jvmkit.fleet.fleet_policy import FREE, QUIET_S, VmView, decide, proportional, water_fill

# Every guest below is laid out like the 1 GiB linux guests of the cache-service fleet: MemTotal
# 24 MiB under --memory (kept by the kernel) and `non_heap` MiB used besides the heap (runtime
# files in RAM, metaspace, threads), so its squeeze floor is live heap + max(32M, 10%) + non-heap
# + 24M + the 48M reserve (or --min-memory).


def reading(used, committed, actual=1024, *, memory=1024, non_heap=144, gc_ms=0, prev=None, fresh=True):
    total = memory - 24
    available = total - (memory - actual) - non_heap - committed
    assert available >= 0, "inconsistent row"
    return Inputs(heap_used=used * MIB, heap_committed=committed * MIB, heap_max=700 * MIB, gc_time_delta_ms=gc_ms,
                  interval_s=1.0, balloon_actual_mib=actual, guest_total=total * MIB, guest_available=available * MIB,
                  host_total=24 * 1024 * MIB, host_available=20 * 1024 * MIB, host_psi_some_avg10=0.0,
                  stats_fresh=fresh, heap_used_prev=None if prev is None else prev * MIB)


def vm(name, used, committed, actual=1024, *, weight=1, memory=1024, min_memory=256, overhead=0, **kw):
    return VmView(name, Settings(memory_mib=memory, min_memory_mib=min_memory), reading(used, committed, actual,
                  memory=memory, **kw), weight=weight, overhead_mib=overhead)


def floor_of(v: VmView) -> int:
    return policy.squeeze_floor_mib(v.inputs, v.settings)


def busy(name, actual, **kw):
    """A VM under heap pressure: 30% of the last second in GC, heap used near committed."""
    return vm(name, 190, 200, actual, gc_ms=300, **kw)


def tried(v: VmView) -> VmView:
    """The VM's hooks were asked lately and gave nothing."""
    return replace(v, hooks_tried=True)


def counted(d) -> int:
    """What the targets add up to now (each VM at the larger of what it has and its step)."""
    return d.fixed_mib + sum(t.counted_mib for t in d.targets if t.decision is not None)


# ---- the table ----------------------------------------------------------------------------------

CASES = [
    # name, budget, VMs, check(decision)
    ("plenty of budget: each VM does what it would alone", 8192,
     [vm("a", 100, 600), busy("b", 600), vm("c", 400, 420, 700)],
     lambda d, vms: all(d.get(v.name).decision == policy.decide(v.inputs, v.settings) for v in vms)
     and not d.moves or all(m.giver in (FREE, "a") for m in d.moves)),
    ("heap pressure is served first, from the VM with the most idle headroom", 2600,
     [busy("hot", 500), vm("big", 60, 600, 1024), vm("small", 200, 230, 560)],
     lambda d, vms: d.get("hot").allot_mib == d.get("hot").want_mib
     and (1024 - d.get("big").allot_mib) > (560 - d.get("small").allot_mib)
     and any(m.giver == "big" and m.taker == "hot" for m in d.moves)),
    # idle at 1000M, each would keep 716M alone (heap target 500M) above a floor of 656M; the busy
    # VM grows by half again (to 750M, 312M above its floor); then 40M are left for the two
    ("a heavier idle VM keeps more of its headroom", 438 + 312 + 2 * 656 + 40,
     [busy("hot", 500), vm("light", 400, 460, 1000, weight=1), vm("heavy", 400, 460, 1000, weight=3)],
     lambda d, vms: d.get("light").role == d.get("heavy").role == "squeezed"
     and (d.get("heavy").allot_mib - d.get("heavy").floor_mib) == 30
     and (d.get("light").allot_mib - d.get("light").floor_mib) == 10),
    ("growth is shared by weight when the budget cannot serve all", 2 * 438 + 268 + 120,
     [busy("w1", 400, weight=1), busy("w2", 400, weight=2), vm("idle", 20, 40, 300)],
     lambda d, vms: d.get("w2").allot_mib - d.get("w2").floor_mib
     == pytest.approx(2 * (d.get("w1").allot_mib - d.get("w1").floor_mib), abs=2)),
    ("short budget: the hooks of idle VMs at their floor are asked before growth is denied", 1300,
     [busy("hot", 500), vm("c1", 120, 140, 420), vm("c2", 120, 140, 420)],
     lambda d, vms: set(d.hooks_asked) == {"c1", "c2"} and d.get("hot").role == "waiting-hooks"
     and all(d.get(n).role == "release" and d.get(n).decision.action == "shrink" for n in ("c1", "c2"))
     and "shrinker hooks" in d.get("c1").reason and "hot" in d.get("c1").reason),
    ("hooks already tried: growth is denied, and it says why", 1300,
     [busy("hot", 500), tried(vm("c1", 120, 140, 420)), tried(vm("c2", 120, 140, 420))],
     lambda d, vms: d.get("hot").role == "denied" and "growth denied" in d.get("hot").reason
     and not d.hooks_asked and d.short_mib > 0),
    ("a VM without the agent counts at its --memory, a booting one at its --min-memory", 3000,
     [VmView("plain", Settings(1024, 256), managed=False), VmView("booting", Settings(1024, 300)),
      vm("a", 100, 600)],
     lambda d, vms: d.fixed_mib == 1024 + 300 and d.get("plain").decision is None
     and d.get("booting").role == "waiting" and d.get("a").allot_mib <= 3000 - 1324),
    ("QEMU's overhead counts for every VM", 2000,
     [vm("a", 60, 600, overhead=200), vm("b", 60, 600, overhead=200)],
     lambda d, vms: d.fixed_mib == 400 and d.allotted_mib <= 2000),
    ("stale guest stats hold the VM where it is", 1200,
     [vm("settling", 60, 100, 500, fresh=False), busy("hot", 500)],
     lambda d, vms: d.get("settling").role == "settling" and d.get("settling").decision.action == "hold"
     and d.get("settling").decision.balloon_target_mib == 500),
    ("floors over the budget: nobody below its floor, hooks asked", 700,
     [vm("a", 150, 200, 400), vm("b", 150, 200, 400)],
     lambda d, vms: set(d.hooks_asked) == {"a", "b"} and "96M under what the floors need" in d.get("a").reason),
]


@pytest.mark.parametrize("name,budget,vms,check", CASES, ids=[c[0] for c in CASES])
def test_fleet_table(name, budget, vms, check):
    d = decide(vms, budget)
    assert check(d, vms), d.summary + "\n" + "\n".join(f"{t.name} {t.role} {t.reason}" for t in d.targets)
    for t in d.targets:
        if t.decision is None:
            continue
        s = next(v for v in vms if v.name == t.name).settings
        assert t.decision.balloon_target_mib <= s.memory_mib
        if t.role != "release":  # floors are never crossed (hooks first free the heap that sets them)
            assert t.decision.balloon_target_mib >= min(t.floor_mib, t.actual_mib), (t.name, t.reason)
    # never more counted than the budget, unless the floors alone are over it
    assert counted(d) <= max(budget, d.floors_mib, sum(t.actual_mib for t in d.targets) + d.fixed_mib)


def test_targets_never_add_up_to_more_than_the_budget_in_a_tight_fleet():
    vms = [busy("hot", 450), vm("a", 60, 600, 1000), vm("b", 100, 300, 900), vm("c", 30, 50, 600)]
    budget = sum(v.inputs.balloon_actual_mib for v in vms)  # full: nothing free now
    d = decide(vms, budget)
    hot = d.get("hot")
    assert hot.allot_mib > hot.actual_mib
    assert hot.decision.balloon_target_mib == hot.actual_mib, "grows only into memory that is free now"
    assert "more as" in hot.reason  # says the rest follows as the givers shrink
    assert counted(d) <= budget
    # once the givers have shrunk, the grower gets the rest
    after = [v if v.name == "hot" else vm(v.name, v.inputs.heap_used // MIB, v.inputs.heap_used // MIB + 40,
                                          d.get(v.name).decision.balloon_target_mib) for v in vms]
    d2 = decide(after, budget)
    assert d2.get("hot").decision.balloon_target_mib > hot.actual_mib
    assert counted(d2) <= budget


def test_every_move_names_giver_and_taker_and_why():
    vms = [busy("hot", 500), vm("big", 60, 600, 1024), vm("small", 200, 230, 560)]
    d = decide(vms, 2600)
    between = [m for m in d.moves if FREE not in (m.giver, m.taker)]
    assert between, d.summary
    for m in between:
        assert m.taker == "hot" and "GC overhead" in m.why
        assert "to hot (GC overhead" in d.get(m.giver).reason, d.get(m.giver).reason
        assert f"from {m.giver}" in d.get("hot").reason or "more as" in d.get("hot").reason
        assert m.describe() in d.summary


def test_a_lone_vm_with_room_behaves_as_the_per_vm_policy():
    """`jvmkit run --balloon` alone on a host: the brain's targets are policy.decide's."""
    for i in (reading(50, 600), reading(290, 300, 500), reading(500, 560, 1024, gc_ms=0), reading(10, 20, 300)):
        v = VmView("solo", Settings(1024, 256), i)
        assert decide([v], 20000).get("solo").decision == policy.decide(i, v.settings)


def test_a_request_is_answered_as_alone():
    s = policy.with_manual_ceiling(Settings(1024, 256), 300)
    v = VmView("set", s, reading(180, 600), request=True)
    assert decide([v], 20000).get("set").decision == policy.decide(v.inputs, s, request=True)


def test_squeezed_vm_keeps_its_live_heap_and_headroom():
    vms = [busy("hot", 400), vm("idle", 200, 600, 1024)]  # floors 438M and 448M; idle wants 466M
    d = decide(vms, 438 + 162 + 455)  # the busy VM grows by half again: 600M
    idle = d.get("idle")
    assert idle.role == "squeezed" and idle.decision.action == "shrink"
    assert idle.decision.heap_target >= 200 * MIB + 32 * MIB
    assert idle.decision.balloon_target_mib >= idle.floor_mib


def test_release_asks_hooks_for_the_shortfall_shared_by_heap_and_weight():
    vms = [busy("hot", 450), vm("c1", 200, 250, 500, weight=1), vm("c2", 100, 120, 400, weight=1)]
    d = decide(vms, sum(floor_of(v) for v in vms[1:]) + 460)
    asked = {n: d.get(n).decision.numbers["hooks_asked_mib"] for n in d.hooks_asked}
    assert set(asked) == {"c1", "c2"} and asked["c1"] > asked["c2"]
    for n, ask in asked.items():
        t = d.get(n)
        assert t.decision.heap_target == (200 if n == "c1" else 100) * MIB - ask * MIB
        assert ask <= (200 if n == "c1" else 100) * 0.5 + 1  # never more than max_release of the live heap


# ---- sharing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("requests,weights,amount,expected", [
    ({"a": 100, "b": 100}, {}, 300, {"a": 100, "b": 100}),
    ({"a": 100, "b": 100}, {}, 100, {"a": 50, "b": 50}),
    ({"a": 100, "b": 100}, {"a": 1, "b": 3}, 100, {"a": 25, "b": 75}),
    ({"a": 10, "b": 100}, {}, 60, {"a": 10, "b": 50}),
    ({"a": 10, "b": 100}, {}, 0, {"a": 0, "b": 0}),
    ({"a": 0, "b": 40}, {}, 20, {"a": 0, "b": 20}),
])
def test_water_fill(requests, weights, amount, expected):
    assert water_fill(requests, weights, amount) == expected


def test_proportional_respects_caps():
    assert proportional({"a": 10, "b": 100}, {"a": 1.0, "b": 1.0}, 60) == {"a": 10, "b": 50}
    assert proportional({"a": 10, "b": 100}, {"a": 1.0, "b": 1.0}, 500) == {"a": 10, "b": 100}
    assert proportional({"a": 50, "b": 50}, {"a": 3.0, "b": 1.0}, 40) == {"a": 30, "b": 10}


def test_decision_serialises():
    import json

    d = decide([busy("hot", 500), vm("big", 60, 600, 1024)], 1500)
    doc = json.loads(json.dumps(d.to_dict()))
    assert {t["name"] for t in doc["targets"]} == {"hot", "big"} and doc["budget_mib"] == 1500


def test_a_vm_content_below_its_computed_floor_is_left_alone():
    """Its need grew by 2M since the last shrink: below the hysteresis, no creeping up 2M a step."""
    v = vm("a", 3, 17, 275, non_heap=170)  # floor: 3M + 32M + 194M + 48M = 277M
    t = decide([v], 3000).get("a")
    assert t.decision.action == "hold" and t.decision.balloon_target_mib == 275, t.reason


def test_with_room_a_busy_vm_deflates_to_its_ceiling_and_when_short_grows_in_steps():
    roomy = decide([busy("hot", 400), vm("idle", 20, 40, 300)], 4000).get("hot")
    assert roomy.decision.balloon_target_mib == 1024
    tight = decide([busy("hot", 400), vm("idle", 20, 40, 300)], 1100).get("hot")
    assert tight.want_mib == 600 and tight.decision.balloon_target_mib <= 600


# ---- what the controllers remember for policy.decide (jvmkit.balloon.host) -----------------------

class ScriptedAgent:
    """Stands in for the guest agent's JMX client in Controller tests (no guest here: the VM tests
    run the real one). `freed` is what a shrink's collection leaves: (used, committed) MiB, or
    None when the heap does not give."""

    def __init__(self, used_mib: int, committed_mib: int, freed: tuple[int, int] | None = None):
        self.used, self.committed, self.freed, self.shrinks = used_mib * MIB, committed_mib * MIB, freed, 0

    def balloon_stats(self):
        from types import SimpleNamespace

        return SimpleNamespace(heap_used=self.used, heap_committed=self.committed, heap_max=700 * MIB,
                               gc_time_millis=0)

    def guest_memory(self):
        return None  # as a JVM that reports no guest memory

    def shrink_to(self, target):
        self.shrinks += 1
        if self.freed:
            self.used, self.committed = self.freed[0] * MIB, self.freed[1] * MIB
        return self.committed

    def close(self):
        pass


@pytest.fixture(autouse=True)
def calm_host(monkeypatch):
    """The Controller tests below read the host's memory in each step: this host's own (a busy
    machine's PSI once made a shrink of the held-at-its-floor test a host-pressure one) is replaced
    by a calm host with 20 of 24 GiB available."""
    from jvmkit.balloon import host

    monkeypatch.setattr(host, "read_host_memory", lambda *a, **k: {
        "total": 24 * 1024 * MIB, "available": 20 * 1024 * MIB, "psi_some_avg10": 0.0})


def scripted_controller(tmp_path, agent, device):
    from jvmkit.balloon.host import Controller

    controller = Controller("t", tmp_path, tmp_path / "none.sock", {}, Settings(1024, 256), device=device)
    controller.client = agent
    return controller


def test_non_heap_never_reads_below_what_was_seen():
    """Committed but untouched heap reads as free in the guest: the non-heap estimate falls
    (51M instead of ~200M measured after a cache fill) unless the most seen is kept."""
    s = Settings(1024, 256)
    low = reading(130, 520, 784, non_heap=40)
    assert policy.non_heap_bytes(low, s) == (24 + 40 - 24) * MIB  # what the stats alone say
    kept = replace(low, non_heap_seen=200 * MIB)
    assert policy.non_heap_bytes(kept, s) == 200 * MIB
    assert policy.squeeze_floor_mib(kept, s) > policy.squeeze_floor_mib(low, s) + 150


def test_a_reading_taken_while_the_heap_moved_does_not_raise_the_non_heap_estimate():
    """Guest stats polled before an uncommit still count the freed heap as used: guest used minus
    the new committed size spiked (271M against a steady 124M on a libvirt domain) and, kept as the
    most seen, held the balloon's floor 150M high for good."""
    s = Settings(1024, 256)
    spiked = replace(reading(3, 40, 772, non_heap=271), non_heap_seen=124 * MIB, heap_settled=False)
    assert policy.non_heap_bytes(spiked, s) == 124 * MIB
    assert policy.non_heap_bytes(replace(spiked, heap_settled=True), s) == 271 * MIB  # settled: a real growth
    assert policy.non_heap_bytes(replace(spiked, non_heap_seen=None), s) == 271 * MIB  # nothing better known
    low = replace(reading(130, 520, 784, non_heap=40), non_heap_seen=200 * MIB, heap_settled=False)
    assert policy.non_heap_bytes(low, s) == 200 * MIB  # after a growth it reads low: the most seen stands


def test_the_controller_keeps_non_heap_only_from_stats_taken_after_the_heap_moved(tmp_path):
    """jvmkit.balloon.host.Controller's bookkeeping with a scripted agent and balloon device (no
    guest here: the VM tests run the real ones)."""
    import time as _time

    from jvmkit.balloon.host import BalloonDevice

    class Device(BalloonDevice):
        def __init__(self):
            self.stats = {}

        def read(self):
            return self.stats

        def set(self, target_bytes):
            self.changed_at = 0.0  # keep the scripted stats fresh

    device, agent = Device(), ScriptedAgent(100, 520)
    controller = scripted_controller(tmp_path, agent, device)

    def step(non_heap, updated):
        total = 1000 * MIB
        device.stats = {"actual": 1024 * MIB, "updated": updated, "total": total,
                        "available": total - non_heap * MIB - agent.committed, "free": None}
        controller.step()

    step(120, _time.time() + 10)   # stats newer than the heap's last move: kept
    assert controller.non_heap_seen == 120 * MIB
    agent.committed = 40 * MIB     # the heap uncommitted 480M; the stats below predate that
    step(120 + 480, _time.time() - 1)
    assert controller.non_heap_seen == 120 * MIB
    step(150, _time.time() + 10)   # settled again: a real growth counts
    assert controller.non_heap_seen == 150 * MIB


def test_the_jvms_reading_fills_in_only_where_the_balloon_reports_no_guest_memory():
    from jvmkit.balloon.host import with_jvm_memory

    stats = {"actual": 1024 * MIB, "updated": 5.0, "total": 1000 * MIB, "available": 700 * MIB, "free": None}
    assert with_jvm_memory(stats, (2000 * MIB, 10 * MIB), now=9.0) is stats   # the balloon's own stats win
    bare = {"actual": 900 * MIB, "updated": 0, "total": None, "available": None, "free": None}
    assert with_jvm_memory(bare, None, now=9.0) is bare                         # the JVM says nothing
    filled = with_jvm_memory(bare, (1000 * MIB, 300 * MIB), now=9.0)
    assert filled == {"actual": 900 * MIB, "updated": 9.0, "total": 1000 * MIB, "available": 300 * MIB,
                      "free": 300 * MIB, "source": "jvm"}
    assert bare["total"] is None  # not changed in place


def test_a_guest_without_balloon_stats_is_steered_by_what_its_jvm_reads(tmp_path):
    """An OSv guest: its virtio-balloon has no stats queue, so the guest's memory comes from its
    JVM (OperatingSystem MXBean) and the non-heap estimate is measured, not the 192M guess."""
    import time as _time

    from jvmkit.balloon.host import BalloonDevice

    class Device(BalloonDevice):
        actual = 1024 * MIB

        def read(self):
            return {"actual": self.actual, "updated": 0, "total": None, "available": None, "free": None}

        def set(self, target_bytes):
            self.actual = target_bytes  # the guest gives the pages at once; changed_at stays 0

    device, agent = Device(), ScriptedAgent(100, 200)
    free = {"mib": 1000 - 80 - 200}      # OSv itself and the JVM's non-heap: 80M; the heap: 200M
    agent.guest_memory = lambda: (1000 * MIB, free["mib"] * MIB)
    controller = scripted_controller(tmp_path, agent, device)
    controller.committed_at = (agent.committed, _time.time() - 60)  # the heap has not moved for a minute
    controller.step()
    assert controller.non_heap_seen == 80 * MIB
    # Without the JVM's reading the policy falls back to its guess.
    guessing = scripted_controller(tmp_path, ScriptedAgent(100, 200), Device())
    guessing.committed_at = (200 * MIB, _time.time() - 60)
    guessing.step()
    assert guessing.non_heap_seen is None
    assert policy.non_heap_bytes(replace(reading(100, 200), guest_total=None, guest_available=None),
                                 guessing.settings) == 192 * MIB


def test_a_shrink_that_stopped_at_its_floor_is_not_retried_while_the_heap_is_unchanged():
    s = Settings(1024, 256)
    i = reading(127, 212, 482, non_heap=198)
    assert policy.decide(i, s).action == "shrink"  # wants 428M; the committed heap keeps it at 482M
    again = policy.decide(replace(i, shrink_floor_mib=482), s)
    assert again.action == "hold" and again.balloon_target_mib == 482, again.reason
    assert policy.decide(replace(i, shrink_floor_mib=482), s, request=True).action == "shrink"


def test_a_shrink_held_at_its_floor_is_tried_again_later(tmp_path, monkeypatch):
    """An idle app's dropped objects count as used until a GC, and only a shrink runs one: a
    shrink that stopped at its floor is not retried while the heap is unchanged, but only for
    SHRINK_RETRY_S (then again, backing off). Scripted agent and device, as above."""
    from jvmkit.balloon import host
    from jvmkit.balloon.host import BalloonDevice

    class Device(BalloonDevice):
        actual = 1024 * MIB

        def read(self):
            total = 1000 * MIB
            return {"actual": self.actual, "updated": 2e9, "total": total,
                    "available": total - (1024 * MIB - self.actual) - 150 * MIB - 520 * MIB, "free": None}

        def set(self, target_bytes):
            self.actual = target_bytes

    agent = ScriptedAgent(400, 520)  # the heap does not give: 520 MiB stay committed whatever the shrink asks
    controller = scripted_controller(tmp_path, agent, Device())
    monkeypatch.setattr(host, "SHRINK_RETRY_S", 1000.0)
    controller.step()
    assert agent.shrinks == 1 and controller.shrink_stop is not None  # stopped at the committed heap
    controller.step()
    controller.step()
    assert agent.shrinks == 1, [d["action"] for d in controller.decisions]  # held, no GC each step
    floor, used, committed, _ = controller.shrink_stop
    controller.shrink_stop = (floor, used, committed, 0.0)  # the retry time has come
    controller.step()
    assert agent.shrinks == 2 and controller.shrink_backoff == 1, [(d["action"], d.get("reason")) for d in controller.decisions]


def test_a_recheck_that_finds_garbage_lets_the_next_step_shrink(tmp_path, monkeypatch):
    """The re-check's collection frees what the app dropped: no new hold, the next step shrinks
    the guest to the live heap."""
    from jvmkit.balloon import host
    from jvmkit.balloon.host import BalloonDevice

    class Device(BalloonDevice):
        actual = 742 * MIB

        def read(self):
            total = 1000 * MIB
            return {"actual": self.actual, "updated": 2e9, "total": total,
                    "available": total - (1024 * MIB - self.actual) - 150 * MIB - agent.committed, "free": None}

        def set(self, target_bytes):
            self.actual = target_bytes

    agent = ScriptedAgent(400, 520, freed=(5, 40))  # the dropped objects were garbage
    controller = scripted_controller(tmp_path, agent, Device())
    monkeypatch.setattr(host, "SHRINK_RETRY_S", 1000.0)
    controller.shrink_stop = (742, agent.used, agent.committed, 0.0)  # held at 742M; the retry time has come
    controller.step()
    assert controller.decisions[-1]["action"] == "shrink" and controller.shrink_stop is None
    controller.step()
    assert controller.decisions[-1]["action"] == "shrink", controller.decisions[-1]["reason"]
    assert controller.balloon.actual < 400 * MIB


# ---- a VM waiting for admission (`jvmkit up`) ----------------------------------------------------

def idle_pair():
    a, b = vm("a", 120, 140, 600), vm("b", 120, 140, 600)
    return [a, b], floor_of(a) + floor_of(b)


def test_a_vm_waiting_for_admission_has_the_idle_vms_hooks_asked_for_what_it_lacks():
    vms, floors = idle_pair()
    budget = floors + 100
    assert not decide(vms, budget).hooks_asked, "nothing waits: the idle caches stay"
    d = decide(vms, budget, waiting_mib=388)
    assert d.waiting_mib == 388 and d.admit_short_mib == 288
    assert set(d.hooks_asked) == {"a", "b"}
    asked = sum(t.decision.numbers["hooks_asked_mib"] for t in d.targets)
    assert asked >= 288 - 2 or all(t.decision.numbers["hooks_asked_mib"] == 60 for t in d.targets)  # max_release caps
    for t in d.targets:
        assert t.role == "release" and "288M short for a VM waiting to be admitted" in t.reason, t.reason
    assert "388M waiting for admission, 288M of it asked of the hooks of a, b" in d.summary


def test_a_waiting_vm_that_fits_beside_the_floors_asks_no_hooks_and_the_idle_vms_keep_the_rest():
    vms, floors = idle_pair()
    budget = floors + 500
    d = decide(vms, budget, waiting_mib=388)
    assert not d.hooks_asked and d.admit_short_mib == 0
    assert sum(t.allot_mib for t in d.targets) <= budget - 388


def test_running_vms_grow_before_a_waiting_vm_is_made_room_for():
    hot, idle = busy("hot", 500), vm("c", 120, 140, 420)
    budget = floor_of(idle) + floor_of(hot) + 200
    d = decide([hot, idle], budget, waiting_mib=300)
    t = d.get("hot")
    assert t.want_mib > t.floor_mib and t.allot_mib - t.floor_mib == min(t.want_mib - t.floor_mib, 200)
    assert d.hooks_asked == ("c",) and d.admit_short_mib == 100


def test_nothing_idle_to_ask_says_so():
    d = decide([busy("hot", 500)], 600, waiting_mib=300)
    assert not d.hooks_asked and "with no idle VM's hooks to ask" in d.summary


def quiet(v: VmView, seconds: float = 60.0) -> VmView:
    """The brain saw the VM's heap not grow for `seconds`."""
    return replace(v, quiet_s=seconds)


def test_floors_over_the_budget_with_no_idle_vm_ask_the_hooks_of_full_but_quiet_vms():
    """Measured case (benchmarks/density.py, moving load over 8 VMs): every VM kept the cache its
    turn filled and read as under pressure, so none was idle to ask and the floors stayed far over
    the budget. A VM whose heap has not grown for QUIET_S gives through its hooks; the one taking
    load now (its heap grew a moment ago) and one whose hooks gave nothing lately are not asked."""
    vms = [quiet(busy("old", 450)), quiet(busy("older", 450), 300), quiet(busy("now", 450), 2.0),
           tried(quiet(busy("gave-nothing", 450)))]
    d = decide(vms, 1200)
    assert set(d.hooks_asked) == {"old", "older"}, d.summary
    old = d.get("old")
    assert old.role == "release" and old.decision.action == "shrink", old.reason
    assert "its heap has not grown for 60s" in old.reason and "under what the floors need" in old.reason, old.reason
    assert old.decision.heap_target < vms[0].inputs.heap_used  # a shrink below the live heap: the hooks
    assert d.get("now").role == "waiting-hooks" and d.get("gave-nothing").role == "waiting-hooks"


def test_full_but_quiet_vms_keep_their_heap_while_the_floors_fit_the_budget():
    """Only the floors alone over the budget make a VM that asks for more give: a short budget for
    growth is met by idle VMs or denied, as before."""
    vms = [quiet(busy("old", 450)), quiet(busy("now", 450), 2.0)]
    d = decide(vms, 1000)
    assert d.floors_mib <= 1000 and d.short_mib > 0
    assert not d.hooks_asked and {t.role for t in d.targets} == {"denied"}, d.summary


def test_quiet_unknown_is_not_quiet():
    """A VM the brain has not watched yet (quiet_s None) is not asked for what it holds."""
    d = decide([busy("a", 450), busy("b", 450)], 800)
    assert d.floors_mib > 800 and not d.hooks_asked, d.summary


def test_the_brain_times_how_long_a_heap_has_not_grown(tmp_path):
    """Brain._quiet_s, fed readings by hand: a rise past HEAP_GREW_MIB restarts the clock; wobbles
    between collections and falls (a release) do not."""
    from jvmkit.fleet import brain

    b = brain.Brain(tmp_path)
    grew = brain.HEAP_GREW_MIB * MIB
    assert b._quiet_s("a", 200 * MIB, 100.0) == 0.0
    assert b._quiet_s("a", 200 * MIB + grew - MIB, 130.0) == 30.0      # a wobble below the step
    assert b._quiet_s("a", 100 * MIB, 140.0) == 40.0                   # a fall keeps the time
    assert b._quiet_s("a", 100 * MIB + grew + MIB, 150.0) == 0.0       # grew from where it fell to
    assert b._quiet_s("b", 50 * MIB, 150.0) == 0.0                     # each VM its own


def test_quiet_vms_cover_what_the_idle_vms_hooks_cannot_really_free():
    """Idle VMs whose --min-memory sits just under their floor free only a few MiB whatever they are
    asked; the quiet full VMs are asked for the rest, so the allotment fits the budget."""
    probe = vm("p", 100, 120, 360)
    least = floor_of(probe) - 5
    idle = [vm(f"idle{k}", 100, 120, 360, min_memory=least) for k in range(3)]
    full = [quiet(busy(f"full{k}", 500)) for k in range(2)]
    budget = 3 * floor_of(probe) + 2 * 500 - 150
    d = decide(idle + full, budget)
    assert {"full0", "full1"} <= set(d.hooks_asked), d.summary
    assert d.allotted_mib <= budget, d.summary


def test_a_releasing_vm_is_never_allotted_more_than_it_has():
    """A VM under pressure may have less than its floor; asked to release, it gives and does not
    grow in the same step."""
    v = quiet(vm("full", 100, 110, 280, gc_ms=300))
    assert floor_of(v) - 50 > 280  # what its hooks can be asked for (half its heap) leaves it above 280
    d = decide([v, quiet(busy("now", 450), 1.0)], 600)
    t = d.get("full")
    assert t.role == "release" and t.allot_mib <= 280 and t.decision.balloon_target_mib <= 280, t.reason
    assert not [m for m in t.moves if m.taker == "full"], t.moves


@pytest.mark.parametrize("seconds,asked", [(QUIET_S, True), (QUIET_S - 0.5, False)])
def test_quiet_means_at_least_quiet_s(seconds, asked):
    d = decide([quiet(busy("a", 450), seconds), quiet(busy("b", 450), 1.0)], 700)
    assert ("a" in d.hooks_asked) == asked, d.summary


def test_the_brain_hands_its_quiet_timer_to_the_policy(tmp_path, monkeypatch):
    """Brain.decide_for, with its clock set by hand: forty seconds after a VM's heap last grew,
    with the floors over the budget, its hooks are asked; a VM whose heap grew just now is not."""
    import types

    from jvmkit.fleet import brain

    clock = [1000.0]
    monkeypatch.setattr(brain.time, "monotonic", lambda: clock[0])
    b = brain.Brain(tmp_path)
    b.budget = 700
    old, now = busy("old", 450), busy("now", 450)
    for v in (old, now):
        b.decide_for(types.SimpleNamespace(name=v.name), v.inputs, v.settings, False)
    clock[0] += 40
    grown = vm("now", 230, 240, 450, gc_ms=300)
    _, extra = b.decide_for(types.SimpleNamespace(name="now"), grown.inputs, grown.settings, False)
    assert extra["fleet"]["role"] != "release", extra
    _, extra = b.decide_for(types.SimpleNamespace(name="old"), old.inputs, old.settings, False)
    assert extra["fleet"]["role"] == "release" and "has not grown for 40s" in extra["fleet"]["summary"] + str(
        b.last.get("old").reason), extra
