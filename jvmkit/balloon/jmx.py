"""Host-side JMX client for the guest agent, through JPype.

Owns everything the host does over JMX: starting the one in-process JVM (from the host JDK:
`JAVA_HOME`, else `/usr/lib/jvm/java-17-openjdk-amd64`, else JPype's default), connecting to a
guest's `io.jvmkit:type=Balloon` MXBean at `service:jmx:rmi:///jndi/rmi://HOST:PORT/jmxrmi` with
the run's credentials, and turning Java failures into `JmxError` (with `kind` "refused", "auth",
"timeout", "lost" or "failed"; `JmxAuthError` for refused credentials).

Every remote call runs on a helper thread and is bounded in time (an RMI call to a frozen guest
would otherwise block forever); RMI's own handshake/response timeouts are also set before the
JVM's RMI classes load. JPype can start one JVM per process and it is never shut down here.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from jvmkit.errors import JvmkitError

OBJECT_NAME = "io.jvmkit:type=Balloon"
DEFAULT_JDK = Path("/usr/lib/jvm/java-17-openjdk-amd64")
CONNECT_TIMEOUT = 15.0
CALL_TIMEOUT = 10.0
# shrink runs hooks (up to 8 s) and collections (up to 10 s), and may wait for uncommit (8 s)
SHRINK_TIMEOUT = 40.0

# System properties for the host JVM's RMI client, in milliseconds.
RMI_PROPERTIES = {
    "sun.rmi.transport.tcp.handshakeTimeout": "10000",
    "sun.rmi.transport.tcp.responseTimeout": "60000",
    "sun.rmi.transport.connectionTimeout": "15000",
}

T = TypeVar("T")

_jvm_lock = threading.Lock()


class JmxError(JvmkitError):
    """A JMX connection or call failed.

    `kind`: "refused" (nothing listens), "auth" (credentials refused; a JmxAuthError), "timeout",
    "lost" (an established connection broke: the guest went away) or "failed" (anything else).
    """

    def __init__(self, message: str, *, kind: str = "failed", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.kind = kind


class JmxAuthError(JmxError):
    """The guest agent refused the user name or password."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message, kind="auth", hint=hint)


@dataclass(frozen=True)
class BalloonStats:
    heap_used: int
    heap_committed: int
    heap_max: int
    gc_name: str
    soft_target: int  # -1: none
    gc_count: int
    gc_time_millis: int
    last_shrink: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# MXBean attribute name -> BalloonStats field
_ATTRIBUTES = {
    "HeapUsed": "heap_used",
    "HeapCommitted": "heap_committed",
    "HeapMax": "heap_max",
    "GcName": "gc_name",
    "SoftTarget": "soft_target",
    "GcCount": "gc_count",
    "GcTimeMillis": "gc_time_millis",
    "LastShrink": "last_shrink",
}
# java.lang:type=OperatingSystem attributes (JDK 14+; jvmkit's runtimes are 17+) for guest_memory
_OS_MEMORY = ("TotalMemorySize", "FreeMemorySize")


def find_libjvm(java_home: Path | None = None) -> Path:
    """libjvm.so of `java_home`, else of $JAVA_HOME, else of the default JDK, else JPype's guess."""
    candidates: list[Path] = []
    if java_home is not None:
        candidates.append(Path(java_home))
    elif os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    candidates.append(DEFAULT_JDK)
    for home in candidates:
        for rel in ("lib/server/libjvm.so", "jre/lib/amd64/server/libjvm.so", "lib/client/libjvm.so"):
            path = home / rel
            if path.is_file():
                return path
        found = sorted(home.glob("**/libjvm.so")) if home.is_dir() else []
        if found:
            return found[0]
    try:
        import jpype

        return Path(jpype.getDefaultJVMPath())
    except Exception as exc:  # JPype raises its own JVMNotFoundException
        raise JmxError(
            "cannot find a JDK for the JMX client (no libjvm.so)",
            hint="set JAVA_HOME to a JDK 17 or newer",
        ) from exc


def ensure_jvm(java_home: Path | None = None) -> None:
    """Start the process's JVM for JMX if it is not running yet (once per process)."""
    import jpype
    import jpype.config

    with _jvm_lock:
        if not jpype.isJVMStarted():
            libjvm = find_libjvm(java_home)
            options = [f"-D{k}={v}" for k, v in RMI_PROPERTIES.items()]
            # -Xrs: the JVM must not take SIGTERM/SIGINT from jvmkit (its exit codes and clean stop)
            options += ["-Xrs", "-Xss1m", "-XX:+UseSerialGC", "-Xmx64m", "-Xshare:auto"]
            # A JMX client needs neither C2 nor a heap that starts at -Xmx. Measured: a process with
            # 8 connections, each read every 0.5 s for 60 s, 98 MiB PSS with the options above, 77
            # with C1 only and a 16M code cache (3.1M of it used), 58 with -Xms8m as well (the
            # brain of 8 fleet VMs had 116 MiB PSS in benchmarks/density.py).
            options += ["-XX:TieredStopAtLevel=1", "-XX:ReservedCodeCacheSize=16m", "-Xms8m"]
            jpype.config.destroy_jvm = False  # never wait for Java threads at interpreter exit
            try:
                jpype.startJVM(str(libjvm), *options, convertStrings=False, interrupt=False)
            except Exception as exc:
                raise JmxError(f"cannot start the JVM for the JMX client from {libjvm}: {exc}") from exc
        else:  # someone else started it: the properties still apply if RMI has not loaded yet
            system = jpype.JClass("java.lang.System")
            for key, value in RMI_PROPERTIES.items():
                if system.getProperty(key) is None:
                    system.setProperty(key, value)


def _detach_thread() -> None:
    """Detach the calling thread from the JVM. JPype attaches every Python thread that calls Java
    and never detaches one by itself: each JMX call's thread stayed a Java thread, with the
    temporary direct buffers its socket I/O cached (measured: 300 calls, 300 more Java threads;
    the balloon brain of 8 VMs ran out of its 62M of direct memory after ~15 min, and every VM
    lost contact with it)."""
    try:
        import jpype

        if jpype.isJVMStarted():
            thread = jpype.JClass("java.lang.Thread")
            if thread.isAttached():
                thread.detach()
    except Exception:  # never worse than the leak
        pass


def _bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run fn on a daemon thread; raise JmxError(kind="timeout") if it takes longer than timeout."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)
        finally:
            _detach_thread()

    worker = threading.Thread(target=run, name=f"jmx-{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise JmxError(f"{what} timed out after {timeout:g} s", kind="timeout")
    if error:
        raise error[0]
    return result[0]


def _java_chain(exc: BaseException) -> list[Any]:
    """The Java exception and its causes (JPype exceptions are Java Throwables)."""
    chain = []
    current = exc
    seen = 0
    while current is not None and seen < 20:
        chain.append(current)
        try:
            current = current.getCause()
        except Exception:
            break
        seen += 1
    return chain


def _classify(exc: BaseException, where: str, action: str, connected: bool = False) -> JmxError:
    """Turn a Java exception from connecting or calling into a JmxError with a clear message."""
    import jpype

    if isinstance(exc, JmxError):
        return exc
    if not isinstance(exc, jpype.JException):
        return JmxError(f"{action} {where} failed: {exc}")
    chain = _java_chain(exc)
    names = [str(c.getClass().getName()) for c in chain]
    text = " ".join(str(c.getMessage() or "") for c in chain)
    last = chain[-1]
    detail = f"{last.getClass().getSimpleName()}: {last.getMessage()}"
    if "java.lang.SecurityException" in names:
        return JmxAuthError(f"the guest agent at {where} refused the JMX credentials")
    if any(n.endswith("SocketTimeoutException") for n in names) or "timed out" in text.lower():
        return JmxError(f"{action} {where} timed out ({detail})", kind="timeout")
    io_failure = any(n.startswith(("java.rmi.", "java.net.", "java.io.")) for n in names)
    if connected and io_failure:
        return JmxError(f"lost the JMX connection to {where} ({detail})", kind="lost")
    if "java.rmi.ConnectException" in names or "java.net.ConnectException" in names or "Connection refused" in text:
        return JmxError(f"nothing accepts JMX connections at {where} ({detail})", kind="refused")
    return JmxError(f"{action} {where} failed: {detail}")


class JmxClient:
    """A connection to one guest agent's balloon MXBean."""

    def __init__(self, connector: Any, connection: Any, where: str):
        self._connector = connector
        self._connection = connection
        self.where = where
        import jpype

        self._name = jpype.JClass("javax.management.ObjectName")(OBJECT_NAME)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        user: str,
        password: str,
        timeout: float = CONNECT_TIMEOUT,
        java_home: Path | None = None,
    ) -> "JmxClient":
        ensure_jvm(java_home)
        import jpype

        where = f"{host}:{port}"
        url_text = f"service:jmx:rmi:///jndi/rmi://{_url_host(host)}:{int(port)}/jmxrmi"

        abandoned = threading.Event()

        def attempt() -> tuple[Any, Any]:
            JMXServiceURL = jpype.JClass("javax.management.remote.JMXServiceURL")
            JMXConnectorFactory = jpype.JClass("javax.management.remote.JMXConnectorFactory")
            JMXConnector = jpype.JClass("javax.management.remote.JMXConnector")
            HashMap = jpype.JClass("java.util.HashMap")
            env = HashMap()
            env.put(JMXConnector.CREDENTIALS, jpype.JArray(jpype.JString)([user, password]))
            connector = JMXConnectorFactory.connect(JMXServiceURL(url_text), env)
            try:
                connection = connector.getMBeanServerConnection()
                if abandoned.is_set():  # the caller timed out meanwhile: don't leak the connection
                    raise JmxError("abandoned", kind="timeout")
                return connector, connection
            except BaseException:
                connector.close()
                raise

        try:
            connector, connection = _bounded(attempt, timeout, f"connecting to JMX at {where}")
        except Exception as exc:
            abandoned.set()
            raise _classify(exc, where, "connecting to JMX at") from None
        return cls(connector, connection, where)

    def _call(self, what: str, fn: Callable[[], T], timeout: float) -> T:
        try:
            return _bounded(fn, timeout, f"{what} on {self.where}")
        except Exception as exc:
            raise _classify(exc, self.where, what + " on", connected=True) from None

    def balloon_stats(self, timeout: float = CALL_TIMEOUT) -> BalloonStats:
        import jpype

        names = list(_ATTRIBUTES)

        def read() -> dict[str, Any]:
            attrs = self._connection.getAttributes(self._name, jpype.JArray(jpype.JString)(names))
            return {str(a.getName()): a.getValue() for a in attrs.asList()}

        values = self._call("reading the balloon stats", read, timeout)
        missing = [n for n in names if n not in values]
        if missing:
            raise JmxError(f"the guest agent at {self.where} did not report {', '.join(missing)}")
        fields = {}
        for attr, field in _ATTRIBUTES.items():
            value = values[attr]
            fields[field] = str(value) if field in ("gc_name", "last_shrink") else int(value)
        return BalloonStats(**fields)

    def guest_memory(self, timeout: float = CALL_TIMEOUT) -> tuple[int, int] | None:
        """(total, free) bytes of the guest's memory as its JVM sees it (the platform
        OperatingSystem MXBean: sysinfo(2) on a kernel without cgroups, OSv's included), or None
        where the JVM does not report them. For guests whose balloon has no stats queue (OSv)."""
        import jpype

        def read() -> dict[str, Any]:
            name = jpype.JClass("javax.management.ObjectName")("java.lang:type=OperatingSystem")
            attrs = self._connection.getAttributes(name, jpype.JArray(jpype.JString)(list(_OS_MEMORY)))
            return {str(a.getName()): a.getValue() for a in attrs.asList()}

        values = self._call("reading the guest's memory", read, timeout)
        total, free = values.get("TotalMemorySize"), values.get("FreeMemorySize")
        if total is None or free is None or int(total) <= 0 or int(free) < 0:
            return None
        return int(total), int(free)

    def _invoke_long(self, operation: str, value: int, timeout: float) -> int:
        import jpype

        def call() -> int:
            args = jpype.JArray(jpype.JObject)([jpype.JClass("java.lang.Long")(int(value))])
            sig = jpype.JArray(jpype.JString)(["long"])
            return int(self._connection.invoke(self._name, operation, args, sig))

        return self._call(f"{operation}({value})", call, timeout)

    def shrink_to(self, target_bytes: int, timeout: float = SHRINK_TIMEOUT) -> int:
        """Ask the guest to shrink its heap to `target_bytes` committed; returns the committed bytes achieved."""
        return self._invoke_long("shrinkTo", target_bytes, timeout)

    def grow_to(self, target_bytes: int, timeout: float = CALL_TIMEOUT) -> int:
        """Undo a shrink up to `target_bytes`; returns the committed bytes now."""
        return self._invoke_long("growTo", target_bytes, timeout)

    def vm_option(self, name: str, timeout: float = CALL_TIMEOUT) -> str:
        """A HotSpot VM flag's current value in the guest (for diagnostics and tests)."""
        import jpype

        def read() -> str:
            hotspot = jpype.JClass("javax.management.ObjectName")("com.sun.management:type=HotSpotDiagnostic")
            args = jpype.JArray(jpype.JObject)([jpype.JString(name)])
            sig = jpype.JArray(jpype.JString)(["java.lang.String"])
            data = self._connection.invoke(hotspot, "getVMOption", args, sig)
            return str(data.get("value"))

        return self._call(f"reading VM option {name}", read, timeout)

    def close(self, timeout: float = 5.0) -> None:
        connector, self._connector = self._connector, None
        if connector is None:
            return
        try:
            _bounded(connector.close, timeout, f"closing JMX to {self.where}")
        except Exception:
            pass  # the guest may be gone already; nothing to release on our side

    def __enter__(self) -> "JmxClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
