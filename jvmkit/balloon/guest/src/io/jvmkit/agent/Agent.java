package io.jvmkit.agent;

import java.lang.instrument.Instrumentation;
import java.lang.management.ManagementFactory;
import java.nio.file.Files;
import java.nio.file.Path;

/**
 * The guest agent's entry point ({@code -javaagent:agent.jar[=seed=PATH]}, or attached later).
 *
 * <p>Everything happens on one background daemon thread, so the application's main is never
 * delayed: detect the collector and record the startup free ratios / soft limit, register the
 * {@code io.jvmkit:type=Balloon} MXBean, then, if a seed is given (system property
 * {@code jvmkit.seed}, or agent option {@code seed=PATH}), start the JMX connector described there
 * and log {@code jvmkit-agent: JMX ready on port N}; a seed from {@code jvmkit snapshot} also (or
 * instead) starts the snapshot control ({@link Snapshots}). Problems are logged, never fatal.
 */
public final class Agent {
    private static boolean started;
    private static volatile Instrumentation instrumentation;

    private Agent() {}

    public static void premain(String options, Instrumentation inst) {
        instrumentation = inst;
        start(options);
    }

    public static void agentmain(String options, Instrumentation inst) {
        instrumentation = inst;
        start(options);
    }

    /** The JVM's Instrumentation (null when the agent was not loaded as an agent). */
    static Instrumentation instrumentation() {
        return instrumentation;
    }

    private static synchronized void start(String options) {
        if (started) {
            return;
        }
        started = true;
        String seed = System.getProperty(Seed.PROPERTY);
        if (options != null && !options.isBlank()) {
            for (String option : options.split(",")) {
                if (option.startsWith("seed=")) {
                    seed = option.substring("seed=".length());
                } else if (!option.isBlank()) {
                    Log.info("unknown agent option '" + option + "' ignored");
                }
            }
        }
        String seedPath = seed == null || seed.isBlank() ? null : seed;
        Thread thread = new Thread(() -> run(seedPath), "jvmkit-agent");
        thread.setDaemon(true);
        thread.start();
    }

    private static void run(String seedPath) {
        Balloon balloon;
        try {
            balloon = Balloon.register();
        } catch (Exception | LinkageError e) {
            Log.problem("cannot register the balloon MXBean", e);
            return;
        }
        if (seedPath == null) {
            return;
        }
        Seed seed;
        try {
            Path path = Path.of(seedPath);
            if (!Files.isReadable(path)) {
                return;  // no seed: this run did not ask for JMX (no --balloon); nothing to say
            }
            seed = Seed.load(path);
        } catch (Exception e) {
            Log.problem("seed file " + seedPath + " is not valid; JMX connector not started", e);
            return;
        }
        if (seed.hasSnapshot()) {
            try {
                Snapshots.start(seed, balloon);
            } catch (Exception | LinkageError e) {
                Log.problem("cannot start the snapshot control on port " + seed.snapshotPort(), e);
            }
        }
        if (seed.hasJmx()) {
            startJmx(seed);
        }
    }

    /** Start the JMX connector the seed describes (at startup, or after a restore with a new seed). */
    static void startJmx(Seed seed) {
        try {
            JmxConnector.start(seed, ManagementFactory.getPlatformMBeanServer());
            Log.info("JMX ready on port " + seed.listenPort());
        } catch (Exception | LinkageError e) {
            Log.problem("cannot start the JMX connector on port " + seed.listenPort(), e);
        }
    }
}
