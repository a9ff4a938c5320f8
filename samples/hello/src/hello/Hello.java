package hello;

/**
 * The smallest jvmkit sample: needs only java.base.
 *
 * <p>Prints {@code Hello from jvmkit} (and its arguments on a second line), then, by the first
 * argument:
 * <ul>
 *   <li>a number N: exits with status N ({@code System.exit(N)});</li>
 *   <li>{@code throw}: throws an uncaught exception (the JVM exits with status 1);</li>
 *   <li>{@code thread [MS]}: starts a non-daemon thread that prints {@code thread done} after MS
 *       milliseconds (default 500) while main returns at once; the JVM exits 0 when it ends;</li>
 *   <li>{@code sleep MS}: sleeps MS milliseconds, prints {@code slept}, exits 0;</li>
 *   <li>nothing (or anything else): main returns, exit status 0.</li>
 * </ul>
 */
public final class Hello {
    private Hello() {
    }

    public static void main(String[] args) throws Exception {
        System.out.println("Hello from jvmkit");
        if (args.length > 0) {
            System.out.println("args: " + String.join(" ", args));
        }
        System.out.flush();
        if (args.length == 0) {
            return;
        }
        String mode = args[0];
        if (mode.matches("-?[0-9]+")) {
            System.exit(Integer.parseInt(mode));
        } else if (mode.equals("throw")) {
            throw new IllegalStateException("thrown on request (argument 'throw')");
        } else if (mode.equals("thread")) {
            final long millis = args.length > 1 ? Long.parseLong(args[1]) : 500L;
            Thread worker = new Thread(() -> {
                try {
                    Thread.sleep(millis);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
                System.out.println("thread done");
                System.out.flush();
            }, "hello-worker");
            worker.setDaemon(false);
            worker.start();
            System.out.println("main done");
            System.out.flush();
        } else if (mode.equals("sleep")) {
            long millis = args.length > 1 ? Long.parseLong(args[1]) : 1000L;
            Thread.sleep(millis);
            System.out.println("slept");
            System.out.flush();
        }
    }
}
