"""The linux guest's /init on a network that is not QEMU user networking's fixed one (issue 18).

`jvmkit export --format kubevirt` boots a linux image with the runner's kernel command line plus
`jvmkit.net=dhcp` (`LinuxTarget.cluster_boot`): KubeVirt's masquerade pod network hands the guest
10.0.2.2 via 10.0.2.1 by DHCP, not the 10.0.2.15 via 10.0.2.2 that /init sets by default. No
cluster runs here, so a slirp network on another subnet stands in for it: 10.0.3.0/24 with its
DHCP pool starting at 10.0.3.20, where slirp's hostfwd (no guest address given) forwards to that
first DHCP address. The httpd sample answering through the forward proves the guest took its
address from DHCP; the same boot without the flag (the fixed 10.0.2.15) does not answer although
the app is up; with no DHCP server at all /init says so in one line and starts the app. Real
pack, real kernel and busybox udhcpc, QEMU under TCG; marked `vm`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from support.images import pack_image
from support.servers import free_port, http_body_when_up

pytestmark = pytest.mark.vm

BOOT_S = 180          # a TCG boot of the httpd image until it listens (about 40 s on an idle machine)
DEAF_S = 20           # the negative control: how long the listening app must stay unreachable
NET = "net=10.0.3.0/24,dhcpstart=10.0.3.20"
LEASED = "10.0.3.20"
LISTENING = "httpd listening on port 8080"


@pytest.fixture(scope="module")
def httpd(samples, tmp_path_factory):
    """(the runner's boot plan, the cluster's kernel command line) of the httpd sample packed for
    linux, its kernel and initramfs unpacked the way the KubeVirt export unpacks them."""
    from jvmkit.engines.export import _no_secrets, raw_name, unpack_file
    from jvmkit.packager import bundle, targets
    from jvmkit.packager.targets.base import BootRequest

    out = tmp_path_factory.mktemp("dhcp")
    image = bundle.load(pack_image(samples["httpd"], out / "httpd.jvmkit", "linux", "--memory", "384M"))
    manifest = image.manifest
    files = {role: unpack_file(image, role, out / raw_name(record.path)) for role, record in manifest.files.items()}
    target = targets.get("linux")
    plan = target.boot_plan(manifest, files, BootRequest(), _no_secrets)
    return plan, target.cluster_boot(manifest).cmdline


class Guest:
    """One QEMU guest booted from the plan's kernel and initrd with `append`, on NET, port 8080
    forwarded from 127.0.0.1:`port`; the console (ttyS0) and the app's output (ttyS1) in files."""

    def __init__(self, plan, append: str, work: Path, netdev: str | None = None):
        from jvmkit.vm.qemu import find_qemu

        work.mkdir(parents=True, exist_ok=True)
        self.console, self.app, self.port = work / "console.log", work / "app.log", free_port()
        netdev = netdev or f"user,id=n0,{NET},hostfwd=tcp:127.0.0.1:{self.port}-:8080"
        self.proc = subprocess.Popen(
            [find_qemu(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
             "-machine", plan.machine, "-accel", "tcg", "-cpu", "max", "-m", "384M",
             "-serial", f"file:{self.console}", "-serial", f"file:{self.app}",
             "-netdev", netdev,
             "-device", "virtio-net-pci,netdev=n0,romfile=",
             "-kernel", str(plan.kernel), "-initrd", str(plan.initrd), "-append", append],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def text(self, path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    def story(self) -> str:
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
        return (f"qemu: {'running' if self.proc.poll() is None else f'exited {self.proc.returncode}: {err[-500:]}'}\n"
                f"console:\n{self.text(self.console)[-2500:]}\napp:\n{self.text(self.app)[-500:]}")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def guests():
    started = []
    yield started
    for guest in started:
        guest.stop()


def test_the_cluster_line_is_the_runners_plus_dhcp(httpd):
    plan, cmdline = httpd
    assert cmdline == plan.append + " jvmkit.net=dhcp" and "jvmkit.net" not in plan.append


def test_dhcp_gives_the_guest_its_address_on_another_subnet(httpd, guests, tmp_path):
    plan, cmdline = httpd
    guest = Guest(plan, cmdline, tmp_path / "dhcp")
    guests.append(guest)
    body = http_body_when_up(f"http://127.0.0.1:{guest.port}/", BOOT_S)
    assert body is not None and body.startswith("hello from jvmkit httpd"), guest.story()
    console = guest.text(guest.console)
    assert f"jvmkit-init: eth0: {LEASED}/24 via 10.0.3.2 (DHCP bound)" in console, guest.story()
    assert "no DHCP lease" not in console and "no lease" not in console, guest.story()


def wait_listening(guest: Guest) -> None:
    deadline = time.monotonic() + BOOT_S
    while LISTENING not in guest.text(guest.app) and time.monotonic() < deadline and guest.proc.poll() is None:
        time.sleep(0.5)
    assert LISTENING in guest.text(guest.app), guest.story()


def test_no_dhcp_server_one_line_and_the_app_still_starts(httpd, guests, tmp_path):
    """Nothing answers DHCP (a hub with no other port drops every frame): udhcpc gives up after its
    few tries, /init says so in one line on the console and starts the app anyway."""
    plan, cmdline = httpd
    guest = Guest(plan, cmdline, tmp_path / "silent", netdev="hubport,id=n0,hubid=0")
    guests.append(guest)
    wait_listening(guest)
    console = guest.text(guest.console)
    assert "jvmkit-init: eth0: no DHCP lease after 5 tries (jvmkit.net=dhcp)" in console, guest.story()
    assert "(DHCP bound)" not in console, guest.story()


def test_without_the_flag_the_fixed_address_is_unreachable_there(httpd, guests, tmp_path):
    """The negative control: the same image and network, the runner's own line (10.0.2.15 fixed).
    The app comes up (its line on ttyS1) and still nothing answers through the forward."""
    plan, _ = httpd
    guest = Guest(plan, plan.append, tmp_path / "fixed")
    guests.append(guest)
    wait_listening(guest)
    assert http_body_when_up(f"http://127.0.0.1:{guest.port}/", DEAF_S) is None, guest.story()
    assert "DHCP" not in guest.text(guest.console) and guest.proc.poll() is None, guest.story()
