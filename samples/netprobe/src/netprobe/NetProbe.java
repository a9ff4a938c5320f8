package netprobe;

import java.io.FileOutputStream;
import java.io.OutputStream;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.SocketTimeoutException;
import java.nio.charset.StandardCharsets;

/**
 * A guest that tries what a hostile app would try (the isolation tests run it; java.base only).
 *
 * <p>Usage, by the first argument:
 * <ul>
 *   <li>{@code connect HOST:PORT...}: a TCP connect to each (IPv6 as {@code [ADDR]:PORT}, 2 s
 *       timeout); one line each, {@code probe HOST:PORT open}, {@code ... refused},
 *       {@code ... timeout} or {@code ... error MESSAGE}; after an open connect it reads one line
 *       and prints it as {@code probe HOST:PORT said TEXT}. Then {@code probe done}, exit 0.</li>
 *   <li>{@code flood [FILE]}: writes numbered lines as fast as it can, forever, to FILE (e.g.
 *       {@code /dev/ttyS0}, the linux guest's console) or to stdout.</li>
 * </ul>
 */
public final class NetProbe {
    private static final int TIMEOUT_MS = 2000;

    private NetProbe() {
    }

    public static void main(String[] args) throws Exception {
        if (args.length > 0 && args[0].equals("flood")) {
            flood(args.length > 1 ? new FileOutputStream(args[1]) : System.out);
            return;
        }
        if (args.length == 0 || !args[0].equals("connect")) {
            System.out.println("usage: connect HOST:PORT... | flood [FILE]");
            System.exit(2);
        }
        for (int i = 1; i < args.length; i++) {
            System.out.println("probe " + args[i] + " " + connect(args[i]));
            System.out.flush();
        }
        System.out.println("probe done");
        System.out.flush();
    }

    private static String connect(String target) {
        int colon = target.lastIndexOf(':');
        String host = target.substring(0, colon);
        if (host.startsWith("[") && host.endsWith("]")) {
            host = host.substring(1, host.length() - 1);
        }
        int port = Integer.parseInt(target.substring(colon + 1));
        try (Socket socket = new Socket()) {
            socket.connect(new InetSocketAddress(host, port), TIMEOUT_MS);
            socket.setSoTimeout(TIMEOUT_MS);
            byte[] buffer = new byte[256];
            int n;
            try {
                n = socket.getInputStream().read(buffer);
            } catch (SocketTimeoutException e) {
                n = -1;
            }
            String said = n > 0 ? new String(buffer, 0, n, StandardCharsets.UTF_8).trim() : "";
            return said.isEmpty() ? "open" : "open\nprobe " + target + " said " + said;
        } catch (SocketTimeoutException e) {
            return "timeout";
        } catch (java.net.ConnectException e) {
            String message = String.valueOf(e.getMessage());
            return message.contains("timed out") ? "timeout" : "refused";
        } catch (Exception e) {
            return "error " + e.getClass().getSimpleName() + ": " + e.getMessage();
        }
    }

    private static void flood(OutputStream out) {
        PrintStream print = new PrintStream(out, false);
        StringBuilder pad = new StringBuilder();
        for (int i = 0; i < 100; i++) {
            pad.append('x');
        }
        for (long n = 0; ; n++) {
            print.println("flood " + n + " " + pad);
            if (n % 64 == 0) {
                print.flush();
            }
        }
    }
}
