"""The balloon policy: a pure function from what the sensors read to what the actuators should do.

No I/O here. `decide(inputs, settings)` looks at one VM's JVM heap (used, committed, max, GC time),
the guest's memory as virtio-balloon reports it, the balloon's current size, and the host's memory
pressure, and returns a `Decision`: a heap target for the guest agent and a guest-memory target for
the balloon, with the reason and the numbers behind it.

Rules, in order:
1. Heap pressure (GC overhead above `gc_overhead_grow`, heap used above `grow_used_ratio` of
   committed while committed < max, heap use rising fast, or the guest nearly out of available
   memory): GROW — the balloon deflates to the ceiling first, then the heap is allowed to grow
   again. Under a `balloon set` ceiling the guest gets what it needs above that ceiling (up to
   `--memory`) rather than being starved, as the kernel's deflate-on-oom would do.
2. Otherwise the heap target keeps headroom above the live heap: used × (1 + headroom) and at
   least used + `min_headroom_mib`; under host pressure (MemAvailable below `host_low_ratio` of
   host memory, or memory PSI some-avg10 above `host_psi_high`) the headroom is cut to
   `pressure_headroom`.
3. The guest-memory target is what the guest uses besides the heap + the heap target + a reserve,
   clamped to [floor, ceiling] (`--min-memory`, `--memory` or the `balloon set` ceiling). A
   `balloon set` ceiling never takes what the guest needs (`guest_need`); a change smaller than
   `hysteresis_mib` is not made (HOLD).

The floor (`floor_for`) is the higher of what the guest needs — live heap + headroom + what the
guest uses besides the heap (from its virtio-balloon stats) + a reserve above the guest's
low-memory mark — and `--min-memory`. No balloon target below it is ever applied after a shrink.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

MIB = 2**20


@dataclass(frozen=True)
class Settings:
    memory_mib: int                 # the guest's configured memory (the ceiling unless ceiling_mib is set)
    min_memory_mib: int             # the floor: never shrink the guest below this
    ceiling_mib: int | None = None  # a lower ceiling, from `jvmkit balloon set`
    headroom: float = 0.25          # heap target = used * (1 + headroom)
    min_headroom_mib: int = 32
    pressure_headroom: float = 0.10
    pressure_release: float = 0.15  # under host pressure, ask the app's shrinker hooks for this share of the heap
    max_release: float = 0.5        # a shrink never asks for more than this share of the used heap
    guest_reserve_mib: int = 48     # kept free in the guest besides the heap target
    gc_overhead_grow: float = 0.10  # share of wall time spent in GC that means "grow"
    grow_used_ratio: float = 0.90
    guest_low_available_mib: int = 24  # the guest's low-memory mark: below it, grow at once
    host_low_ratio: float = 0.10
    host_psi_high: float = 10.0
    hysteresis_mib: int = 32
    # What the guest is assumed to use besides the heap where neither its balloon (stats queue) nor
    # its JVM (OperatingSystem MXBean, host.with_jvm_memory) reports its memory: a generous guess.
    no_stats_non_heap_mib: int = 192
    rising_mib: int = 32            # heap use growing by more than this (and rising_ratio) since the
    rising_ratio: float = 0.25      #   last decision means the app is growing again: grow at once
    # The guest takes ballooned pages back itself when it runs out (Linux: virtio_balloon's
    # deflate-on-oom). Where it cannot (OSv: see jvmkit.packager.targets.osv), the heap may grow to
    # its max between two decisions, so every floor holds all of it.
    deflate_on_oom: bool = True

    @property
    def ceiling(self) -> int:
        return min(self.memory_mib, self.ceiling_mib or self.memory_mib)

    @property
    def set_ceiling(self) -> bool:
        """A `balloon set` ceiling below --memory is in force."""
        return self.ceiling < self.memory_mib

    @property
    def reserve_mib(self) -> int:
        """Kept available in the guest above everything it uses: at least twice the low-memory
        mark, so a target built on it never leaves the guest at that mark."""
        return max(self.guest_reserve_mib, 2 * self.guest_low_available_mib)


@dataclass(frozen=True)
class Inputs:
    heap_used: int                  # bytes
    heap_committed: int
    heap_max: int
    gc_time_delta_ms: float         # GC time since the last decision
    interval_s: float               # time since the last decision
    balloon_actual_mib: int         # guest memory as the balloon currently leaves it
    guest_total: int | None = None  # bytes, from virtio-balloon guest stats (None: not reported)
    guest_available: int | None = None
    host_total: int | None = None   # bytes (MemTotal)
    host_available: int | None = None  # bytes (MemAvailable)
    host_psi_some_avg10: float | None = None
    stats_fresh: bool = True        # guest stats were read after the last balloon change settled
    heap_used_prev: int | None = None  # heap used at the previous decision (to see a growth early)
    non_heap_seen: int | None = None   # the most the guest was seen using besides the heap (bytes)
    heap_settled: bool = True       # the guest stats were taken after the heap's committed size last moved
    recheck_live: bool = False      # a shrink stopped at its floor a while ago and the heap has not moved since
    shrink_floor_mib: int | None = None  # the floor the last shrink stopped at, while the heap is as it was then


@dataclass(frozen=True)
class Decision:
    action: str                     # "shrink", "grow" or "hold"
    heap_target: int                # bytes the guest agent should shrink/grow the committed heap to
    balloon_target_mib: int         # guest memory the balloon should leave
    reason: str
    host_pressure: bool
    numbers: dict
    stale_stats: bool = False       # held only because the guest stats predate the last change

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Need:
    """What the guest needs to keep the app running, in whole MiB (each part rounded up, so the
    parts add up to `total_mib`)."""
    heap_live_mib: int              # the heap in use
    headroom_mib: int               # above it: room to allocate, and what the heap still has committed
    non_heap_mib: int               # the guest besides the heap: the kernel's own, runtime files in RAM,
                                    #   metaspace, threads (from the guest's stats, or assumed)
    reserve_mib: int                # kept available, above the guest's low-memory mark
    from_stats: bool                # non_heap_mib comes from the guest's reading of its memory (its
                                    #   virtio-balloon stats, or its JVM's where the balloon has none)
    to_heap_max: bool = False       # the headroom reaches the heap's max (Settings.deflate_on_oom off)

    @property
    def total_mib(self) -> int:
        return self.heap_live_mib + self.headroom_mib + self.non_heap_mib + self.reserve_mib

    def describe(self) -> str:
        assumed = "" if self.from_stats else " (assumed: neither the balloon nor the JVM reports the guest's memory)"
        to_max = " (to the heap's max: this guest cannot take ballooned memory back when it runs out)" \
            if self.to_heap_max else ""
        return (f"live heap {self.heap_live_mib}M + headroom {self.headroom_mib}M{to_max} + guest non-heap "
                f"{self.non_heap_mib}M{assumed} + reserve {self.reserve_mib}M")


@dataclass(frozen=True)
class Floor:
    """The least guest memory a target may leave, and which limit set it."""
    mib: int
    by: str                         # "guest" (what it needs), "min-memory", or "memory" (all of it)
    need: Need
    min_memory_mib: int
    memory_mib: int

    def describe(self) -> str:
        if self.by == "guest":
            return f"stopped at {self.mib}M: {self.need.describe()}; --min-memory is {self.min_memory_mib}M"
        if self.by == "min-memory":
            return (f"stopped at {self.mib}M: --min-memory; the guest needs {self.need.total_mib}M "
                    f"({self.need.describe()})")
        return (f"stopped at {self.mib}M: all of --memory; the guest needs {self.need.total_mib}M "
                f"({self.need.describe()})")

    def to_dict(self) -> dict:
        return {"floor_mib": self.mib, "floor_by": self.by, "need_mib": self.need.total_mib,
                **asdict(self.need), "min_memory_mib": self.min_memory_mib, "memory_mib": self.memory_mib}


def host_under_pressure(i: Inputs, s: Settings) -> bool:
    if i.host_total and i.host_available is not None and i.host_available < s.host_low_ratio * i.host_total:
        return True
    return i.host_psi_some_avg10 is not None and i.host_psi_some_avg10 > s.host_psi_high


def clamp_mib(value_mib: float, s: Settings) -> int:
    floor = min(s.min_memory_mib, s.ceiling)
    return int(max(floor, min(s.ceiling, value_mib)))


def non_heap_reading(i: Inputs, s: Settings) -> int | None:
    """What the guest's reading of its memory says it uses besides the heap (bytes), or None
    without a reading."""
    if i.guest_total is None or i.guest_available is None:
        return None
    # Pages the balloon holds count as used inside the guest: take them out.
    inflated = max(0, s.memory_mib - i.balloon_actual_mib) * MIB
    guest_used = i.guest_total - i.guest_available - inflated
    return max(0, guest_used - i.heap_committed)


def non_heap_bytes(i: Inputs, s: Settings) -> int:
    """What the guest uses besides the heap: kernel, runtime files in RAM, metaspace, threads."""
    reading = non_heap_reading(i, s)
    if reading is None:
        return s.no_stats_non_heap_mib * MIB  # no reading of the guest's memory: assume a generous share
    # Heap the JVM has committed but not touched yet is free memory to the guest, so the reading
    # is low right after the heap grew (measured: 51M instead of ~200M after a 100 MiB cache fill,
    # which then starved the guest): never less than the most seen before.
    if not i.heap_settled and i.non_heap_seen:
        # Stats taken before the heap last moved are off either way (after an uncommit they still
        # count the freed heap as used: measured 271M against a steady 124M): the most seen from
        # settled readings stands.
        return i.non_heap_seen
    if not s.deflate_on_oom and not i.non_heap_seen:
        # Nothing settled seen yet, and a guest that cannot deflate on OOM does not survive an
        # underestimate (OSv's first reading after a 200 MiB heap drop: 0M, against 101M settled):
        # the generous share until a settled reading is seen.
        return max(reading, s.no_stats_non_heap_mib * MIB)
    return max(reading, i.non_heap_seen or 0)


def kernel_reserved_bytes(i: Inputs, s: Settings) -> int:
    """Guest RAM the kernel keeps for itself (configured memory minus MemTotal)."""
    if i.guest_total is None:
        return 0
    return max(0, s.memory_mib * MIB - i.guest_total)


def _up(value_bytes: float) -> int:
    return int(math.ceil(value_bytes / MIB - 1e-9))


def guest_need(i: Inputs, s: Settings, *, committed: bool = True) -> Need:
    """What the guest needs (pure): the live heap with minimal headroom — and, with `committed`,
    never less than what the heap has committed (the balloon cannot take pages the JVM holds;
    trying starves the guest) — plus what the guest uses besides the heap, plus the reserve. Without
    `Settings.deflate_on_oom` the heap counts at its max, committed or not."""
    used = i.heap_used
    heap = used + max(s.min_headroom_mib * MIB, used * s.pressure_headroom)
    if committed:
        heap = max(heap, i.heap_committed)
    to_max = not s.deflate_on_oom and i.heap_max > heap
    if to_max:
        heap = i.heap_max
    live = _up(used)
    stats = i.guest_total is not None and i.guest_available is not None
    return Need(heap_live_mib=live, headroom_mib=max(0, _up(heap) - live),
                non_heap_mib=_up(kernel_reserved_bytes(i, s) + non_heap_bytes(i, s)),
                reserve_mib=s.reserve_mib, from_stats=stats, to_heap_max=to_max)


def unmeasured_floor_mib(heap_max_mib: int, s: Settings) -> int:
    """What `guest_need` comes to, without `deflate_on_oom`, before the guest's memory or heap has
    been read (pure): the heap's max + the assumed non-heap share + the reserve, at most --memory.
    A fleet admits such a VM at this floor (jvmkit.fleet.state.start_floor_mib)."""
    return min(s.memory_mib, heap_max_mib + s.no_stats_non_heap_mib + s.reserve_mib)


def floor_for(i: Inputs, s: Settings) -> Floor:
    """The floor a target stops at (pure): what the guest needs or --min-memory, whichever is
    higher, and never more than --memory."""
    need = guest_need(i, s)
    min_memory = min(s.min_memory_mib, s.memory_mib)
    if need.total_mib > s.memory_mib:
        return Floor(s.memory_mib, "memory", need, s.min_memory_mib, s.memory_mib)
    if need.total_mib > min_memory:
        return Floor(need.total_mib, "guest", need, s.min_memory_mib, s.memory_mib)
    return Floor(min_memory, "min-memory", need, s.min_memory_mib, s.memory_mib)


def squeeze_floor_mib(i: Inputs, s: Settings) -> int:
    """The least guest memory a squeeze may aim for (pure): what the guest needs once its heap is
    shrunk to the live heap with minimal headroom (the committed heap not counted: the shrink
    uncommits it first), or --min-memory; at most --memory. `floor_for` still applies after the
    shrink, with the heap as it then is."""
    need = guest_need(i, s, committed=False).total_mib
    return min(s.memory_mib, max(min(s.min_memory_mib, s.memory_mib), need, i.shrink_floor_mib or 0))


def safe_floor_mib(i: Inputs, s: Settings) -> int:
    """The least guest memory that still holds the heap and keeps the guest above its low mark."""
    return floor_for(i, s).mib


def with_manual_ceiling(s: Settings, requested_mib: int) -> Settings:
    """Settings for a `balloon set` request: the request becomes the ceiling, never below the
    configured floor (pure). What the guest needs is applied on top (`floor_for`)."""
    ceiling = min(max(requested_mib, s.min_memory_mib), s.memory_mib)
    return replace(s, ceiling_mib=ceiling)


def after_shrink(before: Inputs, heap_used: int, heap_committed: int) -> Inputs:
    """The inputs as they stand right after a heap shrink (pure). The guest stats were read before
    it, so the heap the shrink uncommitted is added to the guest's available memory; otherwise it
    would be counted as non-heap memory and keep the balloon too small for one round."""
    freed = max(0, before.heap_committed - heap_committed)
    available = None if before.guest_available is None else before.guest_available + freed
    return replace(before, heap_used=heap_used, heap_committed=heap_committed, guest_available=available)


def final_balloon_target(d: "Decision", after: Inputs, s: Settings) -> int:
    """The balloon target once the heap shrink is done (pure): the decision's target, raised to
    the floor for the heap that is still live, so the guest is never starved — whatever ceiling
    `balloon set` asked for."""
    return min(s.memory_mib, max(d.balloon_target_mib, safe_floor_mib(after, s)))


def projected_available_mib(i: Inputs, target_mib: int) -> float | None:
    """The guest's available memory once the balloon leaves it `target_mib` (pure; None without
    stats): what it has now, less what the balloon would take, plus what it would give back."""
    if i.guest_available is None:
        return None
    return i.guest_available / MIB - (i.balloon_actual_mib - target_mib)


def set_outcome(requested_mib: int, target_mib: int, floor: Floor, d: Decision) -> dict:
    """The answer to `balloon set` (pure): what was asked, what the balloon now leaves the guest,
    and, if that is more than was asked, which limit stopped it and the numbers behind it."""
    if target_mib <= requested_mib:
        by, why = None, ""
    elif d.action == "grow":
        by, why = "growth", f"the guest is growing: {d.reason}"
    else:
        by, why = floor.by, (floor.describe() if target_mib == floor.mib
                             else f"stopped at {target_mib}M: {d.reason}")
    return {"requested_mib": requested_mib, "target_mib": target_mib, "floor_limited": by is not None,
            "stopped_by": by, "why": why, "floor": floor.to_dict(), "action": d.action, "reason": d.reason}


def _growth_target_mib(i: Inputs, s: Settings) -> int:
    """Where a GROW deflates to: the ceiling, or above a `balloon set` ceiling what the growing
    guest needs (its heap with full headroom on top of what it has committed), up to --memory."""
    if not s.set_ceiling:
        return s.ceiling
    heap = max(max(i.heap_used, i.heap_committed) * (1 + s.headroom), i.heap_used + s.min_headroom_mib * MIB)
    need = guest_need(i, s)
    wanted = need.total_mib - need.heap_live_mib - need.headroom_mib + _up(heap)
    return int(min(s.memory_mib, max(s.ceiling, wanted)))


def heap_pressure(i: Inputs, s: Settings) -> str | None:
    """Why the guest needs memory now (pure), or None: GC overhead above `gc_overhead_grow`, the
    guest nearly out of available memory, heap use rising fast, or heap used near committed while
    the balloon holds some back. The fleet policy serves these VMs first."""
    gc_overhead = (i.gc_time_delta_ms / 1000.0) / i.interval_s if i.interval_s > 0 else 0.0
    grow_to = _growth_target_mib(i, s)
    guest_low = i.guest_available is not None and i.guest_available < s.guest_low_available_mib * MIB
    heap_tight = i.heap_committed < i.heap_max and i.heap_used > s.grow_used_ratio * i.heap_committed
    rising = (i.heap_used_prev is not None and i.balloon_actual_mib < grow_to
              and i.heap_used - i.heap_used_prev > max(s.rising_mib * MIB, s.rising_ratio * i.heap_used_prev))
    if gc_overhead > s.gc_overhead_grow:
        return "GC overhead %.0f%%" % (100 * gc_overhead)
    if guest_low:
        return "guest memory nearly exhausted"
    if rising:
        return "heap use rising fast"
    if heap_tight and i.balloon_actual_mib < grow_to:
        return "heap used near committed"
    return None


def decide(i: Inputs, s: Settings, *, request: bool = False) -> Decision:
    """One decision. `request`: this round answers a `balloon set`, so a binding ceiling asks the
    app's shrinker hooks for part of the used heap; later rounds never squeeze below the live
    heap for that ceiling, they let the guest keep what it needs."""
    pressure = host_under_pressure(i, s)
    gc_overhead = (i.gc_time_delta_ms / 1000.0) / i.interval_s if i.interval_s > 0 else 0.0
    numbers = {"heap_used_mib": round(i.heap_used / MIB, 1), "heap_committed_mib": round(i.heap_committed / MIB, 1),
               "heap_max_mib": round(i.heap_max / MIB, 1), "gc_overhead": round(gc_overhead, 4),
               "balloon_actual_mib": i.balloon_actual_mib,
               "guest_available_mib": None if i.guest_available is None else round(i.guest_available / MIB, 1),
               "host_available_mib": None if i.host_available is None else round(i.host_available / MIB, 1),
               "host_psi_some_avg10": i.host_psi_some_avg10, "floor_mib": s.min_memory_mib, "ceiling_mib": s.ceiling,
               "set_ceiling_mib": s.ceiling if s.set_ceiling else None}
    ceiling_note = f"the {s.ceiling}M ceiling from `balloon set`"

    grow_to = _growth_target_mib(i, s)
    heap_tight = i.heap_committed < i.heap_max and i.heap_used > s.grow_used_ratio * i.heap_committed
    why = heap_pressure(i, s)
    if why:
        numbers["above_set_ceiling"] = grow_to > s.ceiling
        if i.balloon_actual_mib >= grow_to and not heap_tight:
            where = "all of --memory" if grow_to >= s.memory_mib else "the ceiling"
            return Decision("hold", i.heap_committed, i.balloon_actual_mib,
                            f"{why}, already at {where} ({i.balloon_actual_mib} MiB)", pressure, numbers)
        if grow_to > s.ceiling:
            return Decision("grow", i.heap_max, grow_to,
                            f"{why}: above {ceiling_note}, deflate to {grow_to} MiB, let the heap grow",
                            pressure, numbers)
        return Decision("grow", i.heap_max, grow_to, f"{why}: deflate to the ceiling, let the heap grow",
                        pressure, numbers)

    if pressure:  # ask the app's shrinker hooks to give some of the used heap back
        heap_target = int(i.heap_used * (1 - s.pressure_release))
    else:
        heap_target = max(int(i.heap_used * (1 + s.headroom)), i.heap_used + s.min_headroom_mib * MIB)
    heap_target = min(heap_target, i.heap_max)
    non_heap = non_heap_bytes(i, s)
    reserved = kernel_reserved_bytes(i, s)
    numbers["non_heap_mib"] = round(non_heap / MIB, 1)
    numbers["kernel_reserved_mib"] = round(reserved / MIB, 1)
    numbers["heap_target_mib"] = round(heap_target / MIB, 1)
    wanted_mib = (reserved + non_heap + heap_target) / MIB + s.reserve_mib
    target = clamp_mib(wanted_mib, s)
    numbers["wanted_mib"] = round(wanted_mib, 1)
    if not s.deflate_on_oom:  # never aim below room for the heap's max (Settings.deflate_on_oom)
        target = max(target, min(s.memory_mib, guest_need(i, s, committed=False).total_mib))
    above = False
    if s.set_ceiling and not request and not pressure:
        # A `balloon set` ceiling is a wish, not a starvation: the guest keeps what its live heap
        # and the rest of it need (this is how it gets memory back when the app grows again).
        need = guest_need(i, s, committed=False)
        numbers["need_mib"] = need.total_mib
        if need.total_mib > target:
            target, above = min(s.memory_mib, need.total_mib), True
    numbers["above_set_ceiling"] = target > s.ceiling
    if target < wanted_mib:
        # The target binds: the heap may keep only what fits above the non-heap part. On a
        # `balloon set` (or under host pressure) below the used heap this asks the app's shrinker
        # hooks; what they can't free, the floor keeps (see final_balloon_target, applied after
        # the shrink). Otherwise the heap keeps its live size with minimal headroom.
        fits = int((target - s.reserve_mib) * MIB - non_heap - reserved)
        least = (int(i.heap_used * (1 - s.max_release)) if request or pressure
                 else i.heap_used + s.min_headroom_mib * MIB)
        heap_target = min(max(fits, least), i.heap_max)
    if i.shrink_floor_mib and target < i.shrink_floor_mib and not request and not pressure:
        # the last shrink stopped at this floor and the heap has not changed since: another one
        # would run the collections again for nothing (measured: a GC every 2 s in an idle guest)
        target = min(s.memory_mib, i.shrink_floor_mib)
        numbers["shrink_floor_mib"] = i.shrink_floor_mib
    delta = target - i.balloon_actual_mib
    if delta < 0 and not i.stats_fresh:
        return Decision("hold", i.heap_committed, i.balloon_actual_mib,
                        "waiting for guest stats newer than the last balloon change", pressure, numbers, True)
    if abs(delta) < s.hysteresis_mib and not request and i.recheck_live and i.heap_committed > heap_target:
        # Only a collection tells garbage from live data, and an idle app runs none: objects it
        # dropped after the last shrink stay counted as used (measured: 300 MiB dropped right after
        # a shrink held the guest at 752M through a whole idle phase). Shrink the heap once more.
        return Decision("shrink", heap_target, i.balloon_actual_mib,
                        f"the heap has not moved since a shrink stopped at its floor: collect it again to see what "
                        f"is still live (heap target {heap_target / MIB:.0f} MiB)", pressure, numbers)
    if abs(delta) < s.hysteresis_mib and not request:
        return Decision("hold", heap_target, i.balloon_actual_mib,
                        f"change of {delta:+d} MiB is below the hysteresis ({s.hysteresis_mib} MiB)", pressure, numbers)
    over = f" (above {ceiling_note}: the guest needs {target} MiB)" if above else ""
    if delta < 0:
        why = "host under memory pressure" if pressure else "unused guest memory"
        return Decision("shrink", heap_target, target,
                        f"{why}: heap target {heap_target / MIB:.0f} MiB, guest {i.balloon_actual_mib} -> {target} MiB{over}",
                        pressure, numbers)
    if delta == 0:
        return Decision("hold", heap_target, target, f"guest already at {target} MiB{over}", pressure, numbers)
    return Decision("grow", heap_target, target,
                    f"guest needs more: {i.balloon_actual_mib} -> {target} MiB{over}", pressure, numbers)


def on_lost_contact(s: Settings, failures: int, what: str) -> tuple[Decision, float]:
    """Lost contact with the guest agent or QMP: deflate to the ceiling and back off (pure)."""
    backoff = min(30.0, 2.0 ** min(failures, 5))
    return Decision("grow", 0, s.memory_mib, f"lost contact with {what}: deflate to the ceiling, retry in {backoff:.0f}s",
                    False, {"failures": failures, "ceiling_mib": s.memory_mib}), backoff


def default_floor_mib(memory_mib: int) -> int:
    """The floor when --min-memory is not given: a quarter of the guest, at least 128 MiB."""
    return min(memory_mib, max(128, memory_mib // 4))
