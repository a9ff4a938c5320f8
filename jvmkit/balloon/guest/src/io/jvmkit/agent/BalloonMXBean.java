package io.jvmkit.agent;

/**
 * The guest agent's management interface, registered as {@code io.jvmkit:type=Balloon}.
 * All sizes are bytes. The host agent reads the attributes and calls the operations over JMX.
 */
public interface BalloonMXBean {
    String OBJECT_NAME = "io.jvmkit:type=Balloon";

    long getHeapUsed();

    long getHeapCommitted();

    /** The -Xmx ceiling; it never changes. */
    long getHeapMax();

    /** The collector in use: G1, Parallel, Serial, ZGC, Shenandoah, Epsilon or unknown. */
    String getGcName();

    /** The target of the last shrink while it is in force, -1 when none (at startup, after a full grow). */
    long getSoftTarget();

    /** Collections so far (cumulative). */
    long getGcCount();

    /** Milliseconds spent collecting so far (cumulative), to compute GC overhead between two reads. */
    long getGcTimeMillis();

    /** A short text on the last shrink: hooks, steering, committed before and after. */
    String getLastShrink();

    /**
     * Run the app's shrinker hooks (asking for heap used minus the target), then steer the
     * collector until committed heap is at or under the target, or no more can be freed. Never goes
     * below the live heap plus headroom.
     *
     * @return the committed heap achieved
     */
    long shrinkTo(long targetCommittedBytes);

    /**
     * Undo a shrink: restore the free ratios / soft limit in force at startup (for ZGC and
     * Shenandoah, raise the soft limit to {@code targetBytes}, or fully when it is at or above the
     * startup value). The heap then grows on demand up to -Xmx.
     *
     * @return the committed heap now
     */
    long growTo(long targetBytes);
}
