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
 * and log {@code jvmkit-agent: JMX ready on port N}. Problems are logged, never fatal.
 */
public final class Agent {
    private static boolean started;

    private Agent() {}

    public static void premain(String options, Instrumentation instrumentation) {
        start(options);
    }

    public static void agentmain(String options, Instrumentation instrumentation) {
        start(options);
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
        try {
            Balloon.register();
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
        try {
            JmxConnector.start(seed, ManagementFactory.getPlatformMBeanServer());
            Log.info("JMX ready on port " + seed.listenPort());
        } catch (Exception | LinkageError e) {
            Log.problem("cannot start the JMX connector on port " + seed.listenPort(), e);
        }
    }
}
