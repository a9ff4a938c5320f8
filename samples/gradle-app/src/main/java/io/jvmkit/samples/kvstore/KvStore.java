package io.jvmkit.samples.kvstore;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

/**
 * A small key/value HTTP service (modules java.base and jdk.httpserver only). Written in Java 11
 * syntax: Gradle 4.4 passes {@code -source 12} at most.
 *
 * <p>Usage: {@code KvStore [--port N] [--max-bytes N]}; the port may also come from the
 * {@code PORT} environment variable (default 8080; the flag wins). Prints
 * {@code kvstore listening on port PORT} once it accepts connections.
 *
 * <pre>
 * GET    /health        200 {"status":"ok","keys":N,"bytes":N}
 * PUT    /kv/KEY        body = value -> 201 (new) or 200 (replaced)
 * GET    /kv/KEY        200 the value (application/octet-stream) | 404
 * DELETE /kv/KEY        204 | 404
 * GET    /kv            200 {"KEY":SIZE, ...} (keys in order)
 * POST   /shutdown      200 {"status":"stopping"}, then the JVM exits with status 0
 * </pre>
 * Keys are 1-200 characters of {@code [A-Za-z0-9._-]}; all values together are bounded by
 * {@code --max-bytes} (default 64 MiB; a PUT past it answers 507).
 */
public final class KvStore {
    private final Map<String, byte[]> values = new TreeMap<>();
    private final long maxBytes;
    private long bytes;
    private final CountDownLatch stop = new CountDownLatch(1);

    private KvStore(long maxBytes) {
        this.maxBytes = maxBytes;
    }

    public static void main(String[] args) throws Exception {
        String env = System.getenv("PORT");
        int port = env == null || env.isBlank() ? 8080 : Integer.parseInt(env.strip());
        long maxBytes = 64L << 20;
        for (int i = 0; i < args.length; i++) {
            if (args[i].equals("--port") && i + 1 < args.length) {
                port = Integer.parseInt(args[++i]);
            } else if (args[i].equals("--max-bytes") && i + 1 < args.length) {
                maxBytes = Long.parseLong(args[++i]);
            } else {
                System.err.println("kvstore: unknown argument " + args[i]);
                System.err.println("usage: kvstore [--port N] [--max-bytes N]");
                System.exit(2);
            }
        }
        System.exit(new KvStore(maxBytes).serve(port));
    }

    private int serve(int port) throws IOException, InterruptedException {
        HttpServer server = HttpServer.create(new InetSocketAddress(port), 64);
        ExecutorService workers = Executors.newFixedThreadPool(4);
        server.setExecutor(workers);
        server.createContext("/", this::handle);
        server.start();
        System.out.println("kvstore listening on port " + server.getAddress().getPort());
        System.out.flush();
        stop.await();
        server.stop(1);
        workers.shutdown();
        workers.awaitTermination(5, TimeUnit.SECONDS);
        System.out.println("kvstore stopped");
        System.out.flush();
        return 0;
    }

    private void handle(HttpExchange ex) throws IOException {
        try {
            route(ex, ex.getRequestMethod(), ex.getRequestURI().getPath());
        } catch (RuntimeException e) {
            send(ex, 500, "application/json", json("error", "internal error: " + e));
        } finally {
            ex.close();
        }
    }

    private void route(HttpExchange ex, String method, String path) throws IOException {
        if (path.equals("/health") && method.equals("GET")) {
            synchronized (this) {
                send(ex, 200, "application/json",
                        "{\"status\":\"ok\",\"keys\":" + values.size() + ",\"bytes\":" + bytes + "}\n");
            }
        } else if (path.equals("/shutdown") && method.equals("POST")) {
            send(ex, 200, "application/json", "{\"status\":\"stopping\"}\n");
            stop.countDown();
        } else if (path.equals("/kv") && method.equals("GET")) {
            StringBuilder sb = new StringBuilder("{");
            synchronized (this) {
                for (Map.Entry<String, byte[]> e : values.entrySet()) {
                    sb.append(sb.length() > 1 ? "," : "").append('"').append(e.getKey()).append("\":")
                            .append(e.getValue().length);
                }
            }
            send(ex, 200, "application/json", sb.append("}\n").toString());
        } else if (path.startsWith("/kv/")) {
            String key = path.substring(4);
            if (!validKey(key)) {
                send(ex, 400, "application/json", json("error", "keys are 1-200 characters of A-Z a-z 0-9 . _ -"));
                return;
            }
            if (method.equals("GET")) {
                byte[] value;
                synchronized (this) {
                    value = values.get(key);
                }
                if (value == null) {
                    send(ex, 404, "application/json", json("error", "no key " + key));
                } else {
                    send(ex, 200, "application/octet-stream", value);
                }
            } else if (method.equals("PUT")) {
                put(ex, key);
            } else if (method.equals("DELETE")) {
                boolean removed;
                synchronized (this) {
                    byte[] old = values.remove(key);
                    removed = old != null;
                    bytes -= removed ? old.length : 0;
                }
                if (removed) {
                    ex.sendResponseHeaders(204, -1);
                } else {
                    send(ex, 404, "application/json", json("error", "no key " + key));
                }
            } else {
                send(ex, 405, "application/json", json("error", "use GET, PUT or DELETE"));
            }
        } else {
            send(ex, 404, "application/json", json("error", "not found: " + method + " " + path));
        }
    }

    private void put(HttpExchange ex, String key) throws IOException {
        byte[] value = read(ex.getRequestBody(), maxBytes);
        int status;
        synchronized (this) {
            byte[] old = values.get(key);
            long after = bytes - (old == null ? 0 : old.length) + (value == null ? maxBytes + 1 : value.length);
            if (after > maxBytes) {
                status = 507;
            } else {
                values.put(key, value);
                bytes = after;
                status = old == null ? 201 : 200;
            }
        }
        if (status == 507) {
            send(ex, 507, "application/json", json("error", "store full (--max-bytes " + maxBytes + ")"));
        } else {
            send(ex, status, "application/json", "{\"key\":\"" + key + "\",\"size\":" + value.length + "}\n");
        }
    }

    private static byte[] read(InputStream in, long limit) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] buf = new byte[8192];
        for (int n; (n = in.read(buf)) > 0; ) {
            out.write(buf, 0, n);
            if (out.size() > limit) {
                return null;
            }
        }
        return out.toByteArray();
    }

    private static boolean validKey(String key) {
        if (key.isEmpty() || key.length() > 200) {
            return false;
        }
        for (int i = 0; i < key.length(); i++) {
            char c = key.charAt(i);
            if (!(Character.isLetterOrDigit(c) && c < 128 || c == '.' || c == '_' || c == '-')) {
                return false;
            }
        }
        return true;
    }

    private static String json(String field, String text) {
        return "{\"" + field + "\":\"" + text.replace("\\", "\\\\").replace("\"", "\\\"") + "\"}\n";
    }

    private static void send(HttpExchange ex, int status, String type, String body) throws IOException {
        send(ex, status, type, body.getBytes(StandardCharsets.UTF_8));
    }

    private static void send(HttpExchange ex, int status, String type, byte[] body) throws IOException {
        ex.getResponseHeaders().set("Content-Type", type);
        ex.sendResponseHeaders(status, body.length == 0 ? -1 : body.length);
        if (body.length > 0) {
            try (OutputStream out = ex.getResponseBody()) {
                out.write(body);
            }
        }
    }
}
