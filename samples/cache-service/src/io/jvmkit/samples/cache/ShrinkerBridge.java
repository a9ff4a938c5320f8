package io.jvmkit.samples.cache;

import io.jvmkit.Shrinker;

import java.util.concurrent.atomic.AtomicLong;

/**
 * Everything that touches jvmkit's Shrinker API, in one class, so the service still runs (without
 * a hook) when neither jvmkit's agent nor shrinker-api.jar is on the class path: loading this
 * class then fails with NoClassDefFoundError, which {@link CacheService} catches.
 */
final class ShrinkerBridge {
    static final String HOOK_NAME = "cache-service";

    final AtomicLong shrinks = new AtomicLong();
    final AtomicLong releasedTotal = new AtomicLong();
    private final LruCache cache;

    ShrinkerBridge(LruCache cache) {
        this.cache = cache;
    }

    /** Register the hook: on a shrink, evict least-recently-used entries until the wanted bytes are freed. */
    void register() {
        Shrinker.register(HOOK_NAME, this::release, cache::bytes);
    }

    private long release(long wanted) {
        LruCache.Evicted e = cache.evictBytes(wanted);
        shrinks.incrementAndGet();
        releasedTotal.addAndGet(e.bytes());
        CacheService.log(String.format(java.util.Locale.ROOT,
                "shrink asked %.1f MiB, released %.1f MiB (%d entries); cache now %.1f MiB",
                wanted / 1048576.0, e.bytes() / 1048576.0, e.entries(), cache.bytes() / 1048576.0));
        return e.bytes();
    }

    /** Run every registered hook as jvmkit's agent does on a shrink (for trying it without a VM). */
    static String runHooks(long wanted) {
        Shrinker.Report report = Shrinker.runHooks(wanted);
        return "{\"wanted\":" + wanted + ",\"released\":" + report.released()
                + ",\"summary\":" + CacheService.quote(report.summary()) + "}";
    }
}
