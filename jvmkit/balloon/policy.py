"""The balloon policy: a pure function from what the sensors read to what the actuators should do.

No I/O here. `decide(inputs, settings)` looks at one VM's JVM heap (used, committed, max, GC time),
the guest's memory as virtio-balloon reports it, the balloon's current size, and the host's memory
pressure, and returns a `Decision`: a heap target for the guest agent and a guest-memory target for
the balloon, with the reason and the numbers behind it.

Rules, in order:
1. Heap pressure (GC overhead above `gc_overhead_grow`, heap used above `grow_used_ratio` of
   committed while committed < max, or the guest nearly out of available memory): GROW — the
   balloon deflates to the full `--memory` first, then the heap is allowed to grow again.
2. Otherwise the heap target keeps headroom above the live heap: used × (1 + headroom) and at
   least used + `min_headroom_mib`; under host pressure (MemAvailable below `host_low_ratio` of
   host memory, or memory PSI some-avg10 above `host_psi_high`) the headroom is cut to
   `pressure_headroom`.
3. The guest-memory target is what the guest uses besides the heap + the heap target + a reserve,
   clamped to [floor, ceiling] (`--min-memory`, `--memory`). Never below the floor, never above the
   ceiling; a change smaller than `hysteresis_mib` is not made (HOLD).
"""

from __future__ import annotations

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
    guest_low_available_mib: int = 24
    host_low_ratio: float = 0.10
    host_psi_high: float = 10.0
    hysteresis_mib: int = 32
    no_stats_non_heap_mib: int = 192
    rising_mib: int = 32            # heap use growing by more than this (and rising_ratio) since the
    rising_ratio: float = 0.25      #   last decision means the app is growing again: grow at once  # what the guest is assumed to use besides the heap without stats


    @property
    def ceiling(self) -> int:
        return min(self.memory_mib, self.ceiling_mib or self.memory_mib)


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


@dataclass(frozen=True)
class Decision:
    action: str                     # "shrink", "grow" or "hold"
    heap_target: int                # bytes the guest agent should shrink/grow the committed heap to
    balloon_target_mib: int         # guest memory the balloon should leave
    reason: str
    host_pressure: bool
    numbers: dict

    def to_dict(self) -> dict:
        return asdict(self)


def host_under_pressure(i: Inputs, s: Settings) -> bool:
    if i.host_total and i.host_available is not None and i.host_available < s.host_low_ratio * i.host_total:
        return True
    return i.host_psi_some_avg10 is not None and i.host_psi_some_avg10 > s.host_psi_high


def clamp_mib(value_mib: float, s: Settings) -> int:
    floor = min(s.min_memory_mib, s.ceiling)
    return int(max(floor, min(s.ceiling, value_mib)))


def non_heap_bytes(i: Inputs, s: Settings) -> int:
    """What the guest uses besides the heap: kernel, runtime files in RAM, metaspace, threads."""
    if i.guest_total is not None and i.guest_available is not None:
        # Pages the balloon holds count as used inside the guest: take them out.
        inflated = max(0, s.memory_mib - i.balloon_actual_mib) * MIB
        guest_used = i.guest_total - i.guest_available - inflated
        return max(0, guest_used - i.heap_committed)
    return s.no_stats_non_heap_mib * MIB  # no guest stats (e.g. OSv): assume a generous share


def kernel_reserved_bytes(i: Inputs, s: Settings) -> int:
    """Guest RAM the kernel keeps for itself (configured memory minus MemTotal)."""
    if i.guest_total is None:
        return 0
    return max(0, s.memory_mib * MIB - i.guest_total)


def safe_floor_mib(i: Inputs, s: Settings) -> int:
    """The least guest memory that still holds the heap (pure): the live heap with minimal
    headroom, and never less than what the heap has committed (the balloon cannot take pages the
    JVM holds; trying starves the guest)."""
    live = max(i.heap_used * (1 + s.pressure_headroom) + s.min_headroom_mib * MIB // 2, i.heap_committed)
    needed = kernel_reserved_bytes(i, s) + non_heap_bytes(i, s) + live
    return clamp_mib(needed / MIB + s.guest_reserve_mib, s)


def with_manual_ceiling(s: Settings, requested_mib: int) -> Settings:
    """Settings for a `balloon set` request: the request becomes the ceiling, never below the
    configured floor (pure). The live heap's safe floor is applied after the shrink."""
    ceiling = min(max(requested_mib, s.min_memory_mib), s.memory_mib)
    return Settings(**{**s.__dict__, "ceiling_mib": ceiling})


def after_shrink(before: Inputs, heap_used: int, heap_committed: int) -> Inputs:
    """The inputs as they stand right after a heap shrink (pure). The guest stats were read before
    it, so the heap the shrink uncommitted is added to the guest's available memory; otherwise it
    would be counted as non-heap memory and keep the balloon too small for one round."""
    freed = max(0, before.heap_committed - heap_committed)
    available = None if before.guest_available is None else before.guest_available + freed
    return replace(before, heap_used=heap_used, heap_committed=heap_committed, guest_available=available)


def final_balloon_target(d: "Decision", after: Inputs, s: Settings) -> int:
    """The balloon target once the heap shrink is done (pure): the decision's target, raised to
    the safe floor for the heap that is still live, so the guest is never starved."""
    return min(s.memory_mib, max(d.balloon_target_mib, safe_floor_mib(after, s)))


def decide(i: Inputs, s: Settings) -> Decision:
    pressure = host_under_pressure(i, s)
    gc_overhead = (i.gc_time_delta_ms / 1000.0) / i.interval_s if i.interval_s > 0 else 0.0
    numbers = {"heap_used_mib": round(i.heap_used / MIB, 1), "heap_committed_mib": round(i.heap_committed / MIB, 1),
               "heap_max_mib": round(i.heap_max / MIB, 1), "gc_overhead": round(gc_overhead, 4),
               "balloon_actual_mib": i.balloon_actual_mib,
               "guest_available_mib": None if i.guest_available is None else round(i.guest_available / MIB, 1),
               "host_available_mib": None if i.host_available is None else round(i.host_available / MIB, 1),
               "host_psi_some_avg10": i.host_psi_some_avg10, "floor_mib": s.min_memory_mib, "ceiling_mib": s.ceiling}

    guest_low = i.guest_available is not None and i.guest_available < s.guest_low_available_mib * MIB
    heap_tight = i.heap_committed < i.heap_max and i.heap_used > s.grow_used_ratio * i.heap_committed
    rising = (i.heap_used_prev is not None and i.balloon_actual_mib < s.ceiling
              and i.heap_used - i.heap_used_prev > max(s.rising_mib * MIB, s.rising_ratio * i.heap_used_prev))
    if gc_overhead > s.gc_overhead_grow or guest_low or rising or (heap_tight and i.balloon_actual_mib < s.ceiling):
        why = ("GC overhead %.0f%%" % (100 * gc_overhead) if gc_overhead > s.gc_overhead_grow
               else "guest memory nearly exhausted" if guest_low
               else "heap use rising fast" if rising else "heap used near committed")
        if i.balloon_actual_mib >= s.ceiling and not heap_tight and not guest_low:
            return Decision("hold", i.heap_committed, s.ceiling, f"{why}, already at the ceiling", pressure, numbers)
        return Decision("grow", i.heap_max, s.ceiling, f"{why}: deflate to the ceiling, let the heap grow",
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
    wanted_mib = (reserved + non_heap + heap_target) / MIB + s.guest_reserve_mib
    target = clamp_mib(wanted_mib, s)
    numbers["wanted_mib"] = round(wanted_mib, 1)
    if target < wanted_mib:
        # The ceiling binds: the heap may keep only what fits above the non-heap part. Below the
        # used heap this asks the app's shrinker hooks; what they can't free, the safe floor keeps
        # (see final_balloon_target, applied after the shrink).
        fits = int((target - s.guest_reserve_mib) * MIB - non_heap - reserved)
        heap_target = min(max(fits, int(i.heap_used * (1 - s.max_release))), i.heap_max)
    delta = target - i.balloon_actual_mib
    if delta < 0 and not i.stats_fresh:
        return Decision("hold", i.heap_committed, i.balloon_actual_mib,
                        "waiting for guest stats newer than the last balloon change", pressure, numbers)
    if abs(delta) < s.hysteresis_mib:
        return Decision("hold", heap_target, i.balloon_actual_mib,
                        f"change of {delta:+d} MiB is below the hysteresis ({s.hysteresis_mib} MiB)", pressure, numbers)
    if delta < 0:
        why = "host under memory pressure" if pressure else "unused guest memory"
        return Decision("shrink", heap_target, target,
                        f"{why}: heap target {heap_target / MIB:.0f} MiB, guest {i.balloon_actual_mib} -> {target} MiB",
                        pressure, numbers)
    return Decision("grow", heap_target, target,
                    f"guest needs more: {i.balloon_actual_mib} -> {target} MiB", pressure, numbers)


def on_lost_contact(s: Settings, failures: int, what: str) -> tuple[Decision, float]:
    """Lost contact with the guest agent or QMP: deflate to the ceiling and back off (pure)."""
    backoff = min(30.0, 2.0 ** min(failures, 5))
    return Decision("grow", 0, s.memory_mib, f"lost contact with {what}: deflate to the ceiling, retry in {backoff:.0f}s",
                    False, {"failures": failures, "ceiling_mib": s.memory_mib}), backoff


def default_floor_mib(memory_mib: int) -> int:
    """The floor when --min-memory is not given: a quarter of the guest, at least 128 MiB."""
    return min(memory_mib, max(128, memory_mib // 4))
