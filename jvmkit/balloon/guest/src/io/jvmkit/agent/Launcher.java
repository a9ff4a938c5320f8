package io.jvmkit.agent;

import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.lang.reflect.Modifier;
import java.util.Arrays;

/**
 * {@code java ... io.jvmkit.agent.Launcher <main class> [args...]}: runs the application's main
 * like the java launcher does, then ends the JVM with System.exit, which OSv needs to power off
 * (there a returning main does not end the VM).
 *
 * <ul>
 *   <li>the main class is loaded by the system class loader; {@code static void main(String[])}
 *       (also non-public, as Java 25 allows), then {@code static void main()}, then the instance
 *       forms with a no-argument constructor;
 *   <li>when main returns, waits for all non-daemon threads to end (as DestroyJavaVM does), then
 *       exits 0;
 *   <li>an exception escaping main goes to the thread's uncaught exception handler (by default
 *       {@code Exception in thread "main" ...} and the stack trace on stderr), and the exit status
 *       is 1, again after the non-daemon threads end;
 *   <li>System.exit(n) from the application passes through.
 * </ul>
 */
public final class Launcher {
    private Launcher() {}

    public static void main(String[] args) throws InterruptedException {
        if (args.length == 0) {
            System.err.println("usage: java ... io.jvmkit.agent.Launcher <main class> [args...]");
            System.exit(2);
        }
        String mainClass = args[0];
        String[] appArgs = Arrays.copyOfRange(args, 1, args.length);
        Runnable entry;
        try {
            entry = entryPoint(mainClass, appArgs);
        } catch (ClassNotFoundException | NoClassDefFoundError e) {
            System.err.println("Error: Could not find or load main class " + mainClass);
            System.err.println("Caused by: " + e);
            System.exit(1);
            return;
        } catch (NoSuchMethodException e) {
            System.err.println("Error: Main method not found in class " + mainClass
                    + ", please define the main method as:\n   public static void main(String[] args)");
            System.exit(1);
            return;
        }
        int status = 0;
        try {
            entry.run();
        } catch (Throwable t) {
            status = 1;
            Thread self = Thread.currentThread();
            trimLauncherFrames(t);
            self.getUncaughtExceptionHandler().uncaughtException(self, t);
        }
        AppThreads.awaitNonDaemon();
        System.exit(status);
    }

    /** The application's main as a Runnable that throws what main throws. */
    static Runnable entryPoint(String name, String[] args) throws ClassNotFoundException, NoSuchMethodException {
        Class<?> cls = Class.forName(name, false, ClassLoader.getSystemClassLoader());
        Method withArgs = find(cls, true);
        Method noArgs = withArgs == null ? find(cls, false) : null;
        Method main = withArgs != null ? withArgs : noArgs;
        if (main == null || main.getReturnType() != void.class) {
            throw new NoSuchMethodException(name + ".main");
        }
        main.setAccessible(true);
        return new Entry(cls, main, withArgs != null ? new Object[] {args} : new Object[0]);
    }

    /**
     * The call of main. A named class, not a lambda: a lambda's first use spins method-handle
     * classes at run time (invokedynamic bootstrap), which cost ~0.3 s of every start under
     * emulation, before the app's main ran.
     */
    private static final class Entry implements Runnable {
        private final Class<?> cls;
        private final Method main;
        private final Object[] callArgs;

        Entry(Class<?> cls, Method main, Object[] callArgs) {
            this.cls = cls;
            this.main = main;
            this.callArgs = callArgs;
        }

        @Override
        public void run() {
            try {
                Object target = null;
                if (!Modifier.isStatic(main.getModifiers())) {
                    var ctor = cls.getDeclaredConstructor();
                    ctor.setAccessible(true);
                    target = ctor.newInstance();
                }
                main.invoke(target, callArgs);
            } catch (InvocationTargetException e) {
                throw sneaky(e.getCause());
            } catch (ReflectiveOperationException e) {
                throw sneaky(e);
            }
        }
    }

    /** main(String[]) or main(), non-private, declared in the class or inherited. */
    private static Method find(Class<?> cls, boolean withArgs) {
        for (Class<?> c = cls; c != null; c = c.getSuperclass()) {
            try {
                Method m = withArgs ? c.getDeclaredMethod("main", String[].class) : c.getDeclaredMethod("main");
                if (!Modifier.isPrivate(m.getModifiers())) {
                    return m;
                }
            } catch (NoSuchMethodException e) {
                // look further up
            }
        }
        return null;
    }

    /** Drop the launcher's and reflection's frames from the bottom of the trace, as java shows none. */
    private static void trimLauncherFrames(Throwable t) {
        StackTraceElement[] trace = t.getStackTrace();
        int end = trace.length;
        while (end > 0 && isLauncherFrame(trace[end - 1])) {
            end--;
        }
        if (end > 0 && end < trace.length) {
            t.setStackTrace(Arrays.copyOf(trace, end));
        }
    }

    private static boolean isLauncherFrame(StackTraceElement frame) {
        String c = frame.getClassName();
        return c.startsWith(Launcher.class.getName()) || c.startsWith("java.lang.reflect.")
                || c.startsWith("jdk.internal.reflect.") || c.startsWith("java.lang.invoke.");
    }

    @SuppressWarnings("unchecked")
    private static <T extends Throwable> RuntimeException sneaky(Throwable t) throws T {
        throw (T) t;
    }
}
