"""The JVM-aware balloon end to end: a phased app in a real guest, the real agent, JMX and QMP.

One guest runs samples/phases (grow 300 MiB, hold, drop, idle 60 s, grow again) under
`jvmkit run --balloon`; the test reads the controller's JSON-lines log and QEMU's RSS, steers the
VM with `jvmkit balloon set`, and finally cuts the JMX port forward to check that a lost guest
agent means deflate. Marked `vm` (about 2 minutes under TCG).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jvmkit.vm.qmp import QmpClient
from support.images import build_samples, pack_image

pytestmark = pytest.mark.vm

JVMKIT = [sys.executable, "-m", "jvmkit"]
GROW_MB = 300


def cli(*args, timeout=120):
    return subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


@pytest.fixture(scope="module")
def phases_image(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("phases")
    jar = build_samples(out, names=["phases"])["phases"]
    return pack_image(jar, out / "phases.jvmkit", "linux", "--memory", "1G", "--jvm-arg=-Xmx600m")


def test_balloon_gives_idle_heap_back_and_never_starves(phases_image, tmp_path):
    log = tmp_path / "balloon.jsonl"
    name = f"balloon-{os.getpid()}"
    proc = subprocess.Popen([*JVMKIT, "run", "--balloon", "--balloon-log", str(log), "--balloon-interval", "1.5",
                             "--name", name, str(phases_image), "--", str(GROW_MB), "3", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        out_lines: list[str] = []

        def phase(name_):
            line = proc.stdout.readline()
            out_lines.append(line)
            return line.startswith(f"phase {name_}")

        wait_for(lambda: phase("dropped"), 240, "the app to drop its heap")
        dropped_at = time.time()
        decisions = lambda: [r for r in read_log(log) if r["event"] == "decision"]  # noqa: E731
        peak_rss = max((r.get("qemu_rss_mib", 0) for r in read_log(log)), default=0)

        # During the idle phase the heap is shrunk and the memory reaches the host.
        def reclaimed():
            late = [r for r in decisions() if r["time"] >= dropped_at]
            shrinks = [r for r in late if r["action"] == "shrink"]
            return shrinks and min(r["qemu_rss_mib"] for r in late)

        wait_for(reclaimed, 45, "a shrink decision after the drop")
        time.sleep(6)
        records = read_log(log)
        peak_rss = max(peak_rss, max(r.get("qemu_rss_mib", 0) for r in records if r["time"] <= dropped_at + 2))
        late = [r for r in records if r["event"] == "decision" and r["time"] >= dropped_at]
        low_rss = min(r["qemu_rss_mib"] for r in late)
        committed = [r["achieved"].get("heap_committed") for r in late if "heap_committed" in r.get("achieved", {})]
        assert committed and min(committed) / 2**20 <= 600 - GROW_MB / 2, committed
        assert peak_rss - low_rss >= GROW_MB / 2, (peak_rss, low_rss)
        # Every decision stayed within [floor, ceiling] and logged its numbers.
        for r in read_log(log):
            if r["event"] == "decision":
                assert 256 <= r["balloon_target_mib"] <= 1024
                assert "heap_used_mib" in r["numbers"]

        # `balloon set` below the live heap stops at the floor the policy allows.
        result = cli("balloon", "set", name, "100M", "--json")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["requested_mib"] == 100 and answer["target_mib"] >= 256 and answer["floor_limited"]
        status = cli("balloon", "status", name, "--json")
        row = json.loads(status.stdout)["vms"][0]
        assert row["name"] == name and row["memory_mib"] == 1024

        # Cut the guest's network link: the host agent loses the guest agent and must deflate.
        state = json.loads(cli("ps", "--json").stdout)
        vm = next(v for v in state["vms"] if v["name"] == name)
        with QmpClient.connect(Path(vm["qmp"]), timeout=5) as qmp:
            qmp.execute("set_link", name="net0", up=False)

        def deflated():
            lost = [r for r in read_log(log) if r["event"] == "lost-contact"]
            if not lost:
                return False
            with QmpClient.connect(Path(vm["qmp"]), timeout=5) as qmp:
                return qmp.execute("query-balloon")["actual"] == 1024 * 2**20

        wait_for(deflated, 60, "the balloon to deflate after losing the guest agent")

        # The second growth completes without OutOfMemoryError; the app exits 0.
        rest, err = proc.communicate(timeout=240)
        output = "".join(out_lines) + rest
        assert proc.returncode == 0, err
        assert f"regrew {GROW_MB} MiB" in output and "OutOfMemoryError" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
