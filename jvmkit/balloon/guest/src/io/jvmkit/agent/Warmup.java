package io.jvmkit.agent;

/**
 * A main that does nothing: {@code java ... io.jvmkit.agent.Launcher io.jvmkit.agent.Warmup} runs
 * the Launcher's whole path (finding main, calling it, waiting for threads, exiting) without any
 * application code. jvmkit runs it once on the host with {@code -XX:ArchiveClassesAtExit} to write
 * the CDS archive of the Launcher's classes that OSv images start with.
 */
public final class Warmup {
    private Warmup() {}

    public static void main(String[] args) {
        // nothing: the point is the path through the Launcher
    }
}
