package io.jvmkit.agent;

import com.sun.management.HotSpotDiagnosticMXBean;
import com.sun.management.VMOption;
import java.lang.management.ManagementFactory;
import java.lang.management.MemoryMXBean;
import java.util.concurrent.TimeUnit;
import javax.management.MBeanServer;
import javax.management.ObjectName;

/**
 * The GC-steering logic: makes the heap's committed size follow a target, without touching -Xmx.
 *
 * <ul>
 *   <li>ZGC, Shenandoah: {@code SoftMaxHeapSize} is set to the target (never below the live heap
 *       plus headroom) and a collection runs; the collector uncommits what lies above it.
 *       Both uncommit only memory unused for a delay (ZUncommitDelay, ShenandoahUncommitDelay; 5
 *       minutes by default), so images using them should lower it (see {@link #awaitUncommit}).
 *   <li>G1, Serial, Parallel: a first full collection measures the live heap; then
 *       {@code MinHeapFreeRatio}/{@code MaxHeapFreeRatio} are lowered so that live heap plus the
 *       allowed free share comes to the target, and full collections run (a bounded number, until
 *       committed is at the target or stops falling: Serial shrinks in steps over several
 *       collections). Serial (and Shenandoah) never go below the initial heap size, so -Xms should
 *       be small. Parallel with its default adaptive sizing ignores the ratios after explicit
 *       collections: best effort only.
 * </ul>
 * Grow restores the ratios and the soft limit recorded when the agent started. All flags used here
 * are "manageable", set through HotSpotDiagnosticMXBean.
 */
final class HeapSteering {
    static final long MIB = 1L << 20;
    /** Headroom above the live heap that a shrink always leaves: max(16 MiB, live / 10). */
    static final long MIN_HEADROOM = 16 * MIB;
    /** The lowest MaxHeapFreeRatio a shrink sets (MinHeapFreeRatio goes to half of it). */
    static final int LOWEST_MAX_FREE = 10;
    static final int MAX_COLLECTIONS = 6;
    static final long TIME_BUDGET_NANOS = TimeUnit.SECONDS.toNanos(10);
    /** The longest uncommit delay (ms) a ZGC/Shenandoah shrink waits out; longer ones are noted. */
    static final long MAX_UNCOMMIT_DELAY_WAITED = 5000;

    /** What one shrink or grow did, for the MXBean's return value and LastShrink text. */
    record Result(long committedBefore, long committedAfter, long liveAfter, long softTarget,
                  int collections, String how, String note) {}

    private final GcKind gc;
    private final MemoryMXBean memory;
    private final HotSpotDiagnosticMXBean hotspot;
    /** Startup values, restored by grow. */
    private final int startMinFree;
    private final int startMaxFree;
    private final long startSoftMax;
    private final long minHeapSize;
    private volatile long softTarget = -1;

    HeapSteering(GcKind gc) {
        this.gc = gc;
        this.memory = ManagementFactory.getMemoryMXBean();
        this.hotspot = ManagementFactory.getPlatformMXBean(HotSpotDiagnosticMXBean.class);
        this.startMinFree = (int) flag("MinHeapFreeRatio", 40);
        this.startMaxFree = (int) flag("MaxHeapFreeRatio", 70);
        this.startSoftMax = flag("SoftMaxHeapSize", heapMax());
        this.minHeapSize = flag("MinHeapSize", 0);
    }

    GcKind gc() {
        return gc;
    }

    /** The target in force after the last shrink (bytes), -1 when none (startup or fully grown). */
    long softTarget() {
        return softTarget;
    }

    long heapUsed() {
        return memory.getHeapMemoryUsage().getUsed();
    }

    long heapCommitted() {
        return memory.getHeapMemoryUsage().getCommitted();
    }

    long heapMax() {
        long max = memory.getHeapMemoryUsage().getMax();
        return max > 0 ? max : Runtime.getRuntime().maxMemory();
    }

    /** How far above its goal a shrink counts as done (heap regions and generations are coarse). */
    static long slack(long goal) {
        return Math.max(4 * MIB, goal / 20);
    }

    /** The lowest committed size a shrink may aim at for a given live heap. */
    long floor(long live) {
        return Math.max(minHeapSize, live + Math.max(MIN_HEADROOM, live / 10));
    }

    synchronized Result shrinkTo(long target) {
        if (target <= 0) {
            throw new IllegalArgumentException("target must be > 0 bytes, got " + target);
        }
        return switch (gc.steering) {
            case FREE_RATIOS -> shrinkWithRatios(target);
            case SOFT_MAX -> shrinkWithSoftMax(target);
            case NONE -> new Result(heapCommitted(), heapCommitted(), heapUsed(), softTarget, 0,
                    "none", "the " + gc.displayName + " collector cannot be steered");
        };
    }

    synchronized Result growTo(long target) {
        long before = heapCommitted();
        String how;
        switch (gc.steering) {
            case FREE_RATIOS -> {
                setRatios(startMinFree, startMaxFree);
                softTarget = -1;
                how = "free ratios " + startMinFree + "/" + startMaxFree;
            }
            case SOFT_MAX -> {
                long current = softTarget > 0 ? softTarget : startSoftMax;
                long soft = target > 0 ? Math.min(startSoftMax, Math.max(current, target)) : startSoftMax;
                setFlag("SoftMaxHeapSize", soft);
                softTarget = soft >= startSoftMax ? -1 : soft;
                how = "SoftMaxHeapSize " + Log.mib(soft);
            }
            default -> how = "none";
        }
        return new Result(before, heapCommitted(), heapUsed(), softTarget, 0, how, "");
    }

    private Result shrinkWithRatios(long target) {
        long deadline = System.nanoTime() + TIME_BUDGET_NANOS;
        long before = heapCommitted();
        // The first collection runs with the ratios as they are: it tells us the live heap, which
        // the ratios for the target depend on (and may already reach the target).
        collect();
        int collections = 1;
        long live = heapUsed();
        long committed = heapCommitted();
        long goal = Math.max(target, floor(live));
        int minFree = currentInt("MinHeapFreeRatio", startMinFree);
        int maxFree = currentInt("MaxHeapFreeRatio", startMaxFree);
        int stalled = 0;
        while (committed > goal + slack(goal) && collections < MAX_COLLECTIONS && System.nanoTime() < deadline) {
            maxFree = (int) Math.floor(100.0 * (1.0 - (double) live / goal));
            maxFree = Math.max(LOWEST_MAX_FREE, Math.min(maxFree, Math.max(startMaxFree, LOWEST_MAX_FREE)));
            minFree = Math.min(startMinFree, maxFree / 2);
            setRatios(minFree, maxFree);
            collect();
            collections++;
            long now = heapCommitted();
            live = heapUsed();
            goal = Math.max(target, floor(live));
            stalled = now < committed ? 0 : stalled + 1;
            committed = now;
            if (stalled >= 2) {
                break;
            }
        }
        softTarget = goal;
        return new Result(before, committed, live, goal, collections, "free ratios " + minFree + "/" + maxFree,
                committed > goal + slack(goal) ? limitNote(goal) : "");
    }

    private Result shrinkWithSoftMax(long target) {
        long before = heapCommitted();
        collect();
        long live = heapUsed();
        long soft = Math.min(heapMax(), Math.max(target, floor(live)));
        setFlag("SoftMaxHeapSize", soft);
        softTarget = soft;
        collect(); // a cycle under the new limit; the collector uncommits in the background
        long committed = awaitUncommit(soft);
        return new Result(before, committed, live, soft, 2, "SoftMaxHeapSize " + Log.mib(soft),
                committed > soft ? limitNote(soft) : "");
    }

    /**
     * Wait (bounded) for the collector to uncommit down to {@code goal}. Both collectors uncommit
     * memory that has stayed unused for a delay (ZUncommitDelay seconds, ShenandoahUncommitDelay
     * milliseconds; 5 minutes by default), ZGC since JDK 25 in paced steps; Shenandoah before
     * JDK 25 also right after an explicit collection. A short delay is waited out (plus time for the
     * steps); with a long one, ZGC returns at once and Shenandoah waits briefly.
     */
    private long awaitUncommit(long goal) {
        long delayMillis = uncommitDelayMillis();
        long waitMillis;
        long stallMillis;
        if (delayMillis <= MAX_UNCOMMIT_DELAY_WAITED) {
            waitMillis = Math.min(delayMillis + 5000, 8000);
            stallMillis = delayMillis + 2000;
        } else if (gc == GcKind.SHENANDOAH) {
            waitMillis = 3000;
            stallMillis = 1000;
        } else {
            return heapCommitted();
        }
        long started = System.nanoTime();
        long deadline = started + TimeUnit.MILLISECONDS.toNanos(waitMillis);
        long committed = heapCommitted();
        long lastChange = started;
        while (committed > goal && System.nanoTime() < deadline) {
            sleep(100);
            long now = heapCommitted();
            if (now < committed) {
                lastChange = System.nanoTime();
            } else if (System.nanoTime() - lastChange > TimeUnit.MILLISECONDS.toNanos(stallMillis)) {
                break;
            }
            committed = now;
        }
        return committed;
    }

    /** ZUncommitDelay or ShenandoahUncommitDelay (experimental, so read from the command line). */
    private long uncommitDelayMillis() {
        if (gc == GcKind.ZGC) {
            return flag("ZUncommitDelay", 300) * 1000;
        }
        String prefix = "-XX:ShenandoahUncommitDelay=";
        long delay = 300_000;
        for (String arg : ManagementFactory.getRuntimeMXBean().getInputArguments()) {
            if (arg.startsWith(prefix)) {
                try {
                    delay = Long.parseLong(arg.substring(prefix.length()));
                } catch (NumberFormatException e) {
                    // keep the default
                }
            }
        }
        return delay;
    }

    /** Why committed stayed above the goal, as far as the flags tell. */
    private String limitNote(long goal) {
        long initial = flag("InitialHeapSize", 0);
        if (minHeapSize > goal) {
            return "the minimum heap size (-Xms) is " + Log.mib(minHeapSize);
        } else if (gc == GcKind.PARALLEL && flag("UseAdaptiveSizePolicy", true)) {
            return "Parallel's adaptive sizing ignores the free ratios (-XX:-UseAdaptiveSizePolicy lets them work)";
        } else if ((gc == GcKind.SERIAL || gc == GcKind.PARALLEL || gc == GcKind.SHENANDOAH) && initial > goal) {
            return gc.displayName + " keeps the initial heap size " + Log.mib(initial) + " (lower -Xms)";
        } else if (gc == GcKind.ZGC && uncommitDelayMillis() > MAX_UNCOMMIT_DELAY_WAITED) {
            return "ZGC uncommits after ZUncommitDelay=" + uncommitDelayMillis() / 1000 + "s (lower it)";
        } else if (gc == GcKind.SHENANDOAH && uncommitDelayMillis() > MAX_UNCOMMIT_DELAY_WAITED) {
            return "Shenandoah uncommits after ShenandoahUncommitDelay=" + uncommitDelayMillis() + "ms (lower it)";
        }
        return "the heap would not shrink further";
    }

    /**
     * Set both free ratios, in the order that keeps MinHeapFreeRatio &lt;= MaxHeapFreeRatio at
     * every step (the JVM refuses either flag otherwise).
     */
    void setRatios(int minFree, int maxFree) {
        int currentMax = currentInt("MaxHeapFreeRatio", startMaxFree);
        if (minFree <= currentMax) {
            setFlag("MinHeapFreeRatio", minFree);
            setFlag("MaxHeapFreeRatio", maxFree);
        } else {
            setFlag("MaxHeapFreeRatio", maxFree);
            setFlag("MinHeapFreeRatio", minFree);
        }
    }

    /**
     * A full collection through the DiagnosticCommand MBean (GC.run; unlike System.gc() it works
     * under -XX:+DisableExplicitGC), falling back to System.gc().
     */
    static void collect() {
        try {
            MBeanServer server = ManagementFactory.getPlatformMBeanServer();
            server.invoke(new ObjectName("com.sun.management:type=DiagnosticCommand"), "gcRun",
                    new Object[] {new String[0]}, new String[] {String[].class.getName()});
        } catch (Exception | LinkageError e) {
            System.gc();
        }
    }

    private void setFlag(String name, long value) {
        try {
            hotspot.setVMOption(name, Long.toString(value));
        } catch (RuntimeException e) {
            Log.problem("cannot set " + name + "=" + value, e);
        }
    }

    private long flag(String name, long fallback) {
        try {
            VMOption option = hotspot.getVMOption(name);
            return Long.parseLong(option.getValue());
        } catch (RuntimeException e) {
            return fallback;
        }
    }

    private boolean flag(String name, boolean fallback) {
        try {
            return Boolean.parseBoolean(hotspot.getVMOption(name).getValue());
        } catch (RuntimeException e) {
            return fallback;
        }
    }

    private int currentInt(String name, int fallback) {
        return (int) flag(name, fallback);
    }

    private static void sleep(long millis) {
        try {
            Thread.sleep(millis);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
