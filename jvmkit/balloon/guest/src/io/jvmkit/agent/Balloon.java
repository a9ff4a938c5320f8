package io.jvmkit.agent;

import io.jvmkit.Shrinker;
import java.lang.management.GarbageCollectorMXBean;
import java.lang.management.ManagementFactory;
import java.util.List;
import java.util.Locale;
import javax.management.InstanceAlreadyExistsException;
import javax.management.MBeanServer;
import javax.management.ObjectName;

/**
 * The MXBean implementation: heap and GC statistics, and shrink/grow operations that combine the
 * app's shrinker hooks ({@link Shrinker}) with {@link HeapSteering}. Operations run one at a time.
 */
public final class Balloon implements BalloonMXBean {
    private final HeapSteering steering;
    private final List<GarbageCollectorMXBean> counted;
    private volatile String lastShrink = "none";

    Balloon() {
        List<GarbageCollectorMXBean> beans = ManagementFactory.getGarbageCollectorMXBeans();
        this.counted = GcKind.counted(beans);
        this.steering = new HeapSteering(GcKind.detect(beans));
    }

    /** Create the balloon and register it in the platform MBean server (once per JVM). */
    static Balloon register() throws Exception {
        Balloon balloon = new Balloon();
        MBeanServer server = ManagementFactory.getPlatformMBeanServer();
        try {
            server.registerMBean(balloon, new ObjectName(OBJECT_NAME));
        } catch (InstanceAlreadyExistsException e) {
            Log.info(OBJECT_NAME + " is already registered (agent loaded twice?); keeping the first");
        }
        return balloon;
    }

    @Override
    public long getHeapUsed() {
        return steering.heapUsed();
    }

    @Override
    public long getHeapCommitted() {
        return steering.heapCommitted();
    }

    @Override
    public long getHeapMax() {
        return steering.heapMax();
    }

    @Override
    public String getGcName() {
        return steering.gc().displayName;
    }

    @Override
    public long getSoftTarget() {
        return steering.softTarget();
    }

    @Override
    public long getGcCount() {
        return sumOverCollectors(false);
    }

    @Override
    public long getGcTimeMillis() {
        return sumOverCollectors(true);
    }

    /** Collections (or their time in ms) summed over the counted collectors; a collector reports -1
     *  when it has no count. No lambda: the first one's bootstrap costs ~0.3 s in a TCG guest. */
    private long sumOverCollectors(boolean time) {
        long total = 0;
        for (GarbageCollectorMXBean bean : counted) {
            total += Math.max(0, time ? bean.getCollectionTime() : bean.getCollectionCount());
        }
        return total;
    }

    @Override
    public String getLastShrink() {
        return lastShrink;
    }

    @Override
    public synchronized long shrinkTo(long targetCommittedBytes) {
        long started = System.nanoTime();
        long wanted = steering.heapUsed() - targetCommittedBytes;
        Shrinker.Report hooks = wanted > 0 && targetCommittedBytes > 0
                ? Shrinker.runHooks(wanted) : new Shrinker.Report(0, List.of());
        HeapSteering.Result result = steering.shrinkTo(targetCommittedBytes);
        double seconds = (System.nanoTime() - started) / 1e9;
        lastShrink = String.format(Locale.ROOT, "target %s: committed %s -> %s, live %s, %s, %d GCs; hooks %s; %.1f s%s",
                Log.mib(targetCommittedBytes), Log.mib(result.committedBefore()),
                Log.mib(result.committedAfter()), Log.mib(result.liveAfter()), result.how(),
                result.collections(), hooks.summary(), seconds,
                result.note().isEmpty() ? "" : "; " + result.note());
        return result.committedAfter();
    }

    /**
     * Before a snapshot: collect and shrink the committed heap as far as steering goes (live heap
     * plus headroom), without the app's shrinker hooks: its caches are part of what a snapshot keeps.
     */
    synchronized HeapSteering.Result trimForSnapshot() {
        HeapSteering.Result result = steering.shrinkTo(1);
        lastShrink = "snapshot trim: committed " + Log.mib(result.committedBefore()) + " -> "
                + Log.mib(result.committedAfter()) + ", live " + Log.mib(result.liveAfter()) + ", " + result.how();
        return result;
    }

    @Override
    public synchronized long growTo(long targetBytes) {
        return steering.growTo(targetBytes).committedAfter();
    }
}
