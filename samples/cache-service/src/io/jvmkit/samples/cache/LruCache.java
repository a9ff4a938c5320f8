package io.jvmkit.samples.cache;

import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * A byte[] cache keyed by string, bounded in bytes, evicting least-recently-used entries first.
 * Thread-safe (one lock; the operations are short).
 */
final class LruCache {
    /** What one eviction run did. */
    record Evicted(long bytes, int entries) {
    }

    private final LinkedHashMap<String, byte[]> map = new LinkedHashMap<>(256, 0.75f, true);
    private final long maxBytes;
    private long bytes;
    private long hits;
    private long misses;
    private long capacityEvictions;

    LruCache(long maxBytes) {
        this.maxBytes = maxBytes;
    }

    /** The value of {@code key} (counting a hit), or null (counting a miss). */
    synchronized byte[] get(String key) {
        byte[] value = map.get(key);
        if (value == null) {
            misses++;
        } else {
            hits++;
        }
        return value;
    }

    /** Store {@code value}; evicts least-recently-used entries to stay within the byte bound. */
    synchronized void put(String key, byte[] value) {
        if (value.length > maxBytes) {
            return; // never cacheable
        }
        byte[] old = map.put(key, value);
        bytes += value.length - (old == null ? 0 : old.length);
        if (bytes > maxBytes) {
            capacityEvictions += evictLocked(bytes - maxBytes).entries();
        }
    }

    /**
     * Evict least-recently-used entries until at least {@code wanted} bytes are released (or the
     * cache is empty); what the shrinker hook calls.
     */
    synchronized Evicted evictBytes(long wanted) {
        return evictLocked(wanted);
    }

    private Evicted evictLocked(long wanted) {
        long released = 0;
        int entries = 0;
        Iterator<Map.Entry<String, byte[]>> it = map.entrySet().iterator(); // eldest (least recent) first
        while (released < wanted && it.hasNext()) {
            released += it.next().getValue().length;
            it.remove();
            entries++;
        }
        bytes -= released;
        return new Evicted(released, entries);
    }

    /** Drop everything; returns the bytes released. */
    synchronized Evicted clear() {
        Evicted e = new Evicted(bytes, map.size());
        map.clear();
        bytes = 0;
        return e;
    }

    synchronized long bytes() {
        return bytes;
    }

    synchronized int size() {
        return map.size();
    }

    long maxBytes() {
        return maxBytes;
    }

    synchronized long hits() {
        return hits;
    }

    synchronized long misses() {
        return misses;
    }

    synchronized long capacityEvictions() {
        return capacityEvictions;
    }
}
