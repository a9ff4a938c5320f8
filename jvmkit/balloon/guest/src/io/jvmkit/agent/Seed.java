package io.jvmkit.agent;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;

/**
 * The per-run seed the host hands to the guest: a file of {@code key=value} lines (blank lines and
 * {@code #} comments ignored) whose path is in system property {@code jvmkit.seed}.
 * <pre>
 * jmx.port=7091                 the guest port the connector listens on (all interfaces)
 * jmx.advertise=127.0.0.1:43211 the host:port clients use (stubs point there); default 127.0.0.1:jmx.port
 * jmx.user=...                  required with jmx.port
 * jmx.password=...              required with jmx.port
 * snapshot.port=7092            jvmkit snapshot: the guest port the agent's snapshot control listens on
 * snapshot.token=...            required with snapshot.port: what the host presents there
 * </pre>
 * A seed has the JMX keys (run --balloon), the snapshot keys (jvmkit snapshot), or both.
 */
record Seed(int listenPort, String advertiseHost, int advertisePort, String user, String password,
            int snapshotPort, String snapshotToken) {
    static final String PROPERTY = "jvmkit.seed";
    static final int MAX_BYTES = 4096;

    static Seed load(Path path) throws IOException {
        // One bounded read, never on to EOF: on OSv the seed is a 4 KiB block device (/dev/vblk1),
        // and reading past a device's end fails with EIO there instead of returning EOF.
        byte[] bytes;
        try (java.io.InputStream in = new java.io.FileInputStream(path.toFile())) {
            bytes = in.readNBytes(MAX_BYTES);
        }
        return parse(lines(new String(bytes, StandardCharsets.UTF_8)));
    }

    /** The key=value lines of a seed text (blank lines and # comments skipped). */
    static Map<String, String> lines(String text) {
        Map<String, String> values = new HashMap<>();
        for (String raw : text.split("\n")) {
            String line = raw.strip();
            if (line.isEmpty() || line.startsWith("#")) {
                continue;
            }
            int eq = line.indexOf('=');
            if (eq <= 0) {
                throw new IllegalArgumentException("seed line without key=value: " + abbreviate(line));
            }
            values.put(line.substring(0, eq).strip(), line.substring(eq + 1).strip());
        }
        return values;
    }

    static Seed parse(Map<String, String> values) {
        int snapshotPort = 0;
        String token = null;
        if (values.containsKey("snapshot.port")) {
            snapshotPort = port(values.get("snapshot.port"), "snapshot.port");
            token = values.get("snapshot.token");
            if (token == null || token.length() < 16) {
                throw new IllegalArgumentException("snapshot.token (at least 16 characters) is required with snapshot.port");
            }
            if (!values.containsKey("jmx.port")) {
                return new Seed(0, null, 0, null, null, snapshotPort, token);
            }
        }
        int listen = port(values.get("jmx.port"), "jmx.port");
        String advertise = values.getOrDefault("jmx.advertise", "127.0.0.1:" + listen);
        int colon = advertise.lastIndexOf(':');
        if (colon <= 0) {
            throw new IllegalArgumentException("jmx.advertise must be host:port, got " + abbreviate(advertise));
        }
        String host = advertise.substring(0, colon);
        if (host.startsWith("[") && host.endsWith("]")) {
            host = host.substring(1, host.length() - 1);
        }
        int port = port(advertise.substring(colon + 1), "jmx.advertise port");
        String user = values.get("jmx.user");
        String password = values.get("jmx.password");
        if (user == null || user.isEmpty() || password == null || password.isEmpty()) {
            throw new IllegalArgumentException("jmx.user and jmx.password are required");
        }
        return new Seed(listen, host, port, user, password, snapshotPort, token);
    }

    /** Whether this seed starts the JMX connector (a --balloon run). */
    boolean hasJmx() {
        return listenPort > 0;
    }

    /** Whether this seed starts the snapshot control (a jvmkit snapshot boot). */
    boolean hasSnapshot() {
        return snapshotPort > 0;
    }

    private static int port(String value, String what) {
        try {
            int port = Integer.parseInt(value == null ? "" : value.strip());
            if (port > 0 && port < 65536) {
                return port;
            }
        } catch (NumberFormatException e) {
            // reported below
        }
        throw new IllegalArgumentException(what + " must be a port number 1-65535, got " + abbreviate(value));
    }

    private static String abbreviate(String s) {
        return s == null ? "nothing" : s.length() > 40 ? s.substring(0, 40) + "..." : s;
    }

    @Override
    public String toString() { // never print the password
        return "Seed[listen=" + listenPort + ", advertise=" + advertiseHost + ":" + advertisePort + ", user=" + user
                + ", snapshot=" + snapshotPort + "]";
    }
}
