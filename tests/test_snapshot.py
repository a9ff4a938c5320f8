"""Snapshots without booting a guest: the argvs, the match logic, the state stream, the manifest
section, the CLI's checks, and the guest agent's snapshot control in a real JVM on the host.

The guest side runs for real: a small app registers an io.jvmkit.Ready resource and signals, in a
JVM with the real guest agent and a seed that opens its snapshot control; the host side is
jvmkit.vm.snapctl over plain loopback (there is no QEMU user network in front of it here, so an
agent that is not listening refuses at once instead of accepting and closing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from support.servers import free_port
from jvmkit.packager import bundle as bundles
from jvmkit.packager.manifest import FileRecord, Manifest, ManifestError, SnapshotInfo
from jvmkit.vm import qemu, snapctl, snapstate, snapshot, snaptake
from jvmkit.vm.qemu import PortForward, VmConfig, device_signature, qemu_argv

JVMKIT = [sys.executable, "-m", "jvmkit"]
JDK17 = Path(os.environ.get("JAVA_HOME") or "/usr/lib/jvm/java-17-openjdk-amd64")


def cli(*args, timeout=600):
    return subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jvmkit: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


# ---- the argvs ------------------------------------------------------------------------------------

def linux_vm(run: Path, **changes) -> VmConfig:
    base = VmConfig(name="app-1", kernel=run / "vmlinux", initrd=run / "initrd", append="console=ttyS0",
                    memory_mib=512, cpus=1, accel="tcg", qmp_socket=run / "qmp.sock", console_log=run / "console.log",
                    machine="q35", low_memory_mib=256, fw_cfg=(("opt/io.jvmkit/seed", run / "seed"),),
                    ports=(PortForward("127.0.0.1", 41000, 7092),), vmgenid=True)
    return dataclasses.replace(base, **changes)


def osv_vm(run: Path, **changes) -> VmConfig:
    base = VmConfig(name="app-1", kernel=run / "loader.elf", disk=run / "disk.img", data_disks=(run / "seed.img",),
                    append="--rootfs=rofs java", memory_mib=512, cpus=1, accel="tcg", qmp_socket=run / "qmp.sock",
                    console_log=run / "console.log", app_serial=False, console_stdio=True, machine="pc",
                    disk_aio="io_uring", ports=(PortForward("127.0.0.1", 41000, 7092),))
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("vm", [linux_vm, osv_vm], ids=["linux", "osv"])
def test_a_restore_argv_is_the_saved_one_with_other_paths_ports_and_incoming(vm, tmp_path):
    saved = vm(tmp_path / "a")
    restored = vm(tmp_path / "b", name="app-2", incoming="fd:7", ports=(PortForward("127.0.0.1", 42000, 7092),),
                  disk_aio="threads")
    a, b = qemu_argv(saved), qemu_argv(restored)
    assert b[-2:] == ["-incoming", "fd:7"] and "-incoming" not in a
    assert device_signature(saved) == device_signature(restored)
    # the devices, in the same order, with the same ids
    assert [w for w in a if w.startswith("virtio-") or w.startswith("vmgenid")] == \
           [w for w in b if w.startswith("virtio-") or w.startswith("vmgenid")]
    assert ("-device" in a) and (("vmgenid,id=vmgenid0,guid=auto" in a) == (vm is linux_vm))


def test_the_device_signature_has_what_the_guest_sees_and_no_host_paths(tmp_path):
    signature = device_signature(osv_vm(tmp_path))
    assert "-machine pc" in signature and "-cpu max" in signature and "-m 512M" in signature
    assert not any(str(tmp_path) in s for s in signature)
    assert not any("aio=" in s or "file=/" in s for s in signature)
    assert any(s.startswith("-drive ") and "readonly=on" in s for s in signature)
    for change in ({"free_page_reporting": False}, {"rng": False}, {"cpus": 2}, {"memory_mib": 1024},
                   {"accel": "kvm"}, {"data_disks": ()}):
        assert device_signature(osv_vm(tmp_path, **change)) != signature, change
    # the translation cache tunes QEMU, not the guest: a snapshot restores with another --tcg-cache
    smaller = osv_vm(tmp_path, tcg_tb_mib=32)
    assert device_signature(smaller) == signature and "tb-size=32" in qemu_argv(smaller)[qemu_argv(smaller).index("-accel") + 1]


def test_hostfwd_add_command():
    assert qemu.hostfwd_add_command(PortForward("127.0.0.1", 8080, 80)) == "hostfwd_add net0 tcp:127.0.0.1:8080-:80"


# ---- the match logic ---------------------------------------------------------------------------

def record(**changes) -> SnapshotInfo:
    base = SnapshotInfo(state=FileRecord("snapshot/state-x.zst", "a" * 64, 10, compression="zstd", raw_size=20),
                        output=FileRecord("snapshot/output-x.txt", "b" * 64, 0), token="snapshot/token-x",
                        boot_files={"kernel": "k", "initramfs": "i"}, qemu_version="7.2.22", accel="tcg",
                        cpu_model="max", machine="q35,max-ram-below-4g=256M", memory_mib=512, cpus=1,
                        devices=("-m 512M", "-device virtio-rng-pci"), args=(), ready="signal", control_port=7092)
    return dataclasses.replace(base, **changes)


def wanted(**changes) -> snapshot.VmIdentity:
    info = record()
    base = snapshot.VmIdentity(qemu_version=info.qemu_version, accel=info.accel, cpu_model=info.cpu_model,
                               machine=info.machine, memory_mib=info.memory_mib, cpus=info.cpus,
                               devices=info.devices, args=info.args, boot_files=dict(info.boot_files))
    return dataclasses.replace(base, **changes)


def test_a_matching_snapshot_is_restored():
    assert snapshot.mismatch(record(), wanted()) is None


@pytest.mark.parametrize("change, words", [
    ({"memory_mib": 1024}, ["512M", "1G"]),
    ({"cpus": 2}, ["1 vCPU", "2"]),
    ({"args": ("--port", "9090")}, ["(none)", "--port 9090"]),
    ({"qemu_version": "8.2.0"}, ["QEMU 7.2.22", "8.2.0"]),
    ({"accel": "kvm"}, ["TCG", "KVM"]),
    ({"boot_files": {"kernel": "other", "initramfs": "i"}}, ["re-packed"]),
    ({"machine": "pc"}, ["machine"]),
    ({"devices": ("-m 512M", "-device virtio-rng-pci", "-device vmgenid,id=vmgenid0,guid=auto")}, ["vmgenid"]),
])
def test_a_snapshot_of_another_run_is_not_restored_and_the_reason_names_it(change, words):
    reason = snapshot.mismatch(record(), wanted(**change))
    assert reason is not None
    for word in words:
        assert word in reason, reason


def test_a_snapshot_saved_on_another_network_backend_is_not_restored():
    """Saved on slirp (jvmkit as root) and restored on passt, the guest did not answer passt's
    connections (the restore session was reset): that is a cold boot with the reason."""
    reason = snapshot.mismatch(record(network="slirp"), wanted(network="passt"))
    assert reason is not None and "slirp" in reason and "passt" in reason and "as root" in reason
    assert snapshot.mismatch(record(network="passt"), wanted(network="passt")) is None
    assert snapshot.mismatch(record(), wanted(network="passt")) is None  # not recorded: try it


def test_readiness_is_one_condition():
    assert snapshot.readiness(None, None, None).describe() == "signal"
    assert snapshot.readiness(8080, None, None).describe() == "port 8080"
    assert snapshot.readiness(None, "listening on", None).line.search("httpd listening on port 1")
    assert snapshot.readiness(None, None, 2.5).describe() == "after 2.5s"
    assert snapshot.readiness(None, None, None, "http://127.0.0.1:8080/health").describe() == \
        "url http://127.0.0.1:8080/health"
    from jvmkit.errors import UsageError
    for bad in ((8080, "x", None, None), (None, "(", None, None), (None, None, None, "ftp://x/"),
                (None, None, None, "http://x/a b")):
        with pytest.raises(UsageError):
            snapshot.readiness(*bad)


# ---- the control protocol's messages -----------------------------------------------------------

def test_restore_messages():
    seed = "jmx.port=7091\njmx.advertise=127.0.0.1:4000\njmx.user=jvmkit\njmx.password=pw\n"
    head = snapctl.restore_head("tok" * 8, entropy=bytes(range(4)), clock="busybox-date", seed="# c\n" + seed)
    lines = head.decode().splitlines()
    assert lines[0] == "jvmkit-restore " + "tok" * 8
    assert "entropy=00010203" in lines and "clock=busybox-date" in lines and "jmx.password=pw" in lines
    assert not any(line.startswith("#") for line in lines)
    assert snapctl.restore_tail(1234) == b"time=1234\nend\n"
    assert snapctl.parse_restored("restored lag=0 clock=set took=12") == {"lag": "0", "clock": "set", "took": "12"}
    assert snapctl.parse_prepared("prepared used=100 committed=20 live=10") == snapctl.Prepared(100, 20, 10)
    with pytest.raises(snapctl.ControlError):
        snapctl.parse_restored("error wrong token")
    with pytest.raises(snapctl.ControlError):
        snapctl.parse_prepared("prepared used=x")


# ---- the state stream ----------------------------------------------------------------------------

def test_the_state_stream_round_trips_and_a_changed_byte_is_refused(tmp_path):
    data = os.urandom(1 << 16) + bytes(3 << 20)  # some noise, then zero pages
    read_fd, write_fd = os.pipe()
    saver = snapstate.Saver(read_fd, tmp_path / "state.zst")
    saver.start()
    with os.fdopen(write_fd, "wb") as pipe:
        pipe.write(data)
    saver.join(10)
    saved = saver.result
    assert saver.error is None and saved.raw_size == len(data) and saved.size < len(data) // 10
    assert (tmp_path / "state.zst").stat().st_mode & 0o777 == 0o600

    def feed(path: Path, digest: str):
        r, w = os.pipe()
        feeder = snapstate.Feeder(path, w, digest)
        feeder.start()
        with os.fdopen(r, "rb") as pipe:
            got = pipe.read()
        feeder.join(10)
        return feeder, got

    feeder, got = feed(tmp_path / "state.zst", saved.sha256)
    assert feeder.ok and got == data
    damaged = tmp_path / "damaged.zst"
    raw = bytearray((tmp_path / "state.zst").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    damaged.write_bytes(bytes(raw))
    feeder, _ = feed(damaged, saved.sha256)
    assert not feeder.ok and ("SHA-256" in feeder.error or "decompress" in feeder.error)
    feeder, _ = feed(tmp_path / "state.zst", "0" * 64)
    assert not feeder.ok and "SHA-256" in feeder.error


# ---- the manifest section and the bundle -----------------------------------------------------------

@pytest.fixture(scope="module")
def hello_image(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("snap") / "hello.jvmkit"
    proc = cli("pack", samples["hello"], "--target", "linux", "-o", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def fake_snapshot(image: Path) -> SnapshotInfo:
    """A snapshot section and files written by snaptake's publishing step, with a made-up state."""
    b = bundles.load(image)
    state_dir = image / snapshot.SNAPSHOT_DIR
    state_dir.mkdir(mode=0o700, exist_ok=True)
    tmp = state_dir / ".state-test.tmp"
    tmp.write_bytes(zstandard.ZstdCompressor().compress(b"not a VM"))
    saved = snapstate.Saved(snapshot.fileio.sha256_file(tmp), tmp.stat().st_size, 8)
    identity = snapshot.VmIdentity("7.2.22", "tcg", "max", "q35", 512, 1, ("-m 512M",), (), snapshot.boot_files(b.manifest))
    from jvmkit.packager.targets.base import RestoreTraits

    return snaptake._publish(b, tmp, saved, b"hello\n", "t" * 32, identity, snapshot.readiness(None, None, None),
                             RestoreTraits(clock="busybox-date"), snapctl.Prepared(100 << 20, 8 << 20, 4 << 20))


def test_a_snapshot_is_recorded_beside_the_files_and_removed_again(hello_image):
    before = json.loads((hello_image / bundles.MANIFEST).read_text())
    info = fake_snapshot(hello_image)
    after = json.loads((hello_image / bundles.MANIFEST).read_text())
    assert after["files"] == before["files"] and "snapshot" not in before
    assert after["snapshot"]["state"]["path"] == info.state.path and after["snapshot"]["guest_used_mib"] == 100
    for record_ in (info.state, info.output):
        assert (hello_image / record_.path).stat().st_mode & 0o777 == 0o600
    assert (hello_image / info.token).stat().st_mode & 0o777 == 0o600
    assert (hello_image / snapshot.SNAPSHOT_DIR).stat().st_mode & 0o777 == 0o700
    loaded = bundles.load(hello_image)  # the snapshot's files are not the bundle's: verification passes
    assert loaded.manifest.snapshot == info and Manifest.from_json(loaded.manifest.to_json()) == loaded.manifest
    shown = cli("inspect", hello_image)
    assert shown.returncode == 0 and "snapshot   present:" in shown.stdout and "0600" in shown.stdout
    assert snapshot.snapshot_problem(loaded, info) is None
    (hello_image / info.output.path).write_bytes(b"hellO\n")
    assert "output file" in snapshot.snapshot_problem(loaded, info)
    removed = cli("snapshot", "--remove", hello_image)
    assert removed.returncode == 0 and "removed" in removed.stdout, removed.stderr
    assert json.loads((hello_image / bundles.MANIFEST).read_text()) == before
    assert not (hello_image / snapshot.SNAPSHOT_DIR).exists()
    again = cli("snapshot", "--remove", hello_image)
    assert again.returncode == 0 and "has no snapshot" in again.stdout


def test_a_wrong_snapshot_section_is_one_line(hello_image, tmp_path):
    data = json.loads((hello_image / bundles.MANIFEST).read_text())
    data["snapshot"] = {"memory_mib": "lots"}
    with pytest.raises(ManifestError, match="manifest.snapshot"):
        Manifest.from_json(data)


def test_snapshot_and_pack_refuse_two_readiness_conditions(hello_image, samples, tmp_path):
    proc = cli("snapshot", hello_image, "--ready-port", "8080", "--ready-after", "3")
    assert proc.returncode == 2 and "--ready-port and --ready-after" in one_error(proc)
    proc = cli("snapshot", hello_image, "--ready-url", "ftp://127.0.0.1/")
    assert proc.returncode == 2 and "--ready-url" in one_error(proc)
    out = tmp_path / "never.jvmkit"
    proc = cli("pack", samples["hello"], "--target", "linux", "-o", out, "--snapshot", "--ready-line", "a",
               "--ready-port", "1")
    assert proc.returncode == 2 and "--ready-port and --ready-line" in one_error(proc)
    assert not out.exists()  # refused before packing


def test_snapshot_settings_come_from_the_table_and_jvmkit_toml(tmp_path):
    from jvmkit import config, settings

    fields = {f.name for f in dataclasses.fields(settings.SnapshotOptions)}
    assert {"memory_mib", "cpus", "accel", "ready_port", "ready_url", "ready_line", "ready_after",
            "ready_timeout"} <= fields
    assert "cold" in {f.name for f in dataclasses.fields(settings.RunOptions)}
    assert "snapshot" in {f.name for f in dataclasses.fields(settings.PackRequest)}
    toml = tmp_path / "jvmkit.toml"
    toml.write_text('[run]\nmemory = "1G"\n[snapshot]\nready_port = 8080\npack = true\n')
    options = settings.SnapshotOptions(**config.merge("snapshot", {}, toml))
    assert options.memory_mib == 1024 and options.ready_port == 8080 and options.ready_timeout == 300.0
    assert config.pack_request({"jar": tmp_path / "x.jar"}, toml).snapshot is True
    toml.write_text("[snapshot]\nready_prot = 8080\n")
    with pytest.raises(Exception, match="ready_port"):
        config.load_config(toml)
    help_text = cli("snapshot", "--help").stdout
    for flag in ("--ready-port", "--ready-url", "--ready-line", "--ready-after", "--memory", "--remove"):
        assert flag in help_text


# ---- the guest agent's snapshot control, in a real JVM --------------------------------------------

READY_APP = r"""
import io.jvmkit.Ready;

public class ReadyApp {
    public static void main(String[] args) throws Exception {
        Ready.register(new Ready.Resource() {
            public void beforeSnapshot() { System.out.println("before snapshot"); }
            public void afterRestore() {
                System.out.println("after restore restored=" + Ready.isRestored() + " lag=" + Ready.clockLagMillis());
            }
        });
        Ready.register(new Ready.Resource() {
            public void afterRestore() throws Exception { throw new IllegalStateException("hook fails"); }
        });
        Thread.sleep(300);
        System.out.println("signalling");
        Ready.signal();
        Thread.sleep(120_000);
    }
}
"""


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    if not (JDK17 / "bin" / "javac").exists():
        pytest.skip(f"no JDK at {JDK17}")
    from jvmkit.balloon.agent_build import build_agent

    cache = tmp_path_factory.mktemp("agent-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JVMKIT_CACHE", str(cache))
        jars = build_agent(JDK17 / "bin" / "javac", 17)
    src, out = tmp_path_factory.mktemp("ready-src"), tmp_path_factory.mktemp("ready-classes")
    (src / "ReadyApp.java").write_text(READY_APP)
    subprocess.run([str(JDK17 / "bin" / "javac"), "--release", "17", "-cp", str(jars.api_jar), "-d", str(out),
                    str(src / "ReadyApp.java")], check=True, capture_output=True, text=True)
    return jars, out


def test_the_agent_signals_prepares_and_restores_with_new_credentials(agent, tmp_path):
    from jvmkit.balloon.jmx import JmxClient
    from jvmkit.errors import JvmkitError

    jars, classes = agent
    port, token = free_port(), "k" * 32
    seed = tmp_path / "seed"
    seed.write_bytes(snapshot.snapshot_seed(token, port))
    app = subprocess.Popen([str(JDK17 / "bin" / "java"), f"-javaagent:{jars.agent_jar}", f"-Djvmkit.seed={seed}",
                            "-cp", f"{classes}:{jars.agent_jar}", "ReadyApp"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    alive = lambda: app.poll() is None  # noqa: E731
    try:
        answer = None
        with pytest.raises(snapctl.ControlError, match="wrong token"):
            snapctl.open_session("127.0.0.1", port, snapctl.snapshot_request("x" * 32), deadline=time.monotonic() + 30,
                                 alive=alive)
        client, answer = snapctl.open_session("127.0.0.1", port, snapctl.snapshot_request(token),
                                              deadline=time.monotonic() + 30, alive=alive)
        assert answer == "ok"
        client.send(b"wait signal\n")
        assert client.wait_line(time.monotonic() + 30, alive, "the signal") == "ready"
        client.send(b"prepare clock=none\n")
        prepared = snapctl.parse_prepared(client.wait_line(time.monotonic() + 60, alive, "prepare"))
        assert prepared.guest_used > 0 and 0 < prepared.heap_live <= prepared.heap_committed
        assert client.line(timeout=10) is None  # the agent ends the snapshot session
        client.close()

        jmx_port = free_port()
        new_seed = f"jmx.port={jmx_port}\njmx.advertise=127.0.0.1:{jmx_port}\njmx.user=jvmkit\njmx.password=fresh-pw\n"
        request = (snapctl.restore_head(token, entropy=os.urandom(32), clock="none", seed=new_seed)
                   + snapctl.restore_tail(int(time.time() * 1000) + 5000))
        client, answer = snapctl.open_session("127.0.0.1", port, request, deadline=time.monotonic() + 30, alive=alive)
        client.close()
        restored = snapctl.parse_restored(answer)
        assert restored["clock"] == "unchanged" and 4000 <= int(restored["lag"]) <= 6000  # the host is 5 s ahead
        deadline = time.monotonic() + 30
        while True:  # the connector starts after the answer
            try:
                jmx = JmxClient.connect("127.0.0.1", jmx_port, "jvmkit", "fresh-pw", timeout=5)
                break
            except JvmkitError:
                assert time.monotonic() < deadline, "the JMX connector with the restore's credentials never came up"
                time.sleep(0.5)
        assert jmx.balloon_stats().heap_max > 0
        jmx.close()
        with pytest.raises(JvmkitError):
            JmxClient.connect("127.0.0.1", jmx_port, "jvmkit", token, timeout=5)  # the snapshot's secret is no password
        with pytest.raises(snapctl.ControlError):  # one restore per VM: the control is closed now
            snapctl.open_session("127.0.0.1", port, request, deadline=time.monotonic() + 2, alive=alive)
    finally:
        app.kill()
        output = app.communicate(timeout=10)[0]
    assert "before snapshot" in output and "after restore restored=true lag=" in output, output
    assert "afterRestore of ReadyApp$2 failed: java.lang.IllegalStateException: hook fails" in output, output
    assert output.index("signalling") < output.index("before snapshot") < output.index("after restore")
