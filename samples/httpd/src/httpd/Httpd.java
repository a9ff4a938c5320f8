package httpd;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;

/**
 * A tiny HTTP server sample (modules java.base and jdk.httpserver).
 *
 * <p>Usage: {@code Httpd [PORT]} (default 8080), listening on all addresses. Prints
 * {@code httpd listening on port PORT} once it accepts connections, then serves until killed:
 * <ul>
 *   <li>{@code GET /} answers {@code hello from jvmkit httpd} (200, text/plain);</li>
 *   <li>{@code GET /exit?code=N} answers {@code bye N}, then the JVM exits with status N
 *       (default 0);</li>
 *   <li>anything else answers 404.</li>
 * </ul>
 */
public final class Httpd {
    private Httpd() {
    }

    public static void main(String[] args) throws IOException {
        int port = args.length > 0 ? Integer.parseInt(args[0]) : 8080;
        HttpServer server = HttpServer.create(new InetSocketAddress(port), 16);
        server.createContext("/", Httpd::handle);
        server.start();
        System.out.println("httpd listening on port " + server.getAddress().getPort());
        System.out.flush();
    }

    private static void handle(HttpExchange exchange) throws IOException {
        URI uri = exchange.getRequestURI();
        String path = uri.getPath();
        if (!"GET".equals(exchange.getRequestMethod())) {
            reply(exchange, 405, "method not allowed\n");
        } else if (path.equals("/")) {
            reply(exchange, 200, "hello from jvmkit httpd\n");
        } else if (path.equals("/exit")) {
            int code = exitCode(uri.getQuery());
            reply(exchange, 200, "bye " + code + "\n");
            System.out.println("httpd exiting with status " + code);
            System.out.flush();
            // Exit from another thread so this exchange completes first.
            Thread exiter = new Thread(() -> System.exit(code), "httpd-exit");
            exiter.start();
        } else {
            reply(exchange, 404, "not found: " + path + "\n");
        }
    }

    private static int exitCode(String query) {
        if (query != null) {
            for (String pair : query.split("&")) {
                if (pair.startsWith("code=")) {
                    try {
                        return Integer.parseInt(pair.substring("code=".length()));
                    } catch (NumberFormatException e) {
                        return 2;
                    }
                }
            }
        }
        return 0;
    }

    private static void reply(HttpExchange exchange, int status, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "text/plain; charset=utf-8");
        exchange.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(bytes);
        }
    }
}
