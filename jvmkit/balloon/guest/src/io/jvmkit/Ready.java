package io.jvmkit;

import java.util.ArrayList;
import java.util.List;
import java.util.Objects;

/**
 * Snapshot hooks for applications, in the spirit of CRaC's Resource API: {@code jvmkit snapshot}
 * boots the image, waits until the app is ready, and saves the whole VM; {@code jvmkit run} then
 * restores that VM instead of booting it. Every restored VM starts from the same memory, so what
 * the app computed before the snapshot from randomness or the clock is the same in all of them.
 *
 * <pre>{@code
 * Ready.register(new Ready.Resource() {
 *     public void afterRestore() { sessionKey = newKey(); startedAt = Instant.now(); }
 * });
 * Ready.signal();   // initialised: a snapshot may be taken now
 * }</pre>
 *
 * <ul>
 *   <li>{@link #signal()} tells {@code jvmkit snapshot} (without {@code --ready-port},
 *       {@code --ready-line} or {@code --ready-after}) that the app is ready;
 *   <li>{@link Resource#beforeSnapshot()} runs, in reverse registration order, after the app is
 *       ready and before the heap is trimmed and the VM saved; an exception aborts the snapshot
 *       ({@code jvmkit snapshot} fails with its message);
 *   <li>{@link Resource#afterRestore()} runs, in registration order, in every VM restored from the
 *       snapshot, after jvmkit's guest agent has mixed fresh entropy into the JVM's default
 *       {@code SecureRandom} and corrected the wall clock where the guest can set it, and before
 *       the app's published ports are reachable from the host. An exception is logged
 *       ({@code jvmkit-agent:} on stderr) and the next hook runs.
 * </ul>
 *
 * <p>Without jvmkit's guest agent (an ordinary {@code jvmkit run}, or plain {@code java}),
 * {@code signal()} does nothing and the hooks are never called. Resources are held strongly
 * until {@link #unregister}. This class is in {@code shrinker-api.jar} (compile against it) and in
 * every image.
 */
public final class Ready {
    /** Something the app must refresh when its VM is restored from a snapshot. */
    public interface Resource {
        /** Before the snapshot is taken: release what must not be saved (connections, secrets). */
        default void beforeSnapshot() throws Exception {}

        /** In each restored VM: renew what must differ between VMs or follow the clock. */
        default void afterRestore() throws Exception {}
    }

    private static final Object LOCK = new Object();
    private static final List<Resource> RESOURCES = new ArrayList<>();
    private static boolean signalled;
    private static int restores;
    private static long clockLagMillis;

    private Ready() {}

    /** The app is ready: {@code jvmkit snapshot} (waiting for this signal) may take the snapshot. */
    public static void signal() {
        synchronized (LOCK) {
            signalled = true;
            LOCK.notifyAll();
        }
    }

    /** Register a resource (once; registering it again changes nothing). */
    public static void register(Resource resource) {
        Objects.requireNonNull(resource, "resource");
        synchronized (LOCK) {
            if (!RESOURCES.contains(resource)) {
                RESOURCES.add(resource);
            }
        }
    }

    /** Remove a resource; returns whether it was registered. */
    public static boolean unregister(Resource resource) {
        synchronized (LOCK) {
            return RESOURCES.remove(resource);
        }
    }

    /** Whether this JVM was restored from a snapshot (at least once). */
    public static boolean isRestored() {
        synchronized (LOCK) {
            return restores > 0;
        }
    }

    /**
     * How far the guest's wall clock was behind the host's at the last restore and still is,
     * in milliseconds: 0 where the guest agent could set the clock (linux guests), else the time
     * the snapshot spent on disk (an OSv guest under TCG cannot set its clock). 0 before a restore.
     */
    public static long clockLagMillis() {
        synchronized (LOCK) {
            return clockLagMillis;
        }
    }

    // ---- for jvmkit's guest agent (io.jvmkit.agent); applications do not call these ----

    /** Wait until {@link #signal()} was called; false when {@code timeoutMillis} passed first (0: no limit). */
    public static boolean awaitSignal(long timeoutMillis) throws InterruptedException {
        long deadline = System.nanoTime() + timeoutMillis * 1_000_000L;
        synchronized (LOCK) {
            while (!signalled) {
                long left = timeoutMillis == 0 ? 0 : (deadline - System.nanoTime()) / 1_000_000L;
                if (timeoutMillis != 0 && left <= 0) {
                    return false;
                }
                LOCK.wait(left);
            }
            return true;
        }
    }

    /** Run every {@code beforeSnapshot}, last registered first; the first failure stops it and is thrown. */
    public static void runBeforeSnapshot() throws Exception {
        List<Resource> resources = snapshot();
        for (int i = resources.size() - 1; i >= 0; i--) {
            Resource resource = resources.get(i);
            try {
                resource.beforeSnapshot();
            } catch (Exception e) {
                throw new Exception("beforeSnapshot of " + resource.getClass().getName() + " failed: " + e, e);
            }
        }
    }

    /** Record a restore and run every {@code afterRestore} in registration order; returns the failures. */
    public static List<String> runAfterRestore(long lagMillis) {
        synchronized (LOCK) {
            restores++;
            clockLagMillis = Math.max(0, lagMillis);
        }
        List<String> failures = new ArrayList<>();
        for (Resource resource : snapshot()) {
            try {
                resource.afterRestore();
            } catch (Exception | LinkageError e) {
                failures.add("afterRestore of " + resource.getClass().getName() + " failed: " + e);
            }
        }
        return failures;
    }

    private static List<Resource> snapshot() {
        synchronized (LOCK) {
            return new ArrayList<>(RESOURCES);
        }
    }
}
