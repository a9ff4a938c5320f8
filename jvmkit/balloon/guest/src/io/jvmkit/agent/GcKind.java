package io.jvmkit.agent;

import java.lang.management.GarbageCollectorMXBean;
import java.util.List;

/** The collector in use, detected from the GarbageCollectorMXBean names, and how to steer it. */
enum GcKind {
    G1("G1", Steering.FREE_RATIOS),
    PARALLEL("Parallel", Steering.FREE_RATIOS),
    SERIAL("Serial", Steering.FREE_RATIOS),
    ZGC("ZGC", Steering.SOFT_MAX),
    SHENANDOAH("Shenandoah", Steering.SOFT_MAX),
    EPSILON("Epsilon", Steering.NONE),
    UNKNOWN("unknown", Steering.NONE);

    /** How a shrink is brought about. */
    enum Steering {
        /** MinHeapFreeRatio/MaxHeapFreeRatio plus collections: the heap uncommits after a full GC. */
        FREE_RATIOS,
        /** SoftMaxHeapSize: the collector keeps the heap under it and uncommits the rest. */
        SOFT_MAX,
        /** nothing to steer (Epsilon never collects; unknown collectors are left alone) */
        NONE
    }

    final String displayName;
    final Steering steering;

    GcKind(String displayName, Steering steering) {
        this.displayName = displayName;
        this.steering = steering;
    }

    static GcKind detect(List<GarbageCollectorMXBean> beans) {
        for (GarbageCollectorMXBean bean : beans) {
            String name = bean.getName();
            if (name.startsWith("G1 ")) {
                return G1;
            } else if (name.startsWith("PS ")) {
                return PARALLEL;
            } else if (name.equals("Copy") || name.equals("MarkSweepCompact")) {
                return SERIAL;
            } else if (name.startsWith("ZGC")) {
                return ZGC;
            } else if (name.startsWith("Shenandoah")) {
                return SHENANDOAH;
            } else if (name.startsWith("Epsilon")) {
                return EPSILON;
            }
        }
        return beans.isEmpty() ? EPSILON : UNKNOWN;
    }

    /**
     * The beans whose counts and times make up GcCount/GcTimeMillis: all of them, except that
     * ZGC's and Shenandoah's "Pauses" beans are left out when a "Cycles" bean covers the same
     * collections (counting both would count each collection twice).
     */
    static List<GarbageCollectorMXBean> counted(List<GarbageCollectorMXBean> beans) {
        boolean cycles = beans.stream().anyMatch(b -> b.getName().endsWith("Cycles"));
        if (!cycles) {
            return beans;
        }
        return beans.stream().filter(b -> !b.getName().endsWith("Pauses")).toList();
    }
}
