package io.jvmkit.agent;

import java.util.ArrayList;
import java.util.List;

/**
 * The application's live non-daemon threads, as the java launcher's DestroyJavaVM counts them,
 * minus the JVM's own: the DestroyJavaVM thread itself and RMI's "RMI Reaper", the non-daemon
 * thread that RMI keeps while objects (our JMX connector) are exported.
 */
final class AppThreads {
    private AppThreads() {}

    static List<Thread> nonDaemon() {
        ThreadGroup root = Thread.currentThread().getThreadGroup();
        while (root.getParent() != null) {
            root = root.getParent();
        }
        Thread[] threads;
        int count;
        do {
            threads = new Thread[root.activeCount() + 16];
            count = root.enumerate(threads, true);
        } while (count == threads.length);
        List<Thread> result = new ArrayList<>();
        Thread self = Thread.currentThread();
        for (int i = 0; i < count; i++) {
            Thread t = threads[i];
            if (t != self && t.isAlive() && !t.isDaemon() && !isJvmThread(t)) {
                result.add(t);
            }
        }
        return result;
    }

    private static boolean isJvmThread(Thread t) {
        if (t.getName().equals("DestroyJavaVM")) {
            return true;
        }
        ThreadGroup group = t.getThreadGroup();
        return t.getName().equals("RMI Reaper") && group != null && group.getParent() == null;
    }

    /** Wait until no application non-daemon thread (other than the caller) is alive. */
    static void awaitNonDaemon() throws InterruptedException {
        for (List<Thread> live = nonDaemon(); !live.isEmpty(); live = nonDaemon()) {
            for (Thread t : live) {
                t.join();
            }
        }
    }
}
