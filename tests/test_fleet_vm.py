"""A fleet of real guests: `jvmkit up -d` of samples/cache-service, the host's balloon brain, `down`.

One module-scoped fleet of three linux VMs (640M each, balloon, weight 1/1/2) and a fourth entry
whose floor cannot fit in `host_memory`, in a run root of its own (XDG_RUNTIME_DIR), so this
test's brain sees only its own VMs. In order:
- the three answer through their published ports, `ps` groups them under the fleet, the fourth
  is refused with one line saying how much is missing;
- the brain squeezes every idle guest below its ceiling within the budget;
- the brain is killed with SIGKILL while the balloons are inflated: every balloon is deflated to
  its ceiling within a few seconds, every VM keeps serving, and a new brain takes over;
- the brain hangs (SIGSTOP): the same, but no second brain starts while it holds its lock, and
  it squeezes again once it runs (SIGCONT);
- a VM with restart = "always" that exits is started again;
- `down` leaves no QEMU, no run directory and no fleet state.
Marked `vm` (a few minutes under TCG).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support.images import ROOT
from support.servers import free_port, http_body_when_up
from jvmkit.vm.qmp import QmpClient

pytestmark = pytest.mark.vm

JVMKIT = [sys.executable, "-m", "jvmkit"]
MEMORY = 640


def cli(*args, env, timeout=180):
    return subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def balloon_actual(root: Path, name: str) -> int | None:
    try:
        with QmpClient.connect(root / name / "qmp.sock", timeout=3) as qmp:
            return qmp.execute("query-balloon")["actual"] // 2**20
    except OSError:
        return None


def qemus(names) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.startswith("/") and "qemu-system" in line
            and any(f"-name {n} " in line for n in names)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    build = subprocess.run([sys.executable, str(ROOT / "samples/cache-service/build.py"), str(work / "cs")],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, XDG_RUNTIME_DIR=str(work / "xdg"))
    (work / "xdg").mkdir()
    image = work / "cs.jvmkit"
    packed = cli("pack", work / "cs/cache-service.jar", "--target", "linux", "--memory", f"{MEMORY}M", "-o", image,
                 env=env, timeout=900)
    assert packed.returncode == 0, packed.stderr
    base = free_port()
    while any(_taken(base + k) for k in range(3)):
        base = free_port()
    # budget: three floors of 256M + 228M for QEMU under TCG, and room to spare; the fourth
    # entry needs 2G + 228M, which is never left
    (work / "shop.toml").write_text(f'''\
name = "shop"
host_memory = "2400M"
[[vm]]
name = "cache"
image = "cs.jvmkit"
replicas = 3
memory = "{MEMORY}M"
min_memory = "256M"
publish = ["{base}+:8080"]
args = ["--port", "8080"]
restart = "always"
[[vm]]
name = "huge"
image = "cs.jvmkit"
memory = "2G"
balloon = false
''')
    up = cli("up", "-d", work / "shop.toml", env=env, timeout=600)
    data = {"work": work, "env": env, "root": work / "xdg" / "jvmkit", "base": base, "up": up,
            "names": ["cache-1", "cache-2", "cache-3"]}
    yield data
    cli("down", "shop", env=env)


def _taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def get(url: str, method: str = "GET") -> bytes:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    return urllib.request.urlopen(req, timeout=20).read()


def test_up_starts_what_fits_and_refuses_the_rest(fleet):
    up = fleet["up"]
    assert up.returncode == 1, up  # one VM was not admitted
    refusals = [line for line in up.stderr.splitlines() if "not started" in line]
    assert len(refusals) == 1 and refusals[0].startswith("jvmkit up: huge not started: its floor 2048M + ")
    assert "M missing" in refusals[0] and "host_memory of fleet shop" in refusals[0]
    for k, name in enumerate(fleet["names"]):
        assert name in up.stdout
        body = http_body_when_up(f"http://127.0.0.1:{fleet['base'] + k}/health", 120)
        assert body and "ok" in body, name
    rows = json.loads(cli("ps", "--json", env=fleet["env"]).stdout)["vms"]
    assert sorted(r["name"] for r in rows) == fleet["names"]
    assert all(r["fleet"] == "shop" for r in rows)
    human = cli("ps", env=fleet["env"]).stdout.splitlines()
    assert human[0].split()[:2] == ["FLEET", "NAME"] and all(line.startswith("shop ") for line in human[1:])


def test_the_brain_squeezes_idle_guests_within_the_budget(fleet):
    root = fleet["root"]
    for name in fleet["names"]:  # something in each cache, then idle
        get(f"http://127.0.0.1:{fleet['base'] + fleet['names'].index(name)}/fill?mb=32", "POST")
    wait_for(lambda: all((balloon_actual(root, n) or MEMORY) < MEMORY - 100 for n in fleet["names"]), 120,
             "every idle guest squeezed below its ceiling")
    status = json.loads(cli("balloon", "status", "--json", env=fleet["env"]).stdout)
    budget = status["budget"]
    assert budget["budget_mib"] == 2400 and budget["budget_from"] == "host_memory of fleet shop"
    assert budget["counted_mib"] <= 2400, budget
    rows = {r["name"]: r for r in status["vms"]}
    for name in fleet["names"]:
        r = rows[name]
        assert r["fleet"] == "shop" and r["weight"] == 1 and r["floor_mib"] and r["target_mib"], r
        assert r["floor_mib"] >= 256 and r["guest_mib"] >= min(r["floor_mib"], r["target_mib"]) - 1, r
    human = cli("balloon", "status", env=fleet["env"]).stdout.splitlines()
    assert "TARGET" in human[0] and "WEIGHT" in human[0] and human[-1].startswith("host budget 2400M")


def test_a_killed_brain_leaves_no_guest_squeezed(fleet):
    root, names = fleet["root"], fleet["names"]
    wait_for(lambda: all((balloon_actual(root, n) or MEMORY) < MEMORY for n in names), 60, "inflated balloons")
    beat = json.loads((root / ".brain" / "heartbeat.json").read_text())
    killed = beat["pid"]
    os.kill(killed, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: all(balloon_actual(root, n) == MEMORY for n in names), 8,
             "every balloon deflated to its ceiling after the brain's SIGKILL", every=0.2)
    print(f"all {len(names)} balloons deflated {time.monotonic() - t0:.1f}s after SIGKILL")
    for k, name in enumerate(names):  # still serving, cache hits and all
        assert b"ok" in get(f"http://127.0.0.1:{fleet['base'] + k}/health"), name
        assert len(get(f"http://127.0.0.1:{fleet['base'] + k}/item/after-kill")) == 64 * 1024
    text = (root / ".fleet" / "shop.log").read_text()  # the VMs' lines, as the supervisor prefixed them
    assert all(f"jvmkit-balloon: {n}: the balloon brain is gone (its lock is free): balloon deflated" in text
               for n in names), text[-3000:]
    # a new brain takes over (after the lease's respawn delay) and squeezes them again
    new = wait_for(lambda: (json.loads((root / ".brain" / "heartbeat.json").read_text()).get("pid")
                            if (root / ".brain" / "heartbeat.json").exists() else None) not in (None, killed)
                   and json.loads((root / ".brain" / "heartbeat.json").read_text())["pid"], 60, "a new brain")
    assert new != killed
    wait_for(lambda: all((balloon_actual(root, n) or MEMORY) < MEMORY for n in names), 90,
             "the new brain squeezing the guests again")


def test_a_hung_brain_leaves_no_guest_squeezed(fleet):
    """SIGSTOP: the lock stays held, so no second brain starts; the leases see the heartbeat
    stop and deflate; once the brain runs again it squeezes again."""
    root, names = fleet["root"], fleet["names"]
    wait_for(lambda: all((balloon_actual(root, n) or MEMORY) < MEMORY for n in names), 90, "inflated balloons")
    pid = json.loads((root / ".brain" / "heartbeat.json").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        wait_for(lambda: all(balloon_actual(root, n) == MEMORY for n in names), 12,
                 "every balloon deflated while the brain is stopped", every=0.2)
        print(f"all {len(names)} balloons deflated {time.monotonic() - t0:.1f}s after SIGSTOP")
        for k, name in enumerate(names):
            assert b"ok" in get(f"http://127.0.0.1:{fleet['base'] + k}/health"), name
        time.sleep(12)  # past the respawn delay: still the same brain, still deflated
        assert json.loads((root / ".brain" / "heartbeat.json").read_text())["pid"] == pid
        assert all(balloon_actual(root, n) == MEMORY for n in names)
        text = (root / ".fleet" / "shop.log").read_text()
        assert all(f"jvmkit-balloon: {n}: the balloon brain does not answer (last heartbeat" in text for n in names)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: all((balloon_actual(root, n) or MEMORY) < MEMORY for n in names), 90,
             "the brain squeezing again once it runs")


def test_a_vm_that_exits_is_restarted(fleet):
    url = f"http://127.0.0.1:{fleet['base'] + 1}"
    get(url + "/shutdown", "POST")
    text = lambda: (fleet["root"] / ".fleet" / "shop.log").read_text()  # noqa: E731
    wait_for(lambda: "cache-2 | exited with status 0; restart 1 in 1s (restart = always)" in text(), 60,
             "the supervisor to see cache-2 exit")
    body = http_body_when_up(url + "/health", 120)
    assert body and "ok" in body
    assert "cache-2 | starting (restart 1)" in text()


def test_down_leaves_no_qemu(fleet):
    env, root, names = fleet["env"], fleet["root"], fleet["names"]
    assert qemus(names), "the fleet's QEMUs before down"
    proc = cli("down", fleet["work"] / "shop.toml", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("fleet shop is down: stopped cache-1, cache-2, cache-3"), proc.stdout
    wait_for(lambda: not qemus(names), 30, "no QEMU left")  # `down` stops them in turn: each up to its grace
    assert json.loads(cli("ps", "--json", env=env).stdout)["vms"] == []
    assert not (root / ".fleet" / "shop.json").exists()
    # each `jvmkit run` removes its directory once its QEMU is gone (retrying while the brain's
    # last status write lands: rundir.RunDir.remove)
    wait_for(lambda: not [p for p in root.iterdir() if p.name in names], 10, "no run directory left")
