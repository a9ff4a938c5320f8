package phases;

import java.io.IOException;
import java.net.ServerSocket;
import java.net.SocketTimeoutException;
import java.util.ArrayList;
import java.util.List;

/**
 * A workload in phases, for the balloon: grow the heap, hold it, drop it, idle, grow again.
 *
 * <p>Usage: {@code Phases [GROW_MB [HOLD_S [IDLE_S [PORT]]]]} (defaults 300, 5, 30, none). Prints
 * one line per phase, {@code phase NAME t=SECONDS}, so a test or benchmark can line the phases up
 * with what the host saw. With PORT, the idle phase also ends at the first connection to it (a
 * test that has seen what it waited for need not sit out IDLE_S). The second growth must
 * complete: an OutOfMemoryError exits with status 3.
 */
public final class Phases {
    private static final long START = System.nanoTime();
    private static final int CHUNK = 256 << 10;  // small enough not to be a G1 humongous object

    private Phases() {
    }

    private static void phase(String name) {
        Runtime rt = Runtime.getRuntime();
        System.out.printf("phase %s t=%.1f used=%dM committed=%dM%n", name, (System.nanoTime() - START) / 1e9,
                (rt.totalMemory() - rt.freeMemory()) >> 20, rt.totalMemory() >> 20);
        System.out.flush();
    }

    private static List<byte[]> grow(int megabytes) {
        List<byte[]> held = new ArrayList<>();
        for (int i = 0; i < megabytes * 4; i++) {
            byte[] chunk = new byte[CHUNK];
            for (int j = 0; j < CHUNK; j += 4096) {
                chunk[j] = (byte) i;  // touch every page so it is really committed
            }
            held.add(chunk);
        }
        return held;
    }

    private static void idle(int seconds, ServerSocket wake) throws InterruptedException, IOException {
        if (wake == null) {
            Thread.sleep(seconds * 1000L);
            return;
        }
        wake.setSoTimeout(seconds * 1000);
        try {
            wake.accept().close();
            phase("woken");
        } catch (SocketTimeoutException timedOut) {
            // the whole idle phase
        } finally {
            wake.close();
        }
    }

    public static void main(String[] args) throws InterruptedException, IOException {
        int growMb = args.length > 0 ? Integer.parseInt(args[0]) : 300;
        int holdS = args.length > 1 ? Integer.parseInt(args[1]) : 5;
        int idleS = args.length > 2 ? Integer.parseInt(args[2]) : 30;
        ServerSocket wake = args.length > 3 ? new ServerSocket(Integer.parseInt(args[3])) : null;
        try {
            phase("start");
            List<byte[]> held = grow(growMb);
            phase("grown");
            Thread.sleep(holdS * 1000L);
            held.clear();
            held = null;
            phase("dropped");
            idle(idleS, wake);
            phase("idle-end");
            List<byte[]> again = grow(growMb);
            phase("regrown");
            System.out.println("regrew " + again.size() / 4 + " MiB");
        } catch (OutOfMemoryError oom) {
            System.out.println("OutOfMemoryError: " + oom.getMessage());
            System.exit(3);
        }
    }
}
