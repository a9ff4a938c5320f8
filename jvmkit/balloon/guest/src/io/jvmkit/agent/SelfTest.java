package io.jvmkit.agent;

import java.util.ArrayList;
import java.util.List;

/**
 * Exercise shrink and grow in one JVM, without JMX or a VM:
 * {@code java -XX:+UseG1GC -cp agent.jar io.jvmkit.agent.SelfTest [allocMiB [targetMiB]]}.
 * Allocates allocMiB (default 150), drops it, shrinks to targetMiB (default 32), grows back, and
 * prints one line of key=value pairs (sizes in bytes) and the LastShrink text.
 */
public final class SelfTest {
    private SelfTest() {}

    @SuppressWarnings("unused")
    private static volatile Object sink;

    public static void main(String[] args) {
        long alloc = (args.length > 0 ? Long.parseLong(args[0]) : 150) * HeapSteering.MIB;
        long target = (args.length > 1 ? Long.parseLong(args[1]) : 32) * HeapSteering.MIB;
        Balloon balloon = new Balloon();
        List<byte[]> chunks = new ArrayList<>();
        for (long n = 0; n < alloc; n += 64 * 1024) {
            chunks.add(new byte[64 * 1024]);
        }
        sink = chunks;
        long peak = balloon.getHeapCommitted();
        chunks = null;
        sink = null;
        long shrunk = balloon.shrinkTo(target);
        long soft = balloon.getSoftTarget();
        String last = balloon.getLastShrink();
        long grown = balloon.growTo(balloon.getHeapMax());
        System.out.println("gc=" + balloon.getGcName() + " peak=" + peak + " shrunk=" + shrunk
                + " soft=" + soft + " grown=" + grown + " softAfterGrow=" + balloon.getSoftTarget()
                + " max=" + balloon.getHeapMax());
        System.out.println("last=" + last);
    }
}
