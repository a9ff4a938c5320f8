"""The linux target's initramfs and its `/init`: everything the guest runs, in one cpio archive.

The initramfs (cpio newc, zstd) holds a static busybox, the decompressed virtio modules, the trimmed
runtime at /jvm, the app under /app, the guest agent under /jvmkit, /dev/console, and `/init`.
`/init` mounts proc/sys/dev, loads the modules, sets a host name and brings up `lo` and the network
(QEMU user networking's fixed addresses, or DHCP with `jvmkit.net=dhcp` on the kernel command
line), copies the per-run seed from fw_cfg, runs java with its output on the second serial port
(ttyS1, the runner's stdout), reports java's exit status on the console (ttyS0) as `jvmkit-exit=N`,
and powers off.

The bundle stores it zstd-compressed (see target.py for the rest of the bundle).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from jvmkit.guest import GUEST_AGENT, GUEST_SEED
from jvmkit.packager.manifest import FileRecord
from jvmkit.packager.targets.linux.cpio import CpioWriter
from jvmkit.packager.zstd import compressed_writer, record

EXIT_MARKER = "jvmkit-exit="
ARGS_FW_CFG = "opt/io.jvmkit/args"
SEED_FW_CFG = "opt/io.jvmkit/seed"
# Boot-time choices, each measured under TCG (the guest runs one application):
# - init_on_alloc=0: the Debian kernel zeroes every kernel allocation by default (~0.5 s); user
#   pages are still zeroed by the kernel as always.
# - cryptomgr.notests: skip the kernel crypto self-tests at boot (~0.3 s); ignored when fips=1.
# - swiotlb=noforce: no 64 MiB DMA bounce buffer below 4 GiB. A guest with RAM above 4 GiB sets one
#   up by default (~0.2 s at 1G, ~0.5 s at 8G with 256M below 4 GiB), for devices that cannot reach
#   high memory; jvmkit's guests have only virtio-pci devices (64-bit DMA) and serial ports.
NO_BOUNCE_BUFFER = "swiotlb=noforce"
# - transparent_hugepage=never: the guest uses ~75-110 MiB less besides the heap, and every balloon
#   floor is that much lower. Debian's kernel defaults to THP "always": khugepaged then raises
#   min_free_kbytes to keep 2 MiB blocks free (measured 45 MiB against 3.8 MiB: the zones' high
#   watermarks, ~68 MiB, are free memory MemAvailable leaves out), and a heap region touched in part
#   is faulted in whole. Measured with samples/cache-service in a 1G guest (-Xmx320m, 118 MiB live,
#   TCG): MemTotal - MemAvailable 435 -> 303 MiB, heap RSS 233 -> 173 MiB; under --balloon its
#   floor 439 -> 327 MiB (guest non-heap 213 -> 101 MiB). "madvise" would still start khugepaged; the JVM asks for huge pages
#   only with -XX:+UseTransparentHugePages, which then gets none.
NO_THP = "transparent_hugepage=never"
KERNEL_CMDLINE = ("console=ttyS0 panic=-1 rdinit=/init tsc=reliable no_timer_check init_on_alloc=0 "
                  f"cryptomgr.notests {NO_BOUNCE_BUFFER} {NO_THP} i8042.noaux i8042.nomux i8042.nopnp")
# q35, not pc: with i440FX the kernel evaluates ACPI interrupt links (LNKx) for each virtio-pci
# device, ~0.15 s apiece under TCG (0.6 s for three); q35's GSI links take a few ms. (pci=noacpi or
# acpi=noirq avoid the links on pc too, but lose MSI-X and trip kernel warnings.)
MACHINE = "q35"
# The network /init sets up: by default QEMU user networking's fixed addresses (guest 10.0.2.15/24,
# gateway 10.0.2.2, DNS 10.0.2.3: what slirp and passt serve to jvmkit's own runs); with NET_DHCP on
# the kernel command line, whatever DHCP hands out (KubeVirt's masquerade pod network: 10.0.2.2 via
# 10.0.2.1), through busybox's udhcpc and DHCP_SCRIPT. udhcpc sends DHCP_TRIES discovers
# DHCP_PAUSE_S apart, then gives up (-n) and /init logs DHCP_FAILED and starts the app regardless;
# with a lease it stays in the background and renews it.
NET_DHCP = "jvmkit.net=dhcp"
DHCP_SCRIPT = "/run/jvmkit/udhcpc.sh"
DHCP_TRIES, DHCP_PAUSE_S = 5, 2
DHCP_FAILED = "eth0: no DHCP lease"
# udhcpc runs it with the event as $1 and the lease in the environment: ip, subnet (dotted), router
# and dns (lists), interface. Only bound/renew change anything; a lost lease keeps the address.
DHCP_LEASE_SCRIPT = r"""#!/bin/busybox sh
case "$1" in
bound|renew)
  prefix=0
  for octet in $(echo "${subnet:-255.255.255.255}" | tr . ' '); do
    case $octet in
    255) prefix=$((prefix + 8)) ;; 254) prefix=$((prefix + 7)) ;; 252) prefix=$((prefix + 6)) ;;
    248) prefix=$((prefix + 5)) ;; 240) prefix=$((prefix + 4)) ;; 224) prefix=$((prefix + 3)) ;;
    192) prefix=$((prefix + 2)) ;; 128) prefix=$((prefix + 1)) ;;
    esac
  done
  [ "$1" = bound ] && ip addr flush dev "$interface"
  ip addr replace "$ip/$prefix" dev "$interface"
  for gw in $router; do ip route replace default via "$gw" dev "$interface"; break; done
  if [ -n "$dns" ]; then
    for ns in $dns; do echo "nameserver $ns"; done > /etc/resolv.conf
  fi
  echo "jvmkit-init: $interface: $ip/$prefix via ${router%% *} (DHCP $1)" > /dev/console
  ;;
esac
"""


def min_memory_mib(initramfs_raw_size: int) -> int:
    """The smallest guest (MiB) that can boot an initramfs of this unpacked size (pure).

    The kernel unpacks the initramfs into a tmpfs that may use half of the memory left after the
    kernel (~48 MiB, plus 1.6% of the guest for page structures) and the archive itself, which it
    frees only afterwards; short of that, unpacking stops part-way and the guest fails later with
    missing files. Measured with a 276 MiB initramfs: 832M failed, 896M booted (this asks 960M);
    55 MiB boots at 256M. Rounded up to 64 MiB."""
    raw_mib = initramfs_raw_size / (1 << 20)
    need = (3 * raw_mib + 48 + 8) / 0.984
    return int(-(-need // 64) * 64)


def init_script(java_argv: list[str], app_args: list[str], modules: list[str], lib_dirs: list[str] = (),
                agent_flags: list[str] = ()) -> str:
    """The guest's /init (pure): a busybox sh script that runs `java_argv` and reports its status.

    `app_args` are the default arguments; `jvmkit run IMAGE -- ARGS` replaces them through fw_cfg
    (shell-quoted by the runner, like a container's CMD)."""
    words = []
    for arg in java_argv:  # the guest agent's flags become $agent, set only when a seed arrived
        if arg in agent_flags:
            if "$agent" not in words:
                words.append("$agent")
        else:
            words.append(shlex.quote(arg))
    argv = " ".join(words)
    agent = shlex.quote(" ".join(agent_flags))
    default_args = shlex.join(app_args)
    ld_path = f" LD_LIBRARY_PATH={':'.join(lib_dirs)}" if lib_dirs else ""
    insmods = "\n".join(f"insmod /lib/modules/{shlex.quote(m)} 2>/dev/null || log \"module {m} not loaded\""
                        for m in modules)
    return f"""#!/bin/busybox sh
# jvmkit guest init: run one Java application, report its exit status, power off.
/bin/busybox --install -s /bin
export PATH=/jvm/bin:/bin HOME=/root JAVA_HOME=/jvm LANG=C.UTF-8{ld_path}
log() {{ echo "jvmkit-init: $*" > /dev/console; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /run/jvmkit /tmp /root && chmod 700 /run/jvmkit && chmod 1777 /tmp
{insmods}
hostname jvmkit
printf '127.0.0.1 localhost jvmkit\\n::1 localhost\\n' > /etc/hosts
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  case " $(cat /proc/cmdline) " in
  *" {NET_DHCP} "*)
    (umask 077; cat > {DHCP_SCRIPT}) <<'EOF'
{DHCP_LEASE_SCRIPT}EOF
    chmod 700 {DHCP_SCRIPT}
    ip link set eth0 up
    if ! udhcpc -i eth0 -s {DHCP_SCRIPT} -t {DHCP_TRIES} -T {DHCP_PAUSE_S} -n; then
      log "{DHCP_FAILED} after {DHCP_TRIES} tries ({NET_DHCP}); carrying on without a network address"
    fi
    ;;
  *)
    ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2
    echo 'nameserver 10.0.2.3' > /etc/resolv.conf
    ;;
  esac
fi
fwcfg=/sys/firmware/qemu_fw_cfg/by_name
agent=
if [ -r $fwcfg/{SEED_FW_CFG}/raw ]; then
  (umask 077; cat $fwcfg/{SEED_FW_CFG}/raw > {GUEST_SEED})
  agent={agent}
fi
set -- {argv}
if [ -r $fwcfg/{ARGS_FW_CFG}/raw ]; then
  eval "set -- \\"\\$@\\" $(cat $fwcfg/{ARGS_FW_CFG}/raw)"
else
  set -- "$@" {default_args}
fi
out=/dev/ttyS1
[ -c $out ] || out=/dev/console
stty -F $out raw -echo 2>/dev/null
log "starting java"
cd /
"$@" < $out > $out 2>&1
rc=$?
echo "{EXIT_MARKER}$rc" > /dev/console
sync
reboot -f  # QEMU runs with -no-reboot: a reboot ends the VM, with or without ACPI
"""


def write_initramfs(staging: Path, name: str, *, init: str, busybox: Path, modules: list[Path], runtime: Path,
                    app_files: list[tuple[str, Path]], agent_jar: Path, mtime: int,
                    libs: list[tuple[str, Path]] = ()) -> FileRecord:
    """Write the zstd-compressed initramfs `staging/name`; returns its record (digests of both forms)."""
    with compressed_writer(staging / name) as sink:
        cpio = CpioWriter(sink, mtime=mtime)
        for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "root", "run", "sys", "tmp"):
            cpio.add_dir(d)
        cpio.add_char_device("dev/console", 5, 1)
        cpio.add_char_device("dev/null", 1, 3, mode=0o666)
        cpio.add_file("bin/busybox", busybox, mode=0o755)
        for module in modules:
            cpio.add_file(f"lib/modules/{module.name}", module, mode=0o644)
        cpio.add_bytes("init", init.encode(), mode=0o755)
        made = {"app", "lib", "bin", "dev", "etc", "lib/modules", "proc", "root", "run", "sys", "tmp"}
        cpio.add_dir("app")
        for guest, host, mode in [*((g, h, 0o755) for g, h in libs), *((g, h, 0o644) for g, h in app_files)]:
            parts = guest.strip("/").split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent not in made:
                    cpio.add_dir(parent)
                    made.add(parent)
            cpio.add_file(guest, host, mode=mode)
        cpio.add_tree(runtime, "jvm")
        cpio.add_dir("jvmkit")
        cpio.add_file(GUEST_AGENT.lstrip("/"), agent_jar, mode=0o644)
        cpio.close()
    return record(staging, name, sink)
