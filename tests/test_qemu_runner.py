"""The QEMU argv, port publishing, exit-status parsing and accelerator choice (no VM needed)."""

from pathlib import Path

import pytest

from jvmkit.vm import kvm
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.vm.qemu import PortForward, VmConfig, host_key, q35_low_memory_mib, qemu_argv
from jvmkit.vm.runner import choose_accel, diagnose, parse_exit, parse_publish


def config(**kw):
    base = dict(name="hello-1", kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd"), append="console=ttyS0",
                memory_mib=512, cpus=1, accel="tcg", qmp_socket=Path("/run/q.sock"), console_log=Path("/run/c.log"))
    base.update(kw)
    return VmConfig(**base)


def test_argv_tcg_linux():
    argv = qemu_argv(config(ports=(PortForward("127.0.0.1", 8080, 80),), fw_cfg=(("opt/io.jvmkit/seed", Path("/r/seed")),)))
    joined = " ".join(argv)
    assert argv[argv.index("-accel") + 1].startswith("tcg,thread=single")
    assert "-kernel /k/vmlinux" in joined and "-initrd /k/initrd" in joined
    assert "hostfwd=tcp:127.0.0.1:8080-:80" in joined
    assert "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on" in joined
    assert "name=opt/io.jvmkit/seed,file=/r/seed" in joined
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert argv[argv.index("-m") + 1] == "512M"


def test_argv_kvm_multi_cpu_and_osv_disk():
    argv = qemu_argv(config(accel="kvm", cpus=2, initrd=None, disk=Path("/d/rofs.img")))
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"
    assert "-initrd" not in argv
    assert any("file=/d/rofs.img" in a and "readonly=on" in a for a in argv)
    assert "virtio-blk-pci,drive=rootfs" in argv  # KVM keeps the ioeventfd
    assert any(a.endswith("cache=unsafe,aio=threads") for a in argv)
    tcg2 = qemu_argv(config(cpus=2))
    assert tcg2[tcg2.index("-accel") + 1].startswith("tcg,thread=multi")


def test_osv_disk_under_tcg_is_kicked_in_the_vcpu_thread_with_the_probed_aio():
    argv = qemu_argv(config(initrd=None, disk=Path("/d/rofs.img"), disk_aio="io_uring"))
    assert "virtio-blk-pci,drive=rootfs,ioeventfd=off" in argv
    assert "file=/d/rofs.img,if=none,id=rootfs,format=raw,readonly=on,cache=unsafe,aio=io_uring" in argv
    assert not any("ioeventfd" in a for a in qemu_argv(config()))  # no disk, nothing to kick


def test_io_uring_probe_verdicts():
    """interpret() is pure; the real probe runs this machine's QEMU (no guest, -machine none)."""
    from jvmkit.vm import iouring

    assert iouring.interpret(0, "")[0] is True
    usable, reason = iouring.interpret(1, "qemu-system-x86_64: -drive file=x,aio=io_uring: failed to init "
                                          "linux io_uring ring\n")
    assert not usable and reason.endswith("(failed to init linux io_uring ring)")
    assert iouring.interpret(None, "") == (False, "QEMU cannot use aio=io_uring here (timed out)")
    argv = iouring.probe_argv("qemu-system-x86_64", Path("/t/p.img"))
    assert argv[argv.index("-machine") + 1] == "none" and "aio=io_uring" in argv[argv.index("-drive") + 1]
    qemu = __import__("shutil").which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    verdict = iouring.run_probe(qemu)
    assert isinstance(verdict["usable"], bool) and verdict["reason"] and verdict["host"] == host_key(qemu)
    broken = iouring.run_probe("/nonexistent/qemu")
    assert broken["usable"] is False and "cannot run" in broken["reason"]


def test_io_uring_verdict_is_cached_per_host(tmp_path, monkeypatch):
    from jvmkit.vm import iouring

    monkeypatch.setenv("JVMKIT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(iouring, "run_probe", lambda qemu: calls.append(qemu) or
                        {"usable": False, "reason": "no", "host": host_key(qemu)})
    assert iouring.disk_aio("q") == "threads" and iouring.disk_aio("q") == "threads"
    assert calls == ["q"]  # probed once, then read from aio-probe.json
    (tmp_path / "aio-probe.json").write_text('{"usable": true, "reason": "ok", "host": "another kernel"}')
    assert iouring.disk_aio("q") == "threads" and calls == ["q", "q"]  # another host's verdict is not used


def test_machine_type_comes_from_the_image_and_is_checked():
    assert qemu_argv(config())[qemu_argv(config()).index("-machine") + 1] == "pc"
    q35 = qemu_argv(config(machine="q35"))
    assert q35[q35.index("-machine") + 1] == "q35,max-ram-below-4g=1024M"
    small = qemu_argv(config(machine="q35", low_memory_mib=256))
    assert small[small.index("-machine") + 1] == "q35,max-ram-below-4g=256M"
    with pytest.raises(ValueError):
        qemu_argv(config(machine="pc,accel=kvm"))


def test_q35_low_memory_holds_the_initramfs_and_the_bounce_buffer():
    mib = 1 << 20
    assert q35_low_memory_mib(0) == 256
    assert q35_low_memory_mib(56 * mib) == 256           # hello: 56 MiB
    assert q35_low_memory_mib(96 * mib) == 256
    assert q35_low_memory_mib(96 * mib + 1) == 512
    assert q35_low_memory_mib(276 * mib) == 512          # the full JDK copied: 276 MiB
    for size in (1, 100 * mib, 700 * mib, 1800 * mib):
        low = q35_low_memory_mib(size)
        assert low % 256 == 0 and low * mib >= size + 160 * mib
    assert q35_low_memory_mib(3000 * mib) == 2048       # never more than q35's own split
    assert q35_low_memory_mib(56 * mib, bounce_buffer=True) == 1024   # a kernel that keeps its 64 MiB buffer


def test_secrets_never_on_argv(tmp_path):
    seed = tmp_path / "seed"
    seed.write_text("jmx.password=s3cret\n")
    argv = qemu_argv(config(fw_cfg=(("opt/io.jvmkit/seed", seed),)))
    assert not any("s3cret" in a for a in argv)


@pytest.mark.parametrize("spec,expected", [
    ("8080", PortForward("127.0.0.1", 8080, 8080)),
    ("9000:80", PortForward("127.0.0.1", 9000, 80)),
    ("0.0.0.0:9000:80", PortForward("0.0.0.0", 9000, 80)),
])
def test_parse_publish(spec, expected):
    assert parse_publish(spec) == expected


@pytest.mark.parametrize("spec", ["x", "1:2:3:4", "70000:80", "80:0", ""])
def test_parse_publish_rejects(spec):
    with pytest.raises(UsageError):
        parse_publish(spec)


def test_parse_exit_takes_last_marker():
    text = "boot\r\njvmkit-exit=3\r\nmore\njvmkit-exit=7\n"
    assert parse_exit(text, "jvmkit-exit=") == 7
    assert parse_exit("no marker here", "jvmkit-exit=") is None
    assert parse_exit("jvmkit-exit=256", "jvmkit-exit=") == 0


def test_diagnose():
    assert "panicked" in diagnose("[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs", "", 0)
    failed = diagnose("", "qemu-system-x86_64: warning: x\nqemu-system-x86_64: -netdev user: Could not set up host forwarding rule", 1)
    assert failed.startswith("QEMU failed:") and "Could not set up host forwarding rule" in failed and "warning" not in failed
    assert "without reporting" in diagnose("", "", 0)


def test_diagnose_names_what_crashed():
    jvm = "#\n# A fatal error has been detected by the Java Runtime Environment:\n#\n#  SIGSEGV (0xb) at pc=0x1, pid=1, tid=3\n#\n"
    assert diagnose("booting\n" + jvm + "Aborted\n", "", 0) == "the JVM crashed: SIGSEGV (0xb) at pc=0x1, pid=1, tid=3"
    oom = "# There is insufficient memory for the Java Runtime Environment to continue.\n# Native memory allocation (mmap) failed to map 8 bytes\n"
    assert diagnose(oom, "", 0) == "the JVM crashed: Native memory allocation (mmap) failed to map 8 bytes"
    osv = "Assertion failed: x (core/mmu.cc: f: 12)\n\n[backtrace]\n0x0000000040221a3c <abort+0x1>\nAborted\n"
    assert diagnose(osv, "", 0) == "the guest crashed: Aborted (after: Assertion failed: x (core/mmu.cc: f: 12))"
    assert diagnose("Aborted\n", "", 0) == "the guest crashed: Aborted"
    # An OSv guest too small for its JVM (seen at --memory 64M with the httpd sample).
    oom = "libjava.so: ignoring missing symbol waitid\nOut of memory: could not reclaim any further. Current memory: 16 Kb\n[backtrace]\n"
    assert "OSv ran out of memory" in diagnose(oom, "", 0) and "--memory" in diagnose(oom, "", 0)


def verdict(usable):
    return lambda: kvm.KvmVerdict(usable, "ok" if usable else "emulation failure", "h", 0.0)


def test_choose_accel():
    assert choose_accel("auto", verdict(True))[0] == "kvm"
    accel, note = choose_accel("auto", verdict(False))
    assert accel == "tcg" and "KVM is not usable" in note and "TCG" in note
    assert choose_accel("tcg", verdict(True))[0] == "tcg"
    with pytest.raises(JvmkitError):
        choose_accel("kvm", verdict(False))
    with pytest.raises(UsageError):
        choose_accel("hvf", verdict(True))


def test_kvm_probe_interpretation():
    assert kvm.interpret(kvm.EXPECTED_STATUS, "")[0]
    usable, reason = kvm.interpret(1, "KVM internal error. Suberror: 1\nemulation failure")
    assert not usable and "cannot run guests" in reason
    assert not kvm.interpret(None, "")[0]
    assert len(kvm.BOOT_SECTOR) == 512 and kvm.BOOT_SECTOR.endswith(b"\x55\xaa")


def test_kvm_kernel_probe_interpretation():
    ok, _ = kvm.interpret_kernel("[0.5] Kernel panic - not syncing: VFS: Unable to mount root fs", "", True)
    assert ok
    ok, reason = kvm.interpret_kernel("", "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n", True)
    assert not ok and "failed to set MSR" in reason
    ok, reason = kvm.interpret_kernel("", "qemu-system-x86_64: warning: host doesn't support pni\n", False)
    assert not ok and "printed nothing" in reason
    assert not kvm.interpret_kernel("Linux version 6.1", "", False)[0]
    assert not kvm.interpret_kernel("", "KVM internal error. Suberror: 1\nemulation failure", True)[0]


def test_a_vm_that_ended_while_restoring_with_the_apps_status_ran_to_its_end(tmp_path):
    """runner._exited_while_restoring: the console of a restored VM that stopped before its restore
    session was answered decides between "the app exited" (its status is the run's: booting cold
    would run it twice) and "the restore failed" (boot cold). Fakes stand in for the launched QEMU:
    tests/test_snapshot_vm.py restores real guests, where the race needs a loaded host."""
    import threading
    import types

    from jvmkit.packager import targets
    from jvmkit.packager.targets.linux.initramfs import EXIT_MARKER
    from jvmkit.vm import runner

    linux = targets.get("linux", "target")
    manifest = types.SimpleNamespace(boot=types.SimpleNamespace(exit_marker=EXIT_MARKER))
    drained = threading.Thread(target=lambda: None)
    drained.start()

    def launched(text):
        return types.SimpleNamespace(threads=[drained], log=types.SimpleNamespace(text=lambda: text))

    assert runner._exited_while_restoring(linux, manifest, launched(f"httpd listening\n{EXIT_MARKER}6\n"))
    assert not runner._exited_while_restoring(linux, manifest, launched("load of migration failed\n"))
