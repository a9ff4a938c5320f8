package warmstart;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.lang.reflect.Method;
import java.lang.reflect.Proxy;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.security.SecureRandom;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.TreeMap;
import java.util.UUID;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Collectors;

/**
 * A service that takes seconds to initialise, for jvmkit's snapshots (modules java.base and
 * jdk.httpserver).
 *
 * <p>Usage: {@code Warmstart [PORT [LINES]]} (defaults 8080 and 40000). It generates LINES log
 * lines, parses them with a regular expression and indexes them with streams (the kind of start-up
 * work a framework does: class loading, lambdas, the JIT), then listens on all addresses, answers
 * one request of each kind itself to warm its request path, prints {@code warmstart ready: N
 * requests indexed}, and calls {@code io.jvmkit.Ready.signal()} when jvmkit's guest agent is there
 * (by reflection: the sample needs no jvmkit jar to build or run).
 * <ul>
 *   <li>{@code GET /} answers the index summary (the same on every run);</li>
 *   <li>{@code GET /id} answers {@code random=HEX uuid=UUID session=HEX}: 16 bytes from a
 *       {@code SecureRandom} created during initialisation, a fresh {@code UUID.randomUUID()}
 *       (its generator too was first used during initialisation), and a session id the app renews
 *       in an {@code io.jvmkit.Ready.Resource#afterRestore} hook;</li>
 *   <li>{@code GET /exit?code=N} answers {@code bye N}, then the JVM exits with status N.</li>
 * </ul>
 * Two VMs restored from one snapshot must answer {@code /id} differently, as two cold boots do.
 */
public final class Warmstart {
    private static final Pattern LINE = Pattern.compile(
            "^(\\d{4}-\\d{2}-\\d{2}T\\d{2}:\\d{2}:\\d{2}) (GET|POST|PUT) (/\\S*) (\\d{3}) (\\d+)ms$");
    private static final SecureRandom RANDOM = new SecureRandom();
    private static volatile String session = newSession();
    private static String summary;

    private Warmstart() {
    }

    public static void main(String[] args) throws Exception {
        int port = args.length > 0 ? Integer.parseInt(args[0]) : 8080;
        int lines = args.length > 1 ? Integer.parseInt(args[1]) : 40000;
        UUID.randomUUID();  // its generator is created now, before any snapshot
        summary = index(generate(lines));
        HttpServer server = HttpServer.create(new InetSocketAddress(port), 16);
        server.createContext("/", Warmstart::handle);
        server.start();
        warm(port);
        System.out.println("warmstart ready: " + summary);
        System.out.flush();
        signalReady();
    }

    static List<String> generate(int count) {
        Random random = new Random(42);
        String[] methods = {"GET", "POST", "PUT"};
        String[] paths = {"/", "/users", "/users/42", "/orders", "/orders/7/items", "/health", "/search"};
        List<String> out = new ArrayList<>(count);
        for (int i = 0; i < count; i++) {
            int second = i % 86400;
            out.add(String.format("2024-03-%02d T%02d:%02d:%02d %s %s %d %dms", 1 + i % 28, second / 3600,
                    second / 60 % 60, second % 60, methods[random.nextInt(methods.length)],
                    paths[random.nextInt(paths.length)], random.nextInt(10) < 9 ? 200 : 500,
                    random.nextInt(900)).replace(" T", "T"));
        }
        return out;
    }

    static String index(List<String> lines) {
        List<String[]> parsed = new ArrayList<>();
        for (String line : lines) {
            Matcher m = LINE.matcher(line);
            if (m.matches()) {
                parsed.add(new String[] {m.group(2), m.group(3), m.group(4), m.group(5)});
            }
        }
        Map<String, Long> byPath = parsed.stream()
                .collect(Collectors.groupingBy(p -> p[1], TreeMap::new, Collectors.counting()));
        Map<String, Double> slowest = parsed.stream()
                .collect(Collectors.groupingBy(p -> p[0], TreeMap::new,
                        Collectors.averagingInt(p -> Integer.parseInt(p[3]))));
        long errors = parsed.stream().filter(p -> p[2].startsWith("5")).count();
        return parsed.size() + " requests indexed, " + byPath.size() + " paths, " + errors + " errors, mean ms "
                + slowest.entrySet().stream().map(e -> e.getKey() + "=" + Math.round(e.getValue()))
                        .collect(Collectors.joining(","));
    }

    private static String newSession() {
        byte[] bytes = new byte[8];
        RANDOM.nextBytes(bytes);
        return hex(bytes);
    }

    private static String hex(byte[] bytes) {
        StringBuilder b = new StringBuilder();
        for (byte x : bytes) {
            b.append(String.format("%02x", x));
        }
        return b.toString();
    }

    private static void handle(HttpExchange exchange) throws IOException {
        URI uri = exchange.getRequestURI();
        String path = uri.getPath();
        if (path.equals("/")) {
            reply(exchange, "warmstart: " + summary + "\n");
        } else if (path.equals("/id")) {
            byte[] bytes = new byte[16];
            RANDOM.nextBytes(bytes);
            reply(exchange, "random=" + hex(bytes) + " uuid=" + UUID.randomUUID() + " session=" + session + "\n");
        } else if (path.equals("/exit")) {
            String query = uri.getQuery();
            int code = query != null && query.startsWith("code=") ? Integer.parseInt(query.substring(5)) : 0;
            reply(exchange, "bye " + code + "\n");
            System.out.println("warmstart exiting with status " + code);
            System.out.flush();
            new Thread(() -> System.exit(code), "warmstart-exit").start();
        } else {
            exchange.sendResponseHeaders(404, -1);
            exchange.close();
        }
    }

    private static void reply(HttpExchange exchange, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "text/plain; charset=utf-8");
        exchange.sendResponseHeaders(200, bytes.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(bytes);
        }
    }

    /** One request of each kind, so the first answers after a restore find their code warm. */
    private static void warm(int port) throws IOException {
        for (String path : new String[] {"/", "/id"}) {
            try (InputStream in = new URL("http://127.0.0.1:" + port + path).openStream()) {
                in.readAllBytes();
            }
        }
    }

    /** io.jvmkit.Ready, when jvmkit's guest agent jar is on the class path (in every jvmkit image). */
    private static void signalReady() {
        try {
            Class<?> ready = Class.forName("io.jvmkit.Ready");
            Class<?> resource = Class.forName("io.jvmkit.Ready$Resource");
            Object hook = Proxy.newProxyInstance(resource.getClassLoader(), new Class<?>[] {resource},
                    (proxy, method, margs) -> {
                        switch (method.getName()) {
                            case "afterRestore":
                                session = newSession();
                                return null;
                            case "equals":
                                return proxy == margs[0];
                            case "hashCode":
                                return System.identityHashCode(proxy);
                            case "toString":
                                return "warmstart session";
                            default:
                                return null;
                        }
                    });
            Method register = ready.getMethod("register", resource);
            register.invoke(null, hook);
            ready.getMethod("signal").invoke(null);
        } catch (ReflectiveOperationException | LinkageError e) {
            // not in a jvmkit image: nothing to signal
        }
    }
}
