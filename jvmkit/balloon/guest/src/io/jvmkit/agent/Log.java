package io.jvmkit.agent;

/** One-line diagnostics on stderr, all prefixed {@code jvmkit-agent:} so the host can find them. */
final class Log {
    static final String PREFIX = "jvmkit-agent: ";

    private Log() {}

    static void info(String message) {
        System.err.println(PREFIX + message);
    }

    static void problem(String what, Throwable error) {
        String detail = String.valueOf(error);
        Throwable cause = error.getCause();
        if (cause != null && !detail.contains(String.valueOf(cause.getMessage()))) {
            detail += " (caused by " + cause + ")";
        }
        info(what + ": " + detail);
    }

    static String mib(long bytes) {
        return String.format(java.util.Locale.ROOT, "%.1fM", bytes / 1048576.0);
    }
}
