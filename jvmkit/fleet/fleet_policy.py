"""The host-wide balloon policy: every VM's readings and the host's budget in, a target per VM out.

Pure: no I/O. `decide(vms, budget_mib)` takes one `VmView` per VM on the host (its readings as
`policy.Inputs`, its settings, weight and what QEMU costs besides the guest) and returns a
`FleetDecision`: for each VM the `policy.Decision` its controller applies, the role it plays and
the moves of memory between VMs, each naming giver, taker and why.

Each VM first decides alone (`policy.decide`: what it would want with the host to itself) and gets
a floor it is never squeezed below (`policy.squeeze_floor_mib`: live heap + headroom + guest
non-heap + reserve, or --min-memory). Then, within the budget:
1. Every VM gets its floor. VMs without the balloon agent count at their --memory; VMs not
   reporting yet (booting) count at their --min-memory; every VM adds its QEMU overhead.
2. What is left goes to VMs under heap pressure (GC overhead, heap near committed, guest low,
   heap rising: `policy.heap_pressure`), then to VMs that want more without pressure, each group
   shared by weight (max-min fair: each gets min(what it asks, λ·weight)).
3. The rest stays with the idle VMs, shared the same way: the VMs with the most idle headroom for
   their weight give first; a heavier VM keeps more.
4. If a VM still cannot get what it wants, the shrinker hooks of idle VMs at their floor are asked
   for the shortfall (`release`: a heap shrink below the live heap), in proportion to their heap and
   weight; only when no idle VM is left to ask is growth denied. When the floors alone are over the
   budget and the idle VMs' hooks cannot cover it, the hooks of VMs that ask for more but whose heap
   has not grown for QUIET_S are asked too: they hold what they filled earlier, not load now.
5. A VM waiting to be admitted (`jvmkit up`: its floor + overhead, `waiting_mib`) comes after the
   running VMs' growth: the idle VMs keep only what is left beyond it, and what the floors leave too
   little of is asked of the idle VMs' hooks, so an idle cache makes room for one more service.
A VM only grows into memory that is free now; memory a VM gives follows at its next step (the
brain wakes it at once), so the targets never add up to more than the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from jvmkit.balloon import policy
from jvmkit.balloon.policy import MIB

FREE = "free"            # the budget's unallotted memory, as giver or taker of a move
MIN_RELEASE_HEAP_MIB = 16  # an idle VM with less live heap than this has nothing for its hooks to give
GROW_STEP_MIB = 64         # the least a VM under heap pressure grows by in one step
# A VM whose heap has not grown for this long holds what it filled earlier, not load now. Measured
# (benchmarks/density.py, 8 cache-service VMs in 3G, moving load): each VM kept the 150 MiB its
# turn filled; with its cache full in a tight balloon it read as under pressure (guest memory low,
# GC overhead from the probes' allocations) though its heap stayed within 213-219M, so no VM was
# idle, no hook was asked, and the floors ended 1.6G over the budget. The heap is all the brain
# reads: a VM serving reads from a full cache while allocating little also reads as quiet. So only
# the floors alone over the budget ask such a VM, and never for more than max_release of its heap.
QUIET_S = 30.0

GROWING = ("pressure", "needs")


@dataclass(frozen=True)
class VmView:
    """One VM as the brain sees it."""
    name: str
    settings: policy.Settings
    inputs: policy.Inputs | None = None  # the latest readings; None: not reporting (booting, no agent yet)
    weight: int = 1
    overhead_mib: int = 0                # what the VM costs the host besides its guest memory (QEMU)
    managed: bool = True                 # False: no balloon agent, counted at --memory
    request: bool = False                # a `balloon set` is answered this round
    hooks_tried: bool = False            # its hooks were asked lately and its floor did not drop
    fleet: str | None = None
    quiet_s: float | None = None         # how long its heap has not grown (the brain's watch); None: unknown

    @property
    def reserve_mib(self) -> int:
        """What a VM that does not report yet counts in the budget (what admission reserved)."""
        return min(self.settings.min_memory_mib, self.settings.memory_mib)


@dataclass(frozen=True)
class Move:
    giver: str                           # a VM, or FREE
    taker: str                           # a VM, or FREE
    mib: int
    why: str

    def describe(self) -> str:
        return f"{self.mib}M {self.giver} -> {self.taker} ({self.why})"


@dataclass(frozen=True)
class Target:
    name: str
    role: str            # pressure, needs, idle, squeezed, release, denied, settling, waiting, fixed
    decision: policy.Decision | None  # what the VM's controller applies; None: nothing to apply
    actual_mib: int      # guest memory the balloon leaves it now
    floor_mib: int
    want_mib: int        # what it would have alone
    allot_mib: int       # what the fleet gives it (its balloon target once the moves are done)
    counted_mib: int     # what it counts in the budget now (besides its overhead)
    weight: int
    overhead_mib: int
    reason: str
    moves: tuple[Move, ...] = ()
    fleet: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["decision"] = None if self.decision is None else self.decision.to_dict()
        data["moves"] = [asdict(m) for m in self.moves]
        return data


@dataclass(frozen=True)
class FleetDecision:
    budget_mib: int
    targets: tuple[Target, ...]
    moves: tuple[Move, ...]
    fixed_mib: int       # QEMU overheads, VMs without the agent, VMs not reporting yet
    allotted_mib: int    # the budget as the targets use it (fixed included)
    floors_mib: int      # the least the VMs could live with (fixed included)
    short_mib: int       # growth wanted that the budget could not give this round
    hooks_asked: tuple[str, ...] = ()
    summary: str = ""
    waiting_mib: int = 0  # VMs waiting for admission (floor + overhead)
    admit_short_mib: int = 0  # what of it the floors leave too little of: asked of the hooks

    def get(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)

    def to_dict(self) -> dict:
        return {"budget_mib": self.budget_mib, "fixed_mib": self.fixed_mib, "allotted_mib": self.allotted_mib,
                "floors_mib": self.floors_mib, "short_mib": self.short_mib, "hooks_asked": list(self.hooks_asked),
                "waiting_mib": self.waiting_mib, "admit_short_mib": self.admit_short_mib,
                "summary": self.summary, "moves": [asdict(m) for m in self.moves],
                "targets": [t.to_dict() for t in self.targets]}


# ---- sharing ------------------------------------------------------------------------------------

def water_fill(requests: dict[str, int], weights: dict[str, int], amount: int) -> dict[str, int]:
    """Share `amount` among `requests`, max-min fair by weight (pure): each gets min(request,
    λ·weight), λ chosen so the shares add up to `amount` (or everyone gets all it asks)."""
    given = {k: 0 for k in requests}
    left = {k: v for k, v in requests.items() if v > 0}
    if amount <= 0 or not left:
        return given
    if sum(left.values()) <= amount:
        return {k: max(0, v) for k, v in requests.items()}
    remaining = float(amount)
    while left and remaining > 1e-9:
        lam = remaining / sum(max(1, weights.get(k, 1)) for k in left)
        capped = [k for k, v in left.items() if v <= lam * max(1, weights.get(k, 1))]
        if not capped:
            for k in left:
                given[k] += lam * max(1, weights.get(k, 1))
            break
        for k in capped:
            given[k] += left.pop(k)
            remaining -= given[k]
    return {k: int(math.floor(v + 1e-9)) for k, v in given.items()}


def proportional(caps: dict[str, int], factors: dict[str, float], amount: int) -> dict[str, int]:
    """Share `amount` in proportion to `factors`, none above its cap (pure)."""
    given = {k: 0 for k in caps}
    left = {k for k, c in caps.items() if c > 0 and factors.get(k, 0) > 0}
    remaining = float(min(amount, sum(caps[k] for k in left)))
    while left and remaining > 1e-9:
        total = sum(factors[k] for k in left)
        share = {k: remaining * factors[k] / total for k in left}
        over = [k for k in left if given[k] + share[k] >= caps[k]]
        if not over:
            for k in left:
                given[k] += share[k]
            break
        for k in over:
            remaining -= caps[k] - given[k]
            given[k] = caps[k]
            left.discard(k)
    return {k: int(math.ceil(v - 1e-9)) for k, v in given.items()}


# ---- the decision -------------------------------------------------------------------------------

@dataclass
class _Entry:
    view: VmView
    local: policy.Decision
    actual: int
    floor: int
    want: int
    kind: str            # pressure, needs, idle, settling
    why: str = ""
    allot: int = 0
    ask_mib: int = 0     # asked of its shrinker hooks
    role: str = ""
    moves: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.view.name


def _entry(v: VmView) -> _Entry:
    i, s = v.inputs, v.settings
    local = policy.decide(i, s, request=v.request)
    actual = i.balloon_actual_mib
    if local.stale_stats:  # the last change has not shown in the guest's stats yet: hold it there
        return _Entry(v, local, actual, actual, actual, "settling", local.reason)
    floor = policy.squeeze_floor_mib(i, s)
    if local.action == "shrink" and local.balloon_target_mib < floor:
        # a `balloon set` or host pressure asks the hooks for part of the live heap: that is its floor
        floor = local.balloon_target_mib
    if local.action == "hold":  # content where it is (a change below the hysteresis is not made)
        floor = min(floor, actual)
    want = min(s.memory_mib, max(local.balloon_target_mib, floor))
    why = policy.heap_pressure(i, s)
    if local.action == "grow" and why:
        return _Entry(v, local, actual, floor, want, "pressure", why)
    return _Entry(v, local, actual, floor, want, "needs" if want > actual else "idle", local.reason)


def decide(vms: Sequence[VmView], budget_mib: int, waiting_mib: int = 0) -> FleetDecision:
    """Targets for every VM on the host within `budget_mib` (pure; see the module's rules), with
    `waiting_mib` wanted by VMs waiting for admission."""
    fixed, outside = 0, []
    entries: list[_Entry] = []
    for v in vms:
        fixed += v.overhead_mib
        if not v.managed:
            fixed += v.settings.memory_mib
            outside.append(_outside(v, "fixed", v.settings.memory_mib, "no balloon agent: counts at its --memory"))
        elif v.inputs is None:
            fixed += v.reserve_mib
            outside.append(_outside(v, "waiting", v.reserve_mib,
                                    f"not reporting yet: counts at its --min-memory ({v.reserve_mib}M)"))
        else:
            entries.append(_entry(v))
    weights = {e.name: max(1, e.view.weight) for e in entries}
    if fixed + sum(e.want for e in entries) > budget_mib:
        # Alone (or with room), a VM under pressure deflates to its ceiling; when the budget is
        # short it grows by half again each step (at least GROW_STEP_MIB), so one busy VM does not
        # empty the others' caches for memory it may not use (measured: a 100 MiB cache fill
        # asked for all of its 1G ceiling).
        for e in entries:
            if e.kind == "pressure":
                e.want = min(e.want, max(e.floor, e.actual + max(GROW_STEP_MIB, e.actual // 2)))
    pool = budget_mib - fixed - sum(e.floor for e in entries)
    over = max(0, -pool)
    pool = max(0, pool)
    waiting_mib = max(0, waiting_mib)
    admit_short = max(0, waiting_mib - pool)  # admission counts the running VMs at their floors
    # 2. growth: VMs under heap pressure first, then the ones that want more
    for kind in GROWING:
        group = [e for e in entries if e.kind == kind]
        got = water_fill({e.name: e.want - e.floor for e in group}, weights, pool)
        for e in group:
            e.allot = e.floor + got[e.name]
        pool -= sum(got.values())
    # 3. what is left stays with the idle VMs
    idle = [e for e in entries if e.kind not in GROWING]
    kept = water_fill({e.name: e.want - e.floor for e in idle}, weights, max(0, pool - waiting_mib))
    for e in idle:
        e.allot = e.floor + kept[e.name]
        e.role = "settling" if e.kind == "settling" else "idle" if e.allot >= e.want else "squeezed"
    short = sum(e.want - e.allot for e in entries if e.kind in GROWING)
    # 4. still short (or the floors alone are over the budget): ask the shrinker hooks of idle VMs
    #    at their floor (also for what a waiting VM lacks), then deny
    hooks: list[str] = []
    if short + over + admit_short > 0:
        askable = [e for e in idle if e.kind == "idle" and e.allot <= e.floor and _has_heap_to_give(e)]
        freed = _ask_hooks(askable, short + over + admit_short, weights, hooks)
        if over > freed:  # the floors alone over the budget: VMs full but quiet give what they filled
            full = [e for e in entries if e.kind in GROWING and (e.view.quiet_s or 0) >= QUIET_S
                    and _has_heap_to_give(e)]
            _ask_hooks(full, over - freed, weights, hooks)
    growing = [e for e in entries if e.kind in GROWING and e.role != "release"]
    short = sum(e.want - e.allot for e in growing)
    for e in growing:
        e.role = e.kind if e.allot >= e.want else ("waiting-hooks" if hooks else "denied")
    ctx = _Ctx(budget_mib, short, tuple(e.name for e in growing if e.allot < e.want), tuple(hooks), over,
               admit_short)
    targets = _apply_steps(entries, fixed, ctx)
    allotted = fixed + sum(e.allot for e in entries)
    floors = fixed + sum(e.floor for e in entries)
    moves = tuple(m for e in entries for m in e.moves if m.giver == e.name or m.giver == FREE)
    summary = (f"budget {budget_mib}M: {allotted}M allotted to {len(vms)} VMs ({fixed}M fixed: QEMU overheads, "
               f"VMs without the agent or not reporting), floors {floors}M")
    if short:
        summary += f"; {short}M of growth short" + (f", hooks asked of {', '.join(hooks)}" if hooks else ", denied")
    if over:
        summary += f"; the floors alone are {over}M over the budget"
    if waiting_mib:
        summary += f"; {waiting_mib}M waiting for admission"
        if admit_short:
            summary += f", {admit_short}M of it " + (f"asked of the hooks of {', '.join(hooks)}" if hooks
                                                     else "with no idle VM's hooks to ask")
    if moves:
        summary += "; " + "; ".join(m.describe() for m in moves)
    return FleetDecision(budget_mib, tuple(outside) + tuple(targets), moves, fixed, allotted, floors, short,
                         tuple(hooks), summary, waiting_mib, admit_short)


def _has_heap_to_give(e: _Entry) -> bool:
    """Its hooks were not tried lately, and its live heap is worth asking."""
    return not e.view.hooks_tried and e.view.inputs.heap_used >= MIN_RELEASE_HEAP_MIB * MIB


def _ask_hooks(candidates: list[_Entry], amount: int, weights: dict[str, int], hooks: list[str]) -> int:
    """Ask the shrinker hooks of `candidates` for `amount` MiB in proportion to their heap and
    weight, each for at most max_release of its heap (role `release`, named in `hooks`). Returns
    what their floors really drop by: an ask stops at --min-memory, and a VM asked never gets more
    than it has now (one under pressure may be below its floor)."""
    caps = {e.name: int(e.view.inputs.heap_used * e.view.settings.max_release / MIB) for e in candidates}
    factors = {e.name: e.view.inputs.heap_used / weights[e.name] for e in candidates}
    asks = proportional(caps, factors, amount)
    freed = 0
    for e in candidates:
        if asks[e.name] > 0:
            e.ask_mib, e.role = asks[e.name], "release"
            e.allot = min(e.actual, max(e.view.reserve_mib, e.floor - e.ask_mib))
            hooks.append(e.name)
            freed += e.floor - e.allot
    return freed


def _outside(v: VmView, role: str, counted: int, reason: str) -> Target:
    actual = v.inputs.balloon_actual_mib if v.inputs else v.settings.memory_mib
    return Target(v.name, role, None, actual, counted, counted, counted, counted, v.weight, v.overhead_mib,
                  reason, fleet=v.fleet)


@dataclass(frozen=True)
class _Ctx:
    budget: int
    short: int
    short_names: tuple[str, ...]  # the VMs that did not get what they want
    hooks: tuple[str, ...]        # the VMs whose shrinker hooks are asked
    over: int                     # how far the floors alone are over the budget
    admit_short: int = 0          # what a VM waiting for admission lacks


def _apply_steps(entries: list[_Entry], fixed: int, ctx: _Ctx) -> list[Target]:
    """The step each VM takes now: givers shrink at once; takers grow into what is free now,
    pressure first; moves pair takers with what is free, then with the givers."""
    free_now = ctx.budget - fixed - sum(e.actual for e in entries)
    steps = {}
    for e in entries:
        steps[e.name] = min(e.actual, e.allot) if e.allot < e.actual else e.actual
    takers = sorted((e for e in entries if e.allot > e.actual),
                    key=lambda e: (GROWING.index(e.kind) if e.kind in GROWING else 2, e.actual - e.allot))
    givers = sorted((e for e in entries if e.allot < e.actual), key=lambda e: e.allot - e.actual)
    left_free = max(0, free_now)
    give_left = {g.name: g.actual - g.allot for g in givers}
    for t in takers:
        gain = t.allot - t.actual
        now = min(gain, left_free)
        left_free -= now
        steps[t.name] = t.actual + now
        why = t.why if t.kind == "pressure" else "wants more"
        rest = gain
        if now:
            t.moves.append(Move(FREE, t.name, now, why))
            rest -= now
        for g in givers:
            if rest <= 0:
                break
            part = min(rest, give_left[g.name])
            if part > 0:
                give_left[g.name] -= part
                rest -= part
                move = Move(g.name, t.name, part, why)
                t.moves.append(move)
                g.moves.append(move)
    for g in givers:
        if give_left[g.name] > 0:
            g.moves.append(Move(g.name, FREE, give_left[g.name], "unused" if g.role == "idle" else g.role))
    return [_target(e, steps[e.name], ctx) for e in entries]


def _target(e: _Entry, step: int, ctx: _Ctx) -> Target:
    s, local = e.view.settings, e.local
    given = [m for m in e.moves if m.giver == e.name and m.taker != FREE]
    taken = [m for m in e.moves if m.taker == e.name]
    if e.role in ("idle", "needs") and step != e.actual and abs(step - e.actual) < s.hysteresis_mib \
            and not e.view.request:
        step = e.actual  # not worth a change
    if e.role in ("idle", "pressure", "needs", "settling") and step == local.balloon_target_mib:
        decision, reason = local, local.reason  # what it would do alone: the fleet lets it
        if taken and e.role != "settling":
            reason += " (" + ", ".join(f"{m.mib}M from {m.giver}" for m in taken) + ")"
        if given:
            reason += "; " + ", ".join(f"{m.mib}M to {m.taker} ({m.why})" for m in given)
    else:
        decision, reason = _moved(e, step, ctx, given, taken)
    return Target(e.name, e.role, decision, e.actual, e.floor, e.want, e.allot, max(e.actual, step), e.view.weight,
                  e.view.overhead_mib, reason, tuple(e.moves), e.view.fleet)


def _heap_fitting(i: policy.Inputs, s: policy.Settings, target_mib: int) -> int:
    """The committed heap that fits in `target_mib` of guest memory besides the rest (bytes)."""
    rest = policy.non_heap_bytes(i, s) + policy.kernel_reserved_bytes(i, s) + s.reserve_mib * MIB
    return int(target_mib * MIB - rest)


def _moved(e: _Entry, step: int, ctx: _Ctx, given, taken):
    i, s, local = e.view.inputs, e.view.settings, e.local
    numbers = dict(local.numbers, fleet_floor_mib=e.floor, fleet_want_mib=e.want, fleet_allot_mib=e.allot,
                   fleet_budget_mib=ctx.budget, weight=e.view.weight)
    to = ", ".join(f"{m.mib}M to {m.taker} ({m.why})" for m in given)
    if e.role == "release":
        heap = max(0, i.heap_used - e.ask_mib * MIB)
        numbers["hooks_asked_mib"] = e.ask_mib
        if e.kind in GROWING:  # asked only for what the floors alone are over the budget
            short = (f"{ctx.over}M under what the floors need (it asks for more, but its heap has not grown "
                     f"for {e.view.quiet_s:.0f}s)")
        else:
            short = (f"short by {ctx.short}M for {', '.join(ctx.short_names)}" if ctx.short
                     else f"{ctx.over}M under what the floors need" if ctx.over else "")
        if ctx.admit_short:
            short += (", and " if short else "") + f"{ctx.admit_short}M short for a VM waiting to be admitted"
        reason = (f"fleet budget {ctx.budget}M {short}: shrinker hooks asked for {e.ask_mib}M of the "
                  f"{i.heap_used / MIB:.0f}M live heap, guest {e.actual} -> {step}M")
        return policy.Decision("shrink", heap, step, reason, local.host_pressure, numbers), reason
    if step < e.actual:
        least = i.heap_used + s.min_headroom_mib * MIB
        heap = local.heap_target if local.action == "shrink" and step >= local.balloon_target_mib else \
            min(i.heap_max, max(least, _heap_fitting(i, s, step)))
        reason = (f"fleet budget {ctx.budget}M: guest {e.actual} -> {step}M"
                  + (f", {to}" if to else "")
                  + f"; keeps {max(0, e.allot - e.floor)}M above its floor {e.floor}M (weight {e.view.weight})")
        return policy.Decision("shrink", heap, step, reason, local.host_pressure, numbers), reason
    if step > e.actual:
        heap = local.heap_target if local.action == "grow" and step >= local.balloon_target_mib else \
            min(i.heap_max, max(i.heap_committed, _heap_fitting(i, s, step)))
        src = ", ".join(f"{m.mib}M from {m.giver}" for m in taken if m.giver == FREE or step >= e.allot)
        pending = [m.giver for m in taken if m.giver != FREE]
        reason = f"{e.why}: guest {e.actual} -> {step}M" + (f" ({src})" if src else "")
        if step < e.allot and pending:
            reason += f"; {e.allot - step}M more as {', '.join(pending)} shrink"
        if e.allot < e.want:
            reason += _short_text(e, ctx)
        return policy.Decision("grow", heap, step, reason, local.host_pressure, numbers), reason
    pending = sorted({m.giver for m in taken if m.giver != FREE})
    if e.allot > step and pending:
        reason = (f"{e.why}: stays at {step}M for now, the budget is full; {e.allot - step}M more as "
                  f"{', '.join(pending)} shrink")
        if e.allot < e.want:
            reason += _short_text(e, ctx)
    elif e.role in ("denied", "waiting-hooks"):
        reason = f"{e.why}: stays at {step}M" + _short_text(e, ctx)
    elif e.role == "squeezed" or local.action != "hold":
        reason = f"fleet budget {ctx.budget}M: holds at {step}M (its own wish: {local.reason})"
    else:
        reason = local.reason
    return policy.Decision("hold", i.heap_committed, step, reason, local.host_pressure, numbers), reason


def _short_text(e: _Entry, ctx: _Ctx) -> str:
    missing = e.want - e.allot
    if ctx.hooks:
        return f"; {missing}M short of the {e.want}M it wants: shrinker hooks of {', '.join(ctx.hooks)} asked first"
    why = (f"the floors alone are {ctx.over}M over the budget" if ctx.over
           else "every idle VM is at its floor; none has heap its hooks could give, or they gave nothing lately")
    return f"; growth denied: {missing}M short of the {e.want}M it wants ({why})"
