"""The JMX client's calls leave no Java thread behind (real JPype, real JVM in this process; no guest).

Each call runs on a thread of its own so that it can time out (jmx._bounded); JPype attaches such a
thread to the JVM and never detaches it by itself, and each one kept its socket I/O's cached
direct buffers: the balloon brain of an 8-VM fleet ran out of direct memory after ~15 minutes.
"""

import pytest

from jvmkit.balloon import jmx


def test_bounded_calls_leave_no_java_threads():
    jpype = pytest.importorskip("jpype")
    jmx.ensure_jvm()
    threads = jpype.JClass("java.lang.management.ManagementFactory").getThreadMXBean()
    system = jpype.JClass("java.lang.System")
    jmx._bounded(system.nanoTime, 10, "warm-up")
    before = threads.getThreadCount()
    for _ in range(200):
        jmx._bounded(system.nanoTime, 10, "a Java call")
    assert threads.getThreadCount() <= before + 2, "each call left a Java thread attached"
