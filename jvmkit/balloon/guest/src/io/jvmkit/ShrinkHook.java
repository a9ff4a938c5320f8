package io.jvmkit;

/**
 * A callback that gives memory back when the host asks the JVM to shrink.
 *
 * <p>Implementations drop what they can rebuild (caches, pooled buffers, precomputed tables) and
 * return how many bytes they let go of (an estimate is fine; 0 if nothing). They run on a worker
 * thread, must be thread-safe with respect to the rest of the application, and should return
 * quickly: a hook that takes longer than {@link Shrinker#HOOK_TIMEOUT_MILLIS} is abandoned for that
 * shrink (and skipped until it returns), a hook that throws is logged and skipped.
 */
@FunctionalInterface
public interface ShrinkHook {
    /**
     * Release up to {@code bytesWanted} bytes of heap.
     *
     * @param bytesWanted how much the JVM would like back (a hint, always &gt; 0)
     * @return the number of bytes released (negative values count as 0)
     */
    long release(long bytesWanted);
}
