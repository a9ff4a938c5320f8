package io.jvmkit.samples.cache;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.Locale;
import java.util.Map;
import java.util.Random;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

/**
 * jvmkit's balloon showcase: an HTTP service with an in-memory cache that gives memory back when
 * the balloon asks (a hook registered with {@code io.jvmkit.Shrinker}) and refills under load.
 *
 * <p>Usage: {@code CacheService [--port N] [--max-cache-mb N] [--item-kb N]}; the port may also
 * come from {@code PORT} (default 8080). {@code --max-cache-mb} bounds the cache (default: half of
 * the maximum heap); {@code --item-kb} is the default item size (64). Prints
 * {@code cache-service listening on port PORT} once it accepts connections.
 *
 * <pre>
 * GET  /item/KEY[?kb=N]   the item's bytes; a miss generates them (N KiB, deterministic per key)
 *                         and caches them. Header X-Cache: hit|miss
 * POST /fill?mb=N[&amp;item_kb=K]  add N MiB of fresh items (K KiB each, default 256) -> stats
 * POST /drop[?gc=1]       empty the cache (and run System.gc()) -> {"released":..} + stats
 * POST /shrink?mb=N       run the registered shrinker hooks as jvmkit's agent does on a balloon
 *                         shrink (to try the hook without a VM) -> {"released":..,"summary":..}
 * GET  /stats             {"entries","cache_bytes","max_cache_bytes","hits","misses",
 *                          "capacity_evictions","shrinks","shrink_released_bytes","hook",
 *                          "heap_used","heap_committed","heap_max","uptime_ms"}
 * GET  /health            {"status":"ok"}
 * POST /shutdown          {"status":"stopping"}, then the JVM exits with status 0
 * </pre>
 *
 * <p>Item sizes: with G1 and a small heap (region size 1 MiB), an array of half a region or more is
 * "humongous" and takes whole regions, so 1 MiB items cost 2 MiB of heap. The defaults (256 KiB
 * fills, 64 KiB items) stay below that.
 */
public final class CacheService {
    private static final int MAX_ITEM_KB = 16 * 1024;
    private static final int MAX_FILL_MB = 4096;

    private final LruCache cache;
    private final int defaultItemKb;
    private final ShrinkerBridge bridge; // null when the Shrinker API is not on the class path
    private final AtomicLong fillCounter = new AtomicLong();
    private final CountDownLatch stop = new CountDownLatch(1);
    private final long started = System.nanoTime();

    private CacheService(long maxCacheBytes, int defaultItemKb) {
        this.cache = new LruCache(maxCacheBytes);
        this.defaultItemKb = defaultItemKb;
        this.bridge = registerHook(cache);
    }

    private static ShrinkerBridge registerHook(LruCache cache) {
        try {
            ShrinkerBridge b = new ShrinkerBridge(cache);
            b.register();
            log("shrinker hook '" + ShrinkerBridge.HOOK_NAME + "' registered");
            return b;
        } catch (NoClassDefFoundError e) {
            log("io.jvmkit.Shrinker is not on the class path (no jvmkit agent, no shrinker-api.jar): "
                    + "running without a shrinker hook");
            return null;
        }
    }

    public static void main(String[] args) throws Exception {
        String env = System.getenv("PORT");
        int port = env == null || env.isBlank() ? 8080 : Integer.parseInt(env.strip());
        long maxCache = Runtime.getRuntime().maxMemory() / 2;
        int itemKb = 64;
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            String v = i + 1 < args.length ? args[i + 1] : null;
            if (a.equals("--port") && v != null) {
                port = Integer.parseInt(v);
            } else if (a.equals("--max-cache-mb") && v != null) {
                maxCache = Long.parseLong(v) << 20;
            } else if (a.equals("--item-kb") && v != null) {
                itemKb = Math.max(1, Math.min(MAX_ITEM_KB, Integer.parseInt(v)));
            } else {
                System.err.println("cache-service: unknown or incomplete argument " + a);
                System.err.println("usage: cache-service [--port N] [--max-cache-mb N] [--item-kb N]");
                System.exit(2);
            }
            i++;
        }
        System.exit(new CacheService(maxCache, itemKb).serve(port));
    }

    private int serve(int port) throws IOException, InterruptedException {
        HttpServer server = HttpServer.create(new InetSocketAddress(port), 64);
        ExecutorService workers = Executors.newFixedThreadPool(4);
        server.setExecutor(workers);
        server.createContext("/", this::handle);
        server.start();
        log(String.format(Locale.ROOT, "cache bound %.0f MiB, heap max %.0f MiB",
                cache.maxBytes() / 1048576.0, Runtime.getRuntime().maxMemory() / 1048576.0));
        System.out.println("cache-service listening on port " + server.getAddress().getPort());
        System.out.flush();
        stop.await();
        server.stop(1);
        workers.shutdown();
        workers.awaitTermination(5, TimeUnit.SECONDS);
        log("stopped");
        return 0;
    }

    private void handle(HttpExchange ex) throws IOException {
        try {
            route(ex, ex.getRequestMethod(), ex.getRequestURI().getPath(), query(ex.getRequestURI().getRawQuery()));
        } catch (BadRequest e) {
            json(ex, 400, "{\"error\":" + quote(e.getMessage()) + "}");
        } catch (RuntimeException | OutOfMemoryError e) {
            json(ex, 500, "{\"error\":" + quote("internal error: " + e) + "}");
        } finally {
            ex.close();
        }
    }

    private void route(HttpExchange ex, String method, String path, Map<String, String> q) throws IOException {
        if (path.startsWith("/item/") && method.equals("GET")) {
            String key = path.substring("/item/".length());
            if (key.isEmpty() || key.length() > 200) {
                throw new BadRequest("the key must be 1-200 characters");
            }
            byte[] value = cache.get(key);
            boolean hit = value != null;
            if (!hit) {
                value = generate(key, intParam(q, "kb", defaultItemKb, 1, MAX_ITEM_KB) * 1024);
                cache.put(key, value);
            }
            ex.getResponseHeaders().set("X-Cache", hit ? "hit" : "miss");
            send(ex, 200, "application/octet-stream", value);
        } else if (path.equals("/fill") && method.equals("POST")) {
            int mb = intParam(q, "mb", 0, 0, MAX_FILL_MB);
            int itemKb = intParam(q, "item_kb", 256, 1, MAX_ITEM_KB);
            long want = (long) mb << 20;
            for (long added = 0; added < want; added += itemKb * 1024L) {
                String key = "fill-" + fillCounter.incrementAndGet();
                cache.put(key, generate(key, (int) Math.min(itemKb * 1024L, want - added)));
            }
            json(ex, 200, stats());
        } else if (path.equals("/drop") && method.equals("POST")) {
            LruCache.Evicted e = cache.clear();
            if ("1".equals(q.get("gc"))) {
                System.gc();
            }
            log(String.format(Locale.ROOT, "dropped %.1f MiB (%d entries)", e.bytes() / 1048576.0, e.entries()));
            json(ex, 200, "{\"released\":" + e.bytes() + ",\"entries\":" + e.entries() + ",\"stats\":" + stats() + "}");
        } else if (path.equals("/shrink") && method.equals("POST")) {
            long wanted = (long) intParam(q, "mb", 0, 1, MAX_FILL_MB) << 20;
            if (bridge == null) {
                json(ex, 409, "{\"error\":\"no shrinker hook: io.jvmkit.Shrinker is not on the class path\"}");
            } else {
                json(ex, 200, ShrinkerBridge.runHooks(wanted));
            }
        } else if (path.equals("/stats") && method.equals("GET")) {
            json(ex, 200, stats());
        } else if (path.equals("/health") && method.equals("GET")) {
            json(ex, 200, "{\"status\":\"ok\"}");
        } else if (path.equals("/shutdown") && method.equals("POST")) {
            json(ex, 200, "{\"status\":\"stopping\"}");
            stop.countDown();
        } else {
            json(ex, 404, "{\"error\":" + quote("not found: " + method + " " + path) + "}");
        }
    }

    /** The stats as one JSON object (also what load.py samples). */
    private String stats() {
        Runtime rt = Runtime.getRuntime();
        long committed = rt.totalMemory();
        long used = committed - rt.freeMemory();
        return "{\"entries\":" + cache.size()
                + ",\"cache_bytes\":" + cache.bytes()
                + ",\"max_cache_bytes\":" + cache.maxBytes()
                + ",\"hits\":" + cache.hits()
                + ",\"misses\":" + cache.misses()
                + ",\"capacity_evictions\":" + cache.capacityEvictions()
                + ",\"shrinks\":" + (bridge == null ? 0 : bridge.shrinks.get())
                + ",\"shrink_released_bytes\":" + (bridge == null ? 0 : bridge.releasedTotal.get())
                + ",\"hook\":" + (bridge != null)
                + ",\"heap_used\":" + used
                + ",\"heap_committed\":" + committed
                + ",\"heap_max\":" + rt.maxMemory()
                + ",\"uptime_ms\":" + TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - started)
                + "}";
    }

    /** Deterministic content for {@code key}: the same key always regenerates the same bytes. */
    private static byte[] generate(String key, int size) {
        byte[] data = new byte[size];
        new Random(key.hashCode() * 0x9E3779B97F4A7C15L).nextBytes(data);
        return data;
    }

    private static final class BadRequest extends RuntimeException {
        BadRequest(String message) {
            super(message, null, false, false);
        }
    }

    private static int intParam(Map<String, String> q, String name, int dflt, int min, int max) {
        String v = q.get(name);
        if (v == null) {
            if (dflt < min) {
                throw new BadRequest("missing parameter " + name);
            }
            return dflt;
        }
        try {
            int n = Integer.parseInt(v);
            if (n < min || n > max) {
                throw new BadRequest(name + " must be between " + min + " and " + max);
            }
            return n;
        } catch (NumberFormatException e) {
            throw new BadRequest(name + " must be a whole number");
        }
    }

    private static Map<String, String> query(String raw) {
        Map<String, String> q = new HashMap<>();
        if (raw != null) {
            for (String pair : raw.split("&")) {
                int eq = pair.indexOf('=');
                if (eq > 0) {
                    q.put(pair.substring(0, eq), pair.substring(eq + 1));
                } else if (!pair.isEmpty()) {
                    q.put(pair, "");
                }
            }
        }
        return q;
    }

    static String quote(String s) {
        StringBuilder sb = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                sb.append('\\').append(c);
            } else if (c < 0x20) {
                sb.append(String.format(Locale.ROOT, "\\u%04x", (int) c));
            } else {
                sb.append(c);
            }
        }
        return sb.append('"').toString();
    }

    static void log(String message) {
        System.out.println("cache-service: " + message);
        System.out.flush();
    }

    private static void json(HttpExchange ex, int status, String body) throws IOException {
        send(ex, status, "application/json", (body + "\n").getBytes(StandardCharsets.UTF_8));
    }

    private static void send(HttpExchange ex, int status, String type, byte[] body) throws IOException {
        ex.getResponseHeaders().set("Content-Type", type);
        ex.sendResponseHeaders(status, body.length);
        try (OutputStream out = ex.getResponseBody()) {
            out.write(body);
        }
    }
}
