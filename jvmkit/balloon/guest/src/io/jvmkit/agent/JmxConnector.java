package io.jvmkit.agent;

import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.nio.charset.StandardCharsets;
import java.rmi.registry.LocateRegistry;
import java.rmi.registry.Registry;
import java.rmi.server.RMIServerSocketFactory;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.HashMap;
import java.util.Map;
import java.util.Set;
import javax.management.MBeanServer;
import javax.management.remote.JMXAuthenticator;
import javax.management.remote.JMXConnectorServer;
import javax.management.remote.JMXPrincipal;
import javax.management.remote.JMXServiceURL;
import javax.management.remote.rmi.RMIConnectorServer;
import javax.management.remote.rmi.RMIJRMPServerImpl;
import javax.security.auth.Subject;

/**
 * The JMX remote connector, on ONE guest port for both the RMI registry and the connector, with
 * stubs that point at the host side of the port forward.
 *
 * <p>The registry and the connector's remote objects are exported on the <em>advertised</em> port
 * number with {@code java.rmi.server.hostname} = the advertised host, so every stub a client gets
 * says "advertised host:port". Their server socket factory ignores the port the RMI runtime asks for
 * and always binds the guest's listen port, on all interfaces; both exports share that one socket
 * because they use the same port number and factory. QEMU's hostfwd (or any forwarder) maps the
 * advertised port to the listen port. When both are equal this is the ordinary setup.
 *
 * <p>Clients must present the seed's user and password. RMI keeps a non-daemon thread alive while
 * objects are exported, so a watcher stops the connector once the application's last non-daemon
 * thread has ended, letting the JVM exit as it would without the agent.
 */
final class JmxConnector {
    private static final long EXIT_WATCH_MILLIS = 200;
    // JMX logs a client that went away ("The server has decided to close this client connection")
    // as a WARNING on the app's stderr; the host agent already handles that. Held so it stays set.
    private static final java.util.logging.Logger JMX_LOG = java.util.logging.Logger.getLogger("javax.management.remote");

    private JmxConnector() {}

    static JMXConnectorServer start(Seed seed, MBeanServer server) throws IOException {
        JMX_LOG.setLevel(java.util.logging.Level.SEVERE);
        String previous = System.getProperty("java.rmi.server.hostname");
        if (previous != null && !previous.equals(seed.advertiseHost())) {
            Log.info("java.rmi.server.hostname=" + previous + " replaced by " + seed.advertiseHost()
                    + " for the jvmkit JMX connector");
        }
        System.setProperty("java.rmi.server.hostname", seed.advertiseHost());

        FixedPortServerSocketFactory sockets = new FixedPortServerSocketFactory(seed.listenPort());
        Registry registry = LocateRegistry.createRegistry(seed.advertisePort(), null, sockets);

        Map<String, Object> env = new HashMap<>();
        env.put(JMXConnectorServer.AUTHENTICATOR, new PasswordAuthenticator(seed.user(), seed.password()));
        env.put(RMIConnectorServer.RMI_SERVER_SOCKET_FACTORY_ATTRIBUTE, sockets);
        RMIJRMPServerImpl exporter = new RMIJRMPServerImpl(seed.advertisePort(), null, sockets, env);
        // No /jndi/ path: the stub is bound below in our own registry object, locally; binding
        // through JNDI would dial the advertised address, which is not reachable from the guest.
        JMXServiceURL url = new JMXServiceURL("rmi", seed.advertiseHost(), seed.advertisePort());
        RMIConnectorServer connector = new RMIConnectorServer(url, env, exporter, server);
        connector.start();
        try {
            registry.rebind("jmxrmi", exporter.toStub());
        } catch (IOException | RuntimeException e) {
            connector.stop();
            throw e;
        }
        watchForExit(connector);
        return connector;
    }

    private static void watchForExit(JMXConnectorServer connector) {
        Thread watcher = new Thread(() -> {
            try {
                while (!AppThreads.nonDaemon().isEmpty()) {
                    Thread.sleep(EXIT_WATCH_MILLIS);
                }
                connector.stop(); // unexports everything; RMI's keep-alive thread ends with it
            } catch (InterruptedException e) {
                // the JVM is going down
            } catch (IOException | RuntimeException e) {
                Log.problem("stopping the JMX connector", e);
            }
        }, "jvmkit-agent-exit-watch");
        watcher.setDaemon(true);
        watcher.start();
    }

    /** Binds the fixed listen port on all interfaces, whatever port RMI asks for. */
    static final class FixedPortServerSocketFactory implements RMIServerSocketFactory {
        private final int port;

        FixedPortServerSocketFactory(int port) {
            this.port = port;
        }

        @Override
        public ServerSocket createServerSocket(int ignored) throws IOException {
            ServerSocket socket = new ServerSocket();
            try {
                socket.setReuseAddress(true);
                socket.bind(new InetSocketAddress(port), 50);
            } catch (IOException e) {
                socket.close();
                throw new IOException("cannot listen on port " + port + ": " + e.getMessage(), e);
            }
            return socket;
        }

        @Override
        public boolean equals(Object other) {
            return other instanceof FixedPortServerSocketFactory f && f.port == port;
        }

        @Override
        public int hashCode() {
            return Integer.hashCode(port) * 31 + 7;
        }
    }

    /** Accepts exactly the seed's user and password (compared in constant time). */
    static final class PasswordAuthenticator implements JMXAuthenticator {
        private final String user;
        private final byte[] userDigest;
        private final byte[] passwordDigest;

        PasswordAuthenticator(String user, String password) {
            this.user = user;
            this.userDigest = digest(user);
            this.passwordDigest = digest(password);
        }

        @Override
        public Subject authenticate(Object credentials) {
            if (!(credentials instanceof String[] pair) || pair.length != 2) {
                throw new SecurityException("Authentication failed: credentials must be {user, password}");
            }
            boolean userOk = MessageDigest.isEqual(userDigest, digest(pair[0]));
            boolean passwordOk = MessageDigest.isEqual(passwordDigest, digest(pair[1]));
            if (!(userOk & passwordOk)) {
                throw new SecurityException("Authentication failed: wrong user or password");
            }
            return new Subject(true, Set.of(new JMXPrincipal(user)), Set.of(), Set.of());
        }

        /** Hashing first makes the comparison independent of the lengths too. */
        private static byte[] digest(String value) {
            try {
                MessageDigest sha = MessageDigest.getInstance("SHA-256");
                return sha.digest(String.valueOf(value).getBytes(StandardCharsets.UTF_8));
            } catch (NoSuchAlgorithmException e) {
                throw new IllegalStateException(e);
            }
        }
    }
}
