package io.jvmkit.agent;

import io.jvmkit.Ready;
import java.io.BufferedReader;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.io.Writer;
import java.lang.instrument.Instrumentation;
import java.lang.reflect.Field;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.NetworkInterface;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.SecureRandom;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

/**
 * The guest side of {@code jvmkit snapshot} and of a restore: a small line protocol on one TCP port
 * (the seed's {@code snapshot.port}), which the host reaches through a loopback port forward.
 * Every connection starts with a line naming the session and the seed's token; a wrong token
 * closes it.
 *
 * <pre>
 * host: jvmkit-snapshot TOKEN             agent: ok
 * host: wait signal|port N|url URL        agent: ready            (Ready.signal(); a port accepting; a GET answering)
 * host: prepare clock=busybox-date|none   agent: prepared used=B committed=B live=B    (or: error TEXT)
 *   ... the host pauses the VM and saves it; the agent is left waiting for the restore session ...
 * host: jvmkit-restore TOKEN
 * host: entropy=HEX  time=MS  clock=busybox-date|none  [jmx.port=.. jmx.advertise=.. jmx.user=.. jmx.password=..]  end
 *                                         agent: restored lag=MS clock=TEXT
 * </pre>
 *
 * <p>{@code prepare} runs the app's {@link Ready.Resource#beforeSnapshot()} hooks, collects and
 * shrinks the heap ({@link Balloon#trimForSnapshot()}), and asks a linux kernel to compact its
 * free memory, so that whole free blocks reach the balloon's free page reporting and are not saved.
 * A restore mixes the host's fresh entropy into the kernel pool (where it is writable) and the
 * JVM's shared SecureRandom state, steps the wall clock (with busybox {@code date} on linux;
 * OSv cannot set its clock), undoes the trim, runs the app's {@code afterRestore} hooks, answers,
 * and then starts the JMX connector with the new credentials when the restore brought them
 * ({@code run --balloon}). Only one restore is accepted per VM: the listener closes after it.
 */
final class Snapshots {
    static final String SNAPSHOT = "jvmkit-snapshot";
    static final String RESTORE = "jvmkit-restore";
    private static final int READ_TIMEOUT_MILLIS = 60_000;
    private static final long PORT_POLL_MILLIS = 50;
    private static final String DATE = "/bin/date";

    private final ServerSocket server;
    private final byte[] tokenDigest;
    private final Balloon balloon;
    private volatile boolean prepared;

    private Snapshots(ServerSocket server, String token, Balloon balloon) {
        this.server = server;
        this.tokenDigest = digest(token);
        this.balloon = balloon;
    }

    /** Listen on the seed's snapshot port (all interfaces) on a daemon thread. */
    static void start(Seed seed, Balloon balloon) throws IOException {
        ServerSocket server = new ServerSocket();
        server.setReuseAddress(true);
        server.bind(new InetSocketAddress(seed.snapshotPort()), 4);
        Snapshots control = new Snapshots(server, seed.snapshotToken(), balloon);
        Thread thread = new Thread(control::serve, "jvmkit-agent-snapshot");
        thread.setDaemon(true);
        thread.start();
    }

    private void serve() {
        try {
            server.setSoTimeout(Integer.getInteger("jvmkit.acceptms", 0));
        } catch (IOException e) {
            // keep blocking
        }
        while (!server.isClosed()) {
            try (Socket socket = server.accept()) {
                socket.setSoTimeout(READ_TIMEOUT_MILLIS);
                socket.setTcpNoDelay(true);
                if (session(socket)) {
                    server.close();
                }
            } catch (java.net.SocketTimeoutException e) {
                // timed accept: look again
            } catch (IOException e) {
                if (!server.isClosed()) {
                    Log.problem("snapshot control", e);
                }
            } catch (RuntimeException e) {
                Log.problem("snapshot control", e);
            }
        }
    }

    /** One connection; true when it was the restore (the listener then closes). */
    private boolean session(Socket socket) throws IOException {
        BufferedReader in = new BufferedReader(new InputStreamReader(socket.getInputStream(), StandardCharsets.UTF_8));
        Writer out = new java.io.OutputStreamWriter(socket.getOutputStream(), StandardCharsets.UTF_8);
        String first = in.readLine();
        if (first == null) {
            return false;  // the host's probe for "is the agent listening yet"
        }
        String[] words = first.strip().split(" ", 2);
        if (words.length != 2 || !MessageDigest.isEqual(tokenDigest, digest(words[1]))) {
            reply(out, "error wrong token");
            return false;
        }
        if (words[0].equals(SNAPSHOT)) {
            reply(out, "ok");
            snapshotSession(in, out);
            return false;
        }
        if (words[0].equals(RESTORE)) {
            if (!prepared) {
                reply(out, "error this VM was not prepared for a snapshot");
                return false;
            }
            Map<String, String> values = new HashMap<>();
            for (String line; (line = in.readLine()) != null && !line.strip().equals("end"); ) {
                values.putAll(Seed.lines(line));
            }
            restore(values, out);
            // Wait for the host to close first: closing here right after the answer delayed it
            // by ~1 s (a retransmission through the user network) in 3 of 3 restores measured.
            try {
                socket.setSoTimeout(5000);
                while (in.readLine() != null) {
                    // nothing more is expected
                }
            } catch (IOException e) {
                // the host went away, or took too long to
            }
            return true;
        }
        reply(out, "error unknown session " + words[0]);
        return false;
    }

    private void snapshotSession(BufferedReader in, Writer out) throws IOException {
        for (String line; (line = in.readLine()) != null; ) {
            String[] cmd = line.strip().split(" ");
            try {
                switch (cmd[0]) {
                    case "wait" -> {
                        if (cmd.length == 2 && cmd[1].equals("signal")) {
                            Ready.awaitSignal(0);
                        } else if (cmd.length == 3 && cmd[1].equals("port")) {
                            awaitPort(Integer.parseInt(cmd[2]));
                        } else if (cmd.length == 3 && cmd[1].equals("url")) {
                            awaitUrl(new java.net.URL(cmd[2]));
                        } else {
                            reply(out, "error wait what? " + line);
                            continue;
                        }
                        reply(out, "ready");
                    }
                    case "prepare" -> {
                        reply(out, prepare(cmd.length > 1 ? cmd[1] : ""));
                        return;  // the session ends here: the agent closes first, then the host pauses the VM
                    }
                    default -> reply(out, "error unknown command " + cmd[0]);
                }
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                return;
            } catch (Exception e) {
                reply(out, "error " + oneLine(e.getMessage() != null ? e.getMessage() : e.toString()));
            }
        }
    }

    private String prepare(String clock) throws Exception {
        Ready.runBeforeSnapshot();
        warmRestorePath(clock);
        balloon.growTo(balloon.getHeapMax());  // what a restore runs to undo the trim, once now (see warmRestorePath)
        HeapSteering.Result trim = balloon.trimForSnapshot();
        // Linux: whole free 2 MiB blocks are what free page reporting hands the host (ignored on OSv).
        writeQuietly(Path.of("/proc/sys/vm/compact_memory"), "1\n".getBytes(StandardCharsets.US_ASCII));
        prepared = true;
        return "prepared used=" + guestUsedBytes() + " committed=" + trim.committedAfter() + " live=" + trim.liveAfter();
    }

    private void restore(Map<String, String> values, Writer out) throws IOException {
        long received = System.nanoTime();
        byte[] entropy = HexFormat.of().parseHex(values.getOrDefault("entropy", ""));
        if (entropy.length > 0) {
            reseed(entropy);
        }
        long hostMillis = Long.parseLong(values.getOrDefault("time", "0"));
        String clock = "unchanged";
        long lag = 0;
        long clockMillis = 0;
        if (hostMillis > 0) {
            long now = hostMillis + TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - received);
            if ("busybox-date".equals(values.get("clock"))) {
                long before = System.nanoTime();
                clock = setClock(now);
                clockMillis = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - before);
            }
            lag = now + TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - received) - System.currentTimeMillis();
            lag = Math.abs(lag) < 1000 ? 0 : lag;  // the date step is whole seconds
        }
        try {
            balloon.growTo(balloon.getHeapMax());  // undo the trim: the heap grows as on a cold boot
        } catch (RuntimeException e) {
            Log.problem("undoing the snapshot trim", e);
        }
        for (String failure : Ready.runAfterRestore(lag)) {
            Log.info(failure);
        }
        long took = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - received);
        reply(out, text("restored lag=", lag, " clock=", clock.replace(' ', '_'), " took=", took, " clock_took=",
                clockMillis));
        if (values.containsKey("jmx.port")) {
            Agent.startJmx(Seed.parse(values));
        }
    }

    /**
     * Run what a restore runs once now, so that its classes are loaded and linked in the snapshot:
     * under TCG the first ProcessBuilder start alone took ~0.35 s of a restore, the first reseed
     * (provider lookups, reflection) ~0.2 s. Reseeding now only mixes in more of this VM's entropy,
     * and `date -u` only prints the time.
     */
    private static void warmRestorePath(String clock) {
        byte[] bytes = new byte[32];
        new SecureRandom().nextBytes(bytes);
        reseed(HexFormat.of().parseHex(HexFormat.of().formatHex(bytes)));
        Seed.lines("entropy=00\ntime=0\n");
        if (clock.equals("clock=busybox-date")) {
            try {
                Process p = new ProcessBuilder(DATE, "-u").redirectErrorStream(true).start();
                p.getInputStream().readNBytes(512);
                p.waitFor(5, TimeUnit.SECONDS);
            } catch (IOException e) {
                Log.problem("cannot run " + DATE, e);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
    }

    /** Mix fresh bytes into the kernel's pool (linux; OSv ignores writes) and the JVM's RNG state. */
    static void reseed(byte[] entropy) {
        writeQuietly(Path.of("/dev/urandom"), entropy);
        // NativePRNG (the default SecureRandom on linux and OSv, also UUID.randomUUID's) keeps one
        // shared state per variant that it mixes into every read from /dev/urandom: seeding any
        // instance reseeds them all.
        for (String algorithm : List.of("NativePRNG", "NativePRNGNonBlocking", "NativePRNGBlocking")) {
            try {
                SecureRandom.getInstance(algorithm).setSeed(entropy);
            } catch (NoSuchAlgorithmException | RuntimeException e) {
                // not on this platform
            }
        }
        reseedJdkSeeders(entropy);
    }

    /**
     * New seeds for the JDK's seed generators of java.util.Random, ThreadLocalRandom (threads
     * started after the restore) and SplittableRandom: they are clones in every restored VM too.
     * Needs java.base opened to the agent (Instrumentation); best effort, quietly skipped when a
     * JDK has other fields.
     */
    private static void reseedJdkSeeders(byte[] entropy) {
        Instrumentation inst = Agent.instrumentation();
        if (inst == null) {
            return;
        }
        Module me = Snapshots.class.getModule();
        try {
            inst.redefineModule(Object.class.getModule(), Set.of(), Map.of(),
                    Map.of("java.util", Set.of(me), "java.util.concurrent", Set.of(me)), Set.of(), Map.of());
        } catch (RuntimeException e) {
            return;
        }
        SecureRandom mixer = new SecureRandom(entropy);
        String[][] fields = {{"java.util.Random", "seedUniquifier"}, {"java.util.concurrent.ThreadLocalRandom", "seeder"},
                {"java.util.SplittableRandom", "defaultGen"}};
        for (String[] f : fields) {
            try {
                Field field = Class.forName(f[0]).getDeclaredField(f[1]);
                field.setAccessible(true);
                if (field.get(null) instanceof AtomicLong seed) {
                    seed.set(seed.get() ^ mixer.nextLong());
                }
            } catch (ReflectiveOperationException | RuntimeException e) {
                // another JDK's layout
            }
        }
    }

    /** Step the wall clock to {@code millis} with busybox date (whole seconds, rounded). */
    private static String setClock(long millis) {
        long seconds = Math.round(millis / 1000.0);
        try {
            Process p = new ProcessBuilder(DATE, "-u", "-s", text("@", seconds)).redirectErrorStream(true).start();
            byte[] output = p.getInputStream().readNBytes(512);
            if (!p.waitFor(5, TimeUnit.SECONDS)) {
                p.destroyForcibly();
                return "date did not finish";
            }
            return p.exitValue() == 0 ? "set" : text("date failed: ", oneLine(new String(output, StandardCharsets.UTF_8)));
        } catch (IOException e) {
            return text("cannot run ", DATE, ": ", oneLine(String.valueOf(e.getMessage())));
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return "interrupted";
        }
    }

    /** Until something accepts a connection on {@code port} in this guest (loopback or an interface's address). */
    private static void awaitPort(int port) throws InterruptedException {
        while (true) {
            for (InetAddress address : localAddresses()) {
                try (Socket probe = new Socket()) {
                    probe.connect(new InetSocketAddress(address, port), 200);
                    return;
                } catch (IOException e) {
                    // not yet
                }
            }
            Thread.sleep(PORT_POLL_MILLIS);
        }
    }

    /** Until a GET of {@code url} (http, from inside the guest) answers 2xx or 3xx. */
    private static void awaitUrl(java.net.URL url) throws InterruptedException {
        while (true) {
            try {
                java.net.HttpURLConnection c = (java.net.HttpURLConnection) url.openConnection();
                c.setConnectTimeout(1000);
                c.setReadTimeout(10_000);
                c.setInstanceFollowRedirects(false);
                int status = c.getResponseCode();
                try (var body = status < 400 ? c.getInputStream() : c.getErrorStream()) {
                    if (body != null) {
                        body.readAllBytes();
                    }
                }
                c.disconnect();
                if (status >= 200 && status < 400) {
                    return;
                }
            } catch (IOException e) {
                // not yet
            }
            Thread.sleep(PORT_POLL_MILLIS);
        }
    }

    private static List<InetAddress> localAddresses() {
        List<InetAddress> result = new ArrayList<>();
        result.add(InetAddress.getLoopbackAddress());
        try {
            for (NetworkInterface nif : Collections.list(NetworkInterface.getNetworkInterfaces())) {
                for (InetAddress address : Collections.list(nif.getInetAddresses())) {
                    if (!address.isLoopbackAddress() && !address.isLinkLocalAddress()) {
                        result.add(address);
                    }
                }
            }
        } catch (IOException | RuntimeException e) {
            // loopback only
        }
        return result;
    }

    /** MemTotal - MemFree from /proc/meminfo (linux and OSv), -1 when unreadable. */
    private static long guestUsedBytes() {
        try {
            long total = -1;
            long free = -1;
            for (String line : Files.readAllLines(Path.of("/proc/meminfo"))) {
                String[] parts = line.split("\\s+");
                if (parts.length >= 2 && parts[0].equals("MemTotal:")) {
                    total = Long.parseLong(parts[1]) * 1024;
                } else if (parts.length >= 2 && parts[0].equals("MemFree:")) {
                    free = Long.parseLong(parts[1]) * 1024;
                }
            }
            return total >= 0 && free >= 0 ? total - free : -1;
        } catch (IOException | RuntimeException e) {
            return -1;
        }
    }

    private static void writeQuietly(Path path, byte[] data) {
        try (OutputStream out = new FileOutputStream(path.toFile())) {
            out.write(data);
        } catch (IOException | RuntimeException e) {
            // not writable here (OSv has no /proc/sys)
        }
    }

    private static void reply(Writer out, String line) throws IOException {
        out.write(line);
        out.write('\n');
        out.flush();
    }

    /**
     * Concatenation without invokedynamic, for the restore path: the first run of each `a + b`
     * call site bootstraps StringConcatFactory's method handles, which took ~0.5 s of a restore
     * under TCG (measured: the answer's own concatenation); a StringBuilder runs as it is.
     */
    static String text(Object... parts) {
        StringBuilder b = new StringBuilder();
        for (Object part : parts) {
            b.append(part);
        }
        return b.toString();
    }

    private static String oneLine(String text) {
        return String.join(" ", text.strip().split("\\s+"));
    }

    private static byte[] digest(String value) {
        try {
            return MessageDigest.getInstance("SHA-256").digest(value.getBytes(StandardCharsets.UTF_8));
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }
}
