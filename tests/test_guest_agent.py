"""The guest agent on the host, no VM: agent build, Shrinker API, GC steering, JMX, Launcher.

Real JVMs throughout: the agent is built into a temporary cache, small Java apps are compiled into
tmp dirs and run with `-javaagent`, and the host side talks to them through `jvmkit.balloon.jmx`
(JPype, one JVM for the whole pytest process). A Python TCP forwarder stands in for QEMU's
hostfwd, so the single-port/advertised-address setup is exercised as in a guest.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from support.servers import free_port
from jvmkit.balloon import agent_build
from jvmkit.balloon.agent_build import AGENT_MODULES, build_agent
from jvmkit.balloon.jmx import JmxAuthError, JmxClient, JmxError
from jvmkit.errors import JvmkitError

MIB = 1 << 20
JDK17 = Path(os.environ.get("JAVA_HOME") or "/usr/lib/jvm/java-17-openjdk-amd64")
JDK25 = Path("/usr/lib/jvm/temurin-25-jdk-amd64")

pytestmark = pytest.mark.skipif(not (JDK17 / "bin" / "javac").exists(), reason=f"no JDK at {JDK17}")

BALLOON_APP = r"""
import io.jvmkit.Shrinker;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.ArrayList;
import java.util.List;

public class BalloonApp {
    static final int CHUNK = 64 * 1024; // below G1's humongous threshold
    static volatile List<byte[]> data = new ArrayList<>();
    static volatile List<byte[]> cache = new ArrayList<>();

    public static void main(String[] args) throws Exception {
        for (int i = 0; i < 20 * 16; i++) cache.add(new byte[CHUNK]);
        Shrinker.register("cache", wanted -> {
            long n = (long) cache.size() * CHUNK;
            cache = new ArrayList<>();
            System.out.println("cache released " + n);
            return n;
        }, () -> (long) cache.size() * CHUNK);
        Shrinker.register("broken", wanted -> { throw new IllegalStateException("broken hook"); }, () -> 1L << 40);
        Shrinker.register("stuck", wanted -> {
            while (true) {
                try { Thread.sleep(1_000_000); } catch (InterruptedException e) { /* stuck for good */ }
            }
        }, () -> 1L << 41);
        System.out.println("ready " + Shrinker.class.getProtectionDomain().getCodeSource().getLocation());
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        for (String line; (line = in.readLine()) != null; ) {
            String[] w = line.trim().split(" ");
            switch (w[0]) {
                case "alloc" -> {
                    List<byte[]> grown = new ArrayList<>(data);
                    for (int i = 0; i < Integer.parseInt(w[1]) * 16; i++) grown.add(new byte[CHUNK]);
                    data = grown;
                }
                case "keep" -> data = new ArrayList<>(data.subList(0, Math.min(data.size(), Integer.parseInt(w[1]) * 16)));
                case "return" -> { System.out.println("returning"); return; }
                case "exit" -> System.exit(Integer.parseInt(w[1]));
                default -> { }
            }
            System.out.println("ok " + line);
        }
    }
}
"""

LAUNCHER_APP = r"""
public class LauncherApp {
    public static void main(String[] args) throws Exception {
        switch (args[0]) {
            case "thread" -> {
                Thread worker = new Thread(() -> {
                    try { Thread.sleep(1500); } catch (InterruptedException e) { }
                    System.out.println("worker done");
                });
                worker.start();
                System.out.println("main returned");
            }
            case "exit" -> System.exit(3);
            case "throw" -> fail();
            default -> { }
        }
    }

    static void fail() {
        throw new IllegalStateException("boom");
    }
}
"""


# ---------------------------------------------------------------- helpers



class Forwarder:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, like QEMU's hostfwd."""

    def __init__(self, target: int):
        self.target = target
        self.connections = 0
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self.connections += 1
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self._server.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


class JavaProcess:
    """A running java with its stdout/stderr collected line by line."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._cond = threading.Condition()
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines[name].append(line.rstrip("\n"))
                self._cond.notify_all()

    def expect(self, text: str, stream: str = "out", timeout: float = 30.0, start: int = 0) -> str:
        """Wait for a line containing `text` (among lines from index `start` on)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[stream][start:]:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and left < timeout - 1):
                    raise AssertionError(f"{text!r} not seen on std{stream}; got {self.text()}")
                self._cond.wait(min(left, 0.2))

    def send(self, command: str, timeout: float = 30.0) -> None:
        with self._cond:
            start = len(self.lines["out"])
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        self.expect("ok " + command, timeout=timeout, start=start)

    def text(self) -> str:
        with self._cond:
            return "stdout:\n" + "\n".join(self.lines["out"]) + "\nstderr:\n" + "\n".join(self.lines["err"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def write_seed(path: Path, listen: int, advertise: int, user: str = "jvmkit", password: str = "s3cret-pass") -> Path:
    path.write_text(
        f"# per-run seed\njmx.port={listen}\njmx.advertise=127.0.0.1:{advertise}\n"
        f"jmx.user={user}\njmx.password={password}\n"
    )
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JVMKIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def jars(cache_dir):
    return build_agent(JDK17 / "bin" / "javac", 17)


@pytest.fixture(scope="module")
def apps(jars, tmp_path_factory):
    """The test apps, compiled against shrinker-api.jar only."""
    src = tmp_path_factory.mktemp("app-src")
    out = tmp_path_factory.mktemp("app-classes")
    (src / "BalloonApp.java").write_text(BALLOON_APP)
    (src / "LauncherApp.java").write_text(LAUNCHER_APP)
    subprocess.run(
        [str(JDK17 / "bin" / "javac"), "--release", "17", "-cp", str(jars.api_jar), "-d", str(out),
         str(src / "BalloonApp.java"), str(src / "LauncherApp.java")],
        check=True, capture_output=True, text=True,
    )
    return out


def start_app(jars, apps, seed: Path | None, *jvm_args: str, main: str = "BalloonApp", args=(), java=JDK17):
    argv = [str(java / "bin" / "java"), *jvm_args, f"-javaagent:{jars.agent_jar}"]
    if seed is not None:
        argv.append(f"-Djvmkit.seed={seed}")
    argv += ["-cp", str(apps), main, *args]
    return JavaProcess(argv)


@pytest.fixture(scope="module")
def g1_app(jars, apps, tmp_path_factory):
    """BalloonApp under G1, JMX listening on one port and reached through a forwarder on another."""
    listen = free_port()
    forwarder = Forwarder(listen)
    seed = write_seed(tmp_path_factory.mktemp("seed") / "seed", listen, forwarder.port)
    app = start_app(jars, apps, seed, "-Xmx256m", "-XX:+UseG1GC")
    try:
        app.expect("ready")
        app.expect(f"jvmkit-agent: JMX ready on port {listen}", stream="err")
        yield app, forwarder, listen
    finally:
        app.stop()
        forwarder.close()


@pytest.fixture(scope="module")
def g1_client(g1_app):
    app, forwarder, _ = g1_app
    client = JmxClient.connect("127.0.0.1", forwarder.port, "jvmkit", "s3cret-pass", timeout=20)
    yield client
    client.close()


# ---------------------------------------------------------------- the build


def test_agent_build_is_cached_and_deterministic(jars, tmp_path, monkeypatch):
    assert AGENT_MODULES[0] == "java.base" and "java.management.rmi" in AGENT_MODULES
    with zipfile.ZipFile(jars.agent_jar) as jar:
        names = jar.namelist()
        manifest = jar.read("META-INF/MANIFEST.MF").decode()
        infos = jar.infolist()
    assert names[:2] == ["META-INF/", "META-INF/MANIFEST.MF"]
    assert "Premain-Class: io.jvmkit.agent.Agent\r\n" in manifest
    assert "Agent-Class: io.jvmkit.agent.Agent\r\n" in manifest
    for cls in ("io/jvmkit/Shrinker.class", "io/jvmkit/ShrinkHook.class", "io/jvmkit/agent/Launcher.class",
                "io/jvmkit/agent/Balloon.class", "io/jvmkit/agent/HeapSteering.class"):
        assert cls in names
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
    assert {i.external_attr >> 16 & 0o777 for i in infos} <= {0o644, 0o755}
    with zipfile.ZipFile(jars.api_jar) as api:
        classes = [n for n in api.namelist() if n.endswith(".class")]
    assert classes and all(re.fullmatch(r"io/jvmkit/[^/]+\.class", n) for n in classes)

    # cached: the same entry, not rebuilt
    mtime = jars.agent_jar.stat().st_mtime_ns
    again = build_agent(JDK17 / "bin" / "javac", 17)
    assert again == jars and again.agent_jar.stat().st_mtime_ns == mtime

    # deterministic: a fresh cache gives the same bytes
    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "other-cache"))
    fresh = build_agent(JDK17 / "bin" / "javac", 17)
    assert fresh.agent_jar != jars.agent_jar
    assert fresh.agent_jar.read_bytes() == jars.agent_jar.read_bytes()
    assert fresh.api_jar.read_bytes() == jars.api_jar.read_bytes()


def test_agent_build_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(JvmkitError, match="Java 17 or newer"):
        build_agent(JDK17 / "bin" / "javac", 11)
    fake = tmp_path / "javac"
    fake.write_text("#!/bin/sh\necho 'Foo.java:1: error: something is wrong' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(JvmkitError) as info:
        build_agent(fake, 17)
    assert "something is wrong" in str(info.value) and "\n" not in str(info.value)
    assert not any((tmp_path / "cache" / "agents").glob("agent-*"))  # nothing half-built left
    with pytest.raises(JvmkitError, match="cannot run javac"):
        build_agent(tmp_path / "no-such-javac", 17)


# ---------------------------------------------------------------- JMX, shrink, grow (G1)


def test_jmx_single_port_and_advertised_address(g1_app, g1_client):
    app, forwarder, listen = g1_app
    stats = g1_client.balloon_stats()
    assert stats.gc_name == "G1" and stats.soft_target == -1
    assert stats.heap_max == 256 * MIB
    assert forwarder.connections > 0  # everything went through the advertised port
    # the guest side listens on exactly one port: registry and connector share it
    assert listening_ports(app.proc.pid) == {listen}
    # the stubs point at the advertised (host-side) port, not the listen port
    import jpype

    registry = jpype.JClass("java.rmi.registry.LocateRegistry").getRegistry("127.0.0.1", forwarder.port)
    stub = str(registry.lookup("jmxrmi"))
    assert f"127.0.0.1:{forwarder.port}]" in stub and f":{listen}]" not in stub
    # the Shrinker API the app uses is the agent jar's copy (the app's class path has no API jar)
    assert app.expect("ready").endswith("agent.jar")


def test_guest_memory_is_what_the_jvm_reads_of_its_machine(g1_client):
    """The reading OSv guests are steered by (their balloon has no stats queue): here the app runs
    on the host, so it is the host's memory as sysinfo(2) gives it (or its cgroup's, where the JVM
    runs in one with a limit): non-zero, free within total, and both near what /proc/meminfo says."""
    from jvmkit.balloon.host import read_host_memory

    reading = g1_client.guest_memory()
    assert reading is not None
    total, free = reading
    assert 0 < free <= total
    host = read_host_memory()
    assert total <= host["total"] * 1.01 and free <= host["total"]


def test_wrong_credentials_are_refused(g1_app):
    _, forwarder, _ = g1_app
    with pytest.raises(JmxAuthError) as info:
        JmxClient.connect("127.0.0.1", forwarder.port, "jvmkit", "wrong-password", timeout=20)
    assert info.value.kind == "auth" and "refused the JMX credentials" in str(info.value)
    with pytest.raises(JmxAuthError):
        JmxClient.connect("127.0.0.1", forwarder.port, "someone", "s3cret-pass", timeout=20)
    with pytest.raises(JmxError) as refused:
        JmxClient.connect("127.0.0.1", free_port(), "jvmkit", "s3cret-pass", timeout=20)
    assert refused.value.kind == "refused" and not isinstance(refused.value, JmxAuthError)


def test_connect_to_a_silent_port_times_out():
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        started = time.monotonic()
        with pytest.raises(JmxError) as info:
            JmxClient.connect("127.0.0.1", silent.getsockname()[1], "jvmkit", "x", timeout=1.5)
        assert info.value.kind == "timeout"
        assert time.monotonic() - started < 5


def test_shrink_runs_hooks_and_uncommits_then_grow_restores(g1_app, g1_client):
    app, _, _ = g1_app
    app.send("alloc 150")
    app.send("keep 40")  # 110 MB garbage, 40 MB live
    before = g1_client.balloon_stats()
    assert before.heap_committed >= 150 * MIB
    assert g1_client.vm_option("MaxHeapFreeRatio") == "70"

    started = time.monotonic()
    achieved = g1_client.shrink_to(48 * MIB)
    took = time.monotonic() - started
    after = g1_client.balloon_stats()
    assert took < 15, f"shrink took {took:.1f} s"
    assert achieved == after.heap_committed or abs(achieved - after.heap_committed) < 8 * MIB
    assert achieved < before.heap_committed / 2 and achieved <= 80 * MIB, after.last_shrink
    assert achieved >= 40 * MIB  # never below the live heap
    assert 48 * MIB <= after.soft_target <= 80 * MIB
    assert after.gc_count > before.gc_count and after.gc_time_millis >= before.gc_time_millis
    # the free ratios were lowered to get there
    assert int(g1_client.vm_option("MaxHeapFreeRatio")) < 70
    assert int(g1_client.vm_option("MinHeapFreeRatio")) <= int(g1_client.vm_option("MaxHeapFreeRatio"))

    # hooks: largest estimate first; the stuck one is abandoned, the broken one logged, the cache released
    app.expect("cache released 20971520")
    app.expect("jvmkit-agent: shrinker hook 'stuck' did not finish in 2000 ms; skipped", stream="err")
    app.expect("jvmkit-agent: shrinker hook 'broken' threw java.lang.IllegalStateException: broken hook", stream="err")
    assert "stuck=did not finish" in after.last_shrink and "cache=20.0M" in after.last_shrink

    # a second shrink skips the still-stuck hook at once instead of waiting for it again
    started = time.monotonic()
    assert g1_client.shrink_to(32 * MIB) >= 40 * MIB  # below the live heap: stops at the floor
    assert time.monotonic() - started < 5
    assert "stuck=busy" in g1_client.balloon_stats().last_shrink

    grown = g1_client.grow_to(before.heap_max)
    assert grown > 0
    assert g1_client.vm_option("MaxHeapFreeRatio") == "70"
    assert g1_client.vm_option("MinHeapFreeRatio") == "40"
    assert g1_client.balloon_stats().soft_target == -1
    app.send("alloc 150", timeout=60)  # the heap grows back, no OutOfMemoryError
    assert g1_client.balloon_stats().heap_committed >= 150 * MIB


def test_app_exits_when_main_returns_with_a_client_connected(g1_app, g1_client):
    app, _, _ = g1_app
    g1_client.balloon_stats()  # connected right now
    app.proc.stdin.write("return\n")
    app.proc.stdin.flush()
    app.expect("returning")
    assert app.proc.wait(10) == 0  # RMI's keep-alive thread does not hold the JVM
    with pytest.raises(JmxError) as lost:
        g1_client.balloon_stats()
    assert lost.value.kind == "lost", lost.value


# ---------------------------------------------------------------- ZGC


def test_zgc_shrink_uses_soft_max_heap_size(jars, apps, tmp_path):
    listen = free_port()
    seed = write_seed(tmp_path / "seed", listen, listen)  # advertise == listen: the ordinary setup
    app = start_app(jars, apps, seed, "-Xmx256m", "-XX:+UseZGC", "-XX:ZUncommitDelay=1")
    try:
        app.expect(f"JMX ready on port {listen}", stream="err")
        with JmxClient.connect("127.0.0.1", listen, "jvmkit", "s3cret-pass", timeout=20) as client:
            app.send("alloc 150")
            app.send("keep 0")
            before = client.balloon_stats()
            assert before.gc_name == "ZGC"
            assert int(client.vm_option("SoftMaxHeapSize")) == before.heap_max
            achieved = client.shrink_to(32 * MIB)
            stats = client.balloon_stats()
            assert 32 * MIB <= stats.soft_target < before.heap_max
            assert int(client.vm_option("SoftMaxHeapSize")) == stats.soft_target
            assert "SoftMaxHeapSize" in stats.last_shrink
            assert achieved < before.heap_committed / 2, stats.last_shrink
            client.grow_to(stats.heap_max)
            assert int(client.vm_option("SoftMaxHeapSize")) == before.heap_max
            assert client.balloon_stats().soft_target == -1
    finally:
        app.stop()


# ---------------------------------------------------------------- Launcher


def launch(jars, apps, mode: str, seed: Path | None = None, java=JDK17):
    argv = [str(java / "bin" / "java"), f"-javaagent:{jars.agent_jar}"]
    if seed:
        argv.append(f"-Djvmkit.seed={seed}")
    argv += ["-cp", str(apps), "io.jvmkit.agent.Launcher", "LauncherApp", mode]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_launcher_waits_for_non_daemon_threads(jars, apps, tmp_path):
    # with the JMX connector running too: its RMI keep-alive thread must not be waited for
    listen = free_port()
    seed = write_seed(tmp_path / "seed", listen, listen)
    done = launch(jars, apps, "thread", seed)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["main returned", "worker done"]


def test_launcher_passes_system_exit_through(jars, apps):
    done = launch(jars, apps, "exit")
    assert done.returncode == 3, done.stderr


def test_launcher_uncaught_exception_exits_1_with_trace(jars, apps):
    done = launch(jars, apps, "throw")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0] == 'Exception in thread "main" java.lang.IllegalStateException: boom'
    assert lines[1].strip().startswith("at LauncherApp.fail(")
    assert lines[-1].strip().startswith("at LauncherApp.main(")  # no launcher/reflection frames
    assert "io.jvmkit" not in done.stderr


def test_launcher_missing_main_class(jars, apps):
    argv = [str(JDK17 / "bin" / "java"), "-cp", f"{apps}:{jars.agent_jar}", "io.jvmkit.agent.Launcher", "NoSuchApp"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "Error: Could not find or load main class NoSuchApp" in done.stderr


# ---------------------------------------------------------------- other collectors and JDKs


def selftest(jars, java: Path, *jvm_args: str) -> dict[str, str]:
    argv = [str(java / "bin" / "java"), "-Xmx256m", *jvm_args, "-cp", str(jars.agent_jar), "io.jvmkit.agent.SelfTest"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, last = done.stdout.splitlines()[:2]
    values = dict(item.split("=", 1) for item in first.split())
    values["last"] = last
    return values


@pytest.mark.parametrize(
    "jdk, flags, gc",
    [
        (JDK17, ("-XX:+UseSerialGC", "-Xms8m"), "Serial"),
        (JDK17, ("-XX:+UseShenandoahGC", "-Xms8m"), "Shenandoah"),
        (JDK25, ("-XX:+UseG1GC",), "G1"),
        (JDK25, ("-XX:+UseSerialGC", "-Xms8m"), "Serial"),
    ],
    ids=["17-serial", "17-shenandoah", "25-g1", "25-serial"],
)
def test_gc_steering_in_process(jars, jdk, flags, gc):
    if not (jdk / "bin" / "java").exists():
        pytest.skip(f"no JDK at {jdk}")
    r = selftest(jars, jdk, *flags)
    assert r["gc"] == gc
    assert int(r["shrunk"]) < int(r["peak"]) / 2, r["last"]
    assert int(r["soft"]) >= 32 * MIB and r["softAfterGrow"] == "-1"


def test_parallel_gc_is_best_effort_and_says_why(jars):
    r = selftest(jars, JDK17, "-XX:+UseParallelGC", "-Xms8m")
    assert r["gc"] == "Parallel" and r["softAfterGrow"] == "-1"
    if int(r["shrunk"]) > 64 * MIB:
        assert "UseAdaptiveSizePolicy" in r["last"]


def test_agent_built_for_java_25(tmp_path, monkeypatch):
    javac = JDK25 / "bin" / "javac"
    if not javac.exists():
        pytest.skip(f"no JDK at {JDK25}")
    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path / "cache"))
    jars25 = build_agent(javac, 25)
    assert jars25.key != agent_build.agent_key(17)
    r = selftest(jars25, JDK25, "-XX:+UseG1GC")
    assert r["gc"] == "G1" and int(r["shrunk"]) < int(r["peak"]) / 2


def test_agent_runs_on_a_runtime_with_only_agent_modules(jars, apps, tmp_path):
    """What the trimmed runtime adds for the agent is enough: MXBean, JMX, shrink, exit."""
    runtime = tmp_path / "runtime"
    subprocess.run(
        [str(JDK17 / "bin" / "jlink"), "--add-modules", ",".join(AGENT_MODULES), "--output", str(runtime),
         "--no-header-files", "--no-man-pages"],
        check=True, capture_output=True, text=True, timeout=120,
    )
    listen = free_port()
    seed = write_seed(tmp_path / "seed", listen, listen)
    app = start_app(jars, apps, seed, "-Xmx128m", java=runtime)
    try:
        app.expect(f"JMX ready on port {listen}", stream="err")
        with JmxClient.connect("127.0.0.1", listen, "jvmkit", "s3cret-pass", timeout=20) as client:
            app.send("alloc 60")
            app.send("keep 0")
            assert client.shrink_to(16 * MIB) < 64 * MIB
        app.proc.stdin.write("return\n")
        app.proc.stdin.flush()
        assert app.proc.wait(15) == 0
        assert "jvmkit-agent: cannot" not in app.text()
    finally:
        app.stop()
