package io.jvmkit.samples.shortener;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Optional;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

/**
 * A small URL-shortener HTTP service (modules java.base and jdk.httpserver only).
 *
 * <p>Usage: {@code Shortener [--port N] [--bind ADDR] [--capacity N]}; the port may also come from
 * the {@code PORT} environment variable (default 8080; the flag wins). It prints
 * {@code shortener listening on port PORT} once it accepts connections.
 *
 * <pre>
 * GET    /health            200 {"status":"ok","links":N}
 * POST   /api/links         body: the URL (text) -> 201 {"code":..,"url":..,"hits":0}, Location: /CODE
 * GET    /api/links         200 [{"code":..,"url":..,"hits":N}, ...]
 * GET    /api/links/CODE    200 {"code":..,"url":..,"hits":N} | 404
 * DELETE /api/links/CODE    204 | 404
 * GET    /CODE              302 to the URL (counts a hit) | 404
 * POST   /shutdown          200 {"status":"stopping"}, then the JVM exits with status 0
 * </pre>
 */
public final class Shortener {
    private static final int MAX_BODY = LinkStore.MAX_URL_LENGTH + 64;

    private final LinkStore store;
    private final CountDownLatch stop = new CountDownLatch(1);

    private Shortener(int capacity) {
        this.store = new LinkStore(capacity);
    }

    public static void main(String[] args) throws Exception {
        int port = envPort();
        String bind = "0.0.0.0";
        int capacity = 10_000;
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if ((a.equals("--port") || a.equals("--bind") || a.equals("--capacity")) && i + 1 >= args.length) {
                usage("missing value for " + a);
            }
            switch (a) {
                case "--port" -> port = parseInt(args[++i], "--port");
                case "--bind" -> bind = args[++i];
                case "--capacity" -> capacity = parseInt(args[++i], "--capacity");
                case "-h", "--help" -> {
                    System.out.println("usage: shortener [--port N] [--bind ADDR] [--capacity N]");
                    return;
                }
                default -> usage("unknown argument " + a);
            }
        }
        System.exit(new Shortener(capacity).serve(bind, port));
    }

    private int serve(String bind, int port) throws IOException, InterruptedException {
        HttpServer server = HttpServer.create(new InetSocketAddress(bind, port), 64);
        ExecutorService workers = Executors.newFixedThreadPool(4);
        server.setExecutor(workers);
        server.createContext("/", this::handle);
        server.start();
        System.out.println("shortener listening on port " + server.getAddress().getPort());
        System.out.flush();
        stop.await();
        server.stop(1); // lets the /shutdown exchange (and any other in flight) finish
        workers.shutdown();
        workers.awaitTermination(5, TimeUnit.SECONDS);
        System.out.println("shortener stopped (" + store.size() + " links)");
        System.out.flush();
        return 0;
    }

    private void handle(HttpExchange ex) throws IOException {
        try {
            route(ex);
        } catch (MethodNotAllowed e) {
            ex.getResponseHeaders().set("Allow", e.allowed);
            error(ex, 405, "method not allowed (use " + e.allowed + ")");
        } catch (RuntimeException e) {
            error(ex, 500, "internal error: " + e);
        } finally {
            ex.close();
        }
    }

    private void route(HttpExchange ex) throws IOException {
        String method = ex.getRequestMethod();
        String path = ex.getRequestURI().getPath();
        if (path.equals("/health")) {
            only(ex, method, "GET");
            json(ex, 200, "{\"status\":\"ok\",\"links\":" + store.size() + "}");
        } else if (path.equals("/shutdown")) {
            only(ex, method, "POST");
            json(ex, 200, "{\"status\":\"stopping\"}");
            stop.countDown();
        } else if (path.equals("/api/links")) {
            if (method.equals("POST")) {
                create(ex);
            } else {
                only(ex, method, "GET");
                List<LinkStore.Link> links = store.all();
                StringBuilder sb = new StringBuilder("[");
                for (int i = 0; i < links.size(); i++) {
                    sb.append(i == 0 ? "" : ",").append(toJson(links.get(i)));
                }
                json(ex, 200, sb.append(']').toString());
            }
        } else if (path.startsWith("/api/links/")) {
            String code = path.substring("/api/links/".length());
            if (method.equals("DELETE")) {
                if (store.delete(code)) {
                    ex.sendResponseHeaders(204, -1);
                } else {
                    error(ex, 404, "no link " + code);
                }
            } else {
                only(ex, method, "GET");
                Optional<LinkStore.Link> link = store.get(code);
                if (link.isPresent()) {
                    json(ex, 200, toJson(link.get()));
                } else {
                    error(ex, 404, "no link " + code);
                }
            }
        } else if (path.equals("/")) {
            only(ex, method, "GET");
            text(ex, 200, "jvmkit sample URL shortener: POST a URL to /api/links, then GET /CODE\n");
        } else if (LinkStore.isCode(path.substring(1))) {
            only(ex, method, "GET");
            Optional<String> url = store.follow(path.substring(1));
            if (url.isPresent()) {
                ex.getResponseHeaders().set("Location", url.get());
                text(ex, 302, "see " + url.get() + "\n");
            } else {
                error(ex, 404, "no link " + path.substring(1));
            }
        } else {
            error(ex, 404, "not found: " + path);
        }
    }

    private void create(HttpExchange ex) throws IOException {
        byte[] body = readBody(ex.getRequestBody());
        if (body == null) {
            error(ex, 413, "body larger than " + MAX_BODY + " bytes");
            return;
        }
        String url = new String(body, StandardCharsets.UTF_8).strip();
        String problem = LinkStore.problemWith(url);
        if (problem != null) {
            error(ex, 400, problem);
            return;
        }
        Optional<LinkStore.Link> link = store.shorten(url);
        if (link.isEmpty()) {
            error(ex, 507, "the store is full");
            return;
        }
        ex.getResponseHeaders().set("Location", "/" + link.get().code());
        json(ex, 201, toJson(link.get()));
    }

    private static byte[] readBody(InputStream in) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] buf = new byte[1024];
        for (int n; (n = in.read(buf)) > 0; ) {
            out.write(buf, 0, n);
            if (out.size() > MAX_BODY) {
                return null;
            }
        }
        return out.toByteArray();
    }

    private static final class MethodNotAllowed extends RuntimeException {
        final String allowed;

        MethodNotAllowed(String allowed) {
            super(null, null, false, false);
            this.allowed = allowed;
        }
    }

    private static void only(HttpExchange ex, String method, String allowed) {
        if (!method.equals(allowed)) {
            throw new MethodNotAllowed(allowed);
        }
    }

    private static String toJson(LinkStore.Link link) {
        return "{\"code\":" + quote(link.code()) + ",\"url\":" + quote(link.url()) + ",\"hits\":" + link.hits() + "}";
    }

    static String quote(String s) {
        StringBuilder sb = new StringBuilder("\"");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"' -> sb.append("\\\"");
                case '\\' -> sb.append("\\\\");
                case '\n' -> sb.append("\\n");
                case '\r' -> sb.append("\\r");
                case '\t' -> sb.append("\\t");
                default -> {
                    if (c < 0x20) {
                        sb.append(String.format("\\u%04x", (int) c));
                    } else {
                        sb.append(c);
                    }
                }
            }
        }
        return sb.append('"').toString();
    }

    private static void error(HttpExchange ex, int status, String message) throws IOException {
        json(ex, status, "{\"error\":" + quote(message) + "}");
    }

    private static void json(HttpExchange ex, int status, String body) throws IOException {
        send(ex, status, "application/json", body + "\n");
    }

    private static void text(HttpExchange ex, int status, String body) throws IOException {
        send(ex, status, "text/plain; charset=utf-8", body);
    }

    private static void send(HttpExchange ex, int status, String type, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        ex.getResponseHeaders().set("Content-Type", type);
        ex.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = ex.getResponseBody()) {
            out.write(bytes);
        }
    }

    private static int envPort() {
        String env = System.getenv("PORT");
        return env == null || env.isBlank() ? 8080 : parseInt(env.strip(), "PORT");
    }

    private static int parseInt(String value, String what) {
        try {
            return Integer.parseInt(value);
        } catch (NumberFormatException e) {
            usage(what + " must be a whole number, not " + value);
            return -1; // not reached
        }
    }

    private static void usage(String problem) {
        System.err.println("shortener: " + problem);
        System.err.println("usage: shortener [--port N] [--bind ADDR] [--capacity N]");
        System.exit(2);
    }
}
