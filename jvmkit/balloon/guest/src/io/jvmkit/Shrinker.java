package io.jvmkit;

import java.util.ArrayList;
import java.util.Collections;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.concurrent.Callable;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.FutureTask;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.function.LongSupplier;

/**
 * The shrinker API for applications: register hooks that give heap back when jvmkit's balloon
 * asks the JVM to shrink (OSv's shrinker idea, lifted to the application).
 *
 * <pre>{@code
 * Shrinker.register("image-cache", wanted -> cache.evictBytes(wanted), cache::sizeInBytes);
 * }</pre>
 *
 * <p>On a shrink, hooks run one at a time, largest size estimate first (hooks without an
 * estimate last, in registration order), until the wanted amount is released. Each hook runs on
 * its own daemon thread and is bounded in time; a hook that throws or does not finish in time is
 * logged to stderr (prefix {@code jvmkit-agent:}) and skipped, and a hook still running from an
 * earlier shrink is not started again. Nothing a hook does can make a shrink fail.
 *
 * <p>This class is in {@code shrinker-api.jar} (compile against it) and in jvmkit's guest agent
 * jar, which the JVM puts on the system class path; without the agent, registering is harmless
 * and hooks simply never run.
 */
public final class Shrinker {
    /** How long one hook may run before it is abandoned for the current shrink. */
    public static final long HOOK_TIMEOUT_MILLIS = 2000;
    /** How long size estimates may take, all together, before they count as 0. */
    public static final long ESTIMATE_TIMEOUT_MILLIS = 250;
    /** The time budget for all hooks of one shrink. */
    public static final long TOTAL_TIMEOUT_MILLIS = 8000;

    private static final Map<String, Hook> HOOKS = new LinkedHashMap<>();

    private Shrinker() {}

    /** Register (or replace) the hook called {@code name}, without a size estimate. */
    public static void register(String name, ShrinkHook hook) {
        register(name, hook, null);
    }

    /**
     * Register (or replace) the hook called {@code name}.
     *
     * @param sizeEstimate how many bytes the hook could release right now (used to run the largest
     *     first; may be null). It is called on a worker thread and must be cheap.
     */
    public static void register(String name, ShrinkHook hook, LongSupplier sizeEstimate) {
        Objects.requireNonNull(name, "name");
        Objects.requireNonNull(hook, "hook");
        synchronized (HOOKS) {
            HOOKS.remove(name);
            HOOKS.put(name, new Hook(name, hook, sizeEstimate));
        }
    }

    /** Remove the hook called {@code name}; returns whether there was one. */
    public static boolean unregister(String name) {
        synchronized (HOOKS) {
            return HOOKS.remove(name) != null;
        }
    }

    /** The names of the registered hooks, in registration order. */
    public static List<String> names() {
        synchronized (HOOKS) {
            return List.copyOf(HOOKS.keySet());
        }
    }

    /** What one run of the hooks did. */
    public record Report(long released, List<String> outcomes) {
        /** A short text: total and one entry per hook, e.g. {@code 12M (cache=12M, bad=threw ...)}. */
        public String summary() {
            if (outcomes.isEmpty()) {
                return "no hooks";
            }
            return mib(released) + " (" + String.join(", ", outcomes) + ")";
        }
    }

    /** Run the hooks with the default time bounds (what the jvmkit agent does on a shrink). */
    public static Report runHooks(long bytesWanted) {
        return runHooks(bytesWanted, HOOK_TIMEOUT_MILLIS, TOTAL_TIMEOUT_MILLIS);
    }

    /**
     * Run the hooks, largest estimate first, until {@code bytesWanted} bytes are released, each
     * bounded by {@code hookTimeoutMillis} and all of them by {@code totalTimeoutMillis}.
     */
    public static Report runHooks(long bytesWanted, long hookTimeoutMillis, long totalTimeoutMillis) {
        List<Hook> hooks;
        synchronized (HOOKS) {
            hooks = new ArrayList<>(HOOKS.values());
        }
        List<String> outcomes = new ArrayList<>();
        if (bytesWanted <= 0 || hooks.isEmpty()) {
            return new Report(0, outcomes);
        }
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(totalTimeoutMillis);
        List<Hook> ordered = orderBySize(hooks, outcomes);
        long released = 0;
        for (Hook hook : ordered) {
            if (released >= bytesWanted) {
                break;
            }
            if (hook.running != null) {
                outcomes.add(hook.name + "=busy");
                continue;
            }
            long left = TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime());
            if (left <= 0) {
                outcomes.add(hook.name + "=no time left");
                continue;
            }
            long wanted = bytesWanted - released;
            Outcome<Long> out = hook.bounded("release", () -> hook.hook.release(wanted),
                    Math.min(hookTimeoutMillis, left));
            if (out.ok()) {
                long got = Math.max(0, out.value());
                released += got;
                outcomes.add(hook.name + "=" + mib(got));
            } else {
                outcomes.add(hook.name + "=" + out.problem());
                log("shrinker hook '" + hook.name + "' " + out.problem() + "; skipped");
            }
        }
        return new Report(released, outcomes);
    }

    /** Hooks ordered by size estimate, largest first; estimates run in parallel, bounded. */
    private static List<Hook> orderBySize(List<Hook> hooks, List<String> outcomes) {
        if (hooks.size() == 1) {
            return hooks;
        }
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(ESTIMATE_TIMEOUT_MILLIS);
        Map<Hook, FutureTask<Long>> pending = new LinkedHashMap<>();
        for (Hook hook : hooks) {
            if (hook.estimate != null && hook.running == null) {
                pending.put(hook, hook.start("estimate", hook.estimate::getAsLong));
            }
        }
        Map<Hook, Long> sizes = new LinkedHashMap<>();
        for (Map.Entry<Hook, FutureTask<Long>> e : pending.entrySet()) {
            Outcome<Long> out = await(e.getValue(), deadline - System.nanoTime());
            if (out.ok()) {
                sizes.put(e.getKey(), Math.max(0, out.value()));
            } else {
                log("shrinker hook '" + e.getKey().name + "' estimate " + out.problem());
            }
        }
        List<Hook> ordered = new ArrayList<>(hooks);
        // stable sort: equal (or missing) estimates keep registration order
        ordered.sort(Comparator.comparingLong((Hook h) -> sizes.getOrDefault(h, -1L)).reversed());
        return Collections.unmodifiableList(ordered);
    }

    private record Outcome<T>(T value, String problem) {
        boolean ok() {
            return problem == null;
        }
    }

    private static <T> Outcome<T> await(FutureTask<T> task, long timeoutNanos) {
        try {
            return new Outcome<>(task.get(Math.max(0, timeoutNanos), TimeUnit.NANOSECONDS), null);
        } catch (TimeoutException e) {
            return new Outcome<>(null, "timed out");
        } catch (ExecutionException e) {
            return new Outcome<>(null, "threw " + e.getCause());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return new Outcome<>(null, "interrupted");
        }
    }

    private static final class Hook {
        final String name;
        final ShrinkHook hook;
        final LongSupplier estimate;
        /** The worker still running this hook (release or estimate), if any. */
        volatile Thread running;

        Hook(String name, ShrinkHook hook, LongSupplier estimate) {
            this.name = name;
            this.hook = hook;
            this.estimate = estimate;
        }

        /** Start {@code task} on a fresh daemon thread; {@link #running} is set until it returns. */
        <T> FutureTask<T> start(String what, Callable<T> task) {
            FutureTask<T> future = new FutureTask<>(() -> {
                try {
                    return task.call();
                } finally {
                    running = null;
                }
            });
            Thread worker = new Thread(future, "jvmkit-shrink-" + name + "-" + what);
            worker.setDaemon(true);
            worker.setContextClassLoader(hook.getClass().getClassLoader());
            running = worker;
            worker.start();
            return future;
        }

        <T> Outcome<T> bounded(String what, Callable<T> task, long timeoutMillis) {
            FutureTask<T> future = start(what, task);
            Outcome<T> out = await(future, TimeUnit.MILLISECONDS.toNanos(timeoutMillis));
            if (!out.ok() && "timed out".equals(out.problem())) {
                Thread worker = running;
                if (worker != null) {
                    worker.interrupt(); // a polite request; a hook that ignores it stays "busy"
                }
                return new Outcome<>(null, "did not finish in " + timeoutMillis + " ms");
            }
            return out;
        }
    }

    static String mib(long bytes) {
        return String.format(java.util.Locale.ROOT, "%.1fM", bytes / 1048576.0);
    }

    private static void log(String message) {
        System.err.println("jvmkit-agent: " + message);
    }
}
