package phases;

import java.util.ArrayList;
import java.util.List;

/**
 * A workload in phases, for the balloon: grow the heap, hold it, drop it, idle, grow again.
 *
 * <p>Usage: {@code Phases [GROW_MB [HOLD_S [IDLE_S]]]} (defaults 300, 5, 30). Prints one line per
 * phase, {@code phase NAME t=SECONDS}, so a test or benchmark can line the phases up with what the
 * host saw. The second growth must complete: an OutOfMemoryError exits with status 3.
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

    public static void main(String[] args) throws InterruptedException {
        int growMb = args.length > 0 ? Integer.parseInt(args[0]) : 300;
        int holdS = args.length > 1 ? Integer.parseInt(args[1]) : 5;
        int idleS = args.length > 2 ? Integer.parseInt(args[2]) : 30;
        try {
            phase("start");
            List<byte[]> held = grow(growMb);
            phase("grown");
            Thread.sleep(holdS * 1000L);
            held.clear();
            held = null;
            phase("dropped");
            Thread.sleep(idleS * 1000L);
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
