"""The fleet file of `jvmkit up`: parsing, expansion of replicas and ports, and its one-line errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jvmkit.errors import UsageError
from jvmkit.fleet.file import expand_publish, load, parse
from jvmkit.settings import Invalid

EXAMPLE = """\
host_memory = "6G"            # what all VMs together may use
[[vm]]
name = "cache"
image = "cache-service.jvmkit"
replicas = 4                  # cache-1 .. cache-4
memory = "1G"                 # ceiling per VM
min_memory = "256M"           # floor per VM
weight = 2                    # share under contention
publish = ["18080+:8080"]     # one host port per replica, counting up
args = ["--port", "8080"]
restart = "on-failure"

[[vm]]
name = "front"
image = "front.jvmkit"
publish = ["8000:80"]
"""


@pytest.fixture
def images(tmp_path):
    for name in ("cache-service", "front"):
        (tmp_path / f"{name}.jvmkit").mkdir()
        (tmp_path / f"{name}.jvmkit" / "manifest.json").write_text("{}")
    return tmp_path


def write(tmp_path, text, name="shop.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_issue_example_expands_to_one_vm_per_replica(images):
    fleet = load(write(images, EXAMPLE))
    assert fleet.name == "shop" and fleet.host_memory_mib == 6144
    assert [v.name for v in fleet.vms] == ["cache-1", "cache-2", "cache-3", "cache-4", "front"]
    c3 = fleet.get("cache-3")
    assert c3.publish == ("127.0.0.1:18082:8080",) and c3.weight == 2 and c3.restart == "on-failure"
    assert (c3.memory_mib, c3.min_memory_mib, c3.args) == (1024, 256, ("--port", "8080"))
    assert c3.image == images / "cache-service.jvmkit" and c3.line == 2
    front = fleet.get("front")
    assert front.publish == ("127.0.0.1:8000:80",) and front.restart == "no" and front.balloon and front.line == 13
    argv = c3.run_args()
    assert argv[:3] == ["run", "--name", "cache-3"] and "--balloon" in argv and argv[-3:] == ["--", "--port", "8080"]
    assert argv[argv.index("--weight") + 1] == "2" and argv[argv.index("--min-memory") + 1] == "256M"
    assert argv[argv.index("--publish") + 1] == "127.0.0.1:18082:8080"


@pytest.mark.parametrize("spec,replicas,expected", [
    ("18080+:8080", 3, ["127.0.0.1:18080:8080", "127.0.0.1:18081:8080", "127.0.0.1:18082:8080"]),
    ("0.0.0.0:9000+:80", 2, ["0.0.0.0:9000:80", "0.0.0.0:9001:80"]),
    ("18080,18090:8080", 2, ["127.0.0.1:18080:8080", "127.0.0.1:18090:8080"]),
    ("8080:80", 1, ["127.0.0.1:8080:80"]),
    ("8080", 1, ["127.0.0.1:8080:8080"]),
])
def test_publish_expands(spec, replicas, expected):
    assert expand_publish(spec, replicas) == expected


@pytest.mark.parametrize("spec,replicas,message", [
    ("8080:80", 2, "write 8080+:80 to count up"),
    ("1,2,3:80", 2, "lists 3 host ports"),
    ("65535+:80", 2, "port 65536 out of range"),
    ("a:b:c:d", 1, "must be HOST+:GUEST"),
    ("x+:80", 1, "must be HOST+:GUEST"),
])
def test_publish_errors(spec, replicas, message):
    with pytest.raises(Invalid, match=re.escape(message)):
        expand_publish(spec, replicas)


ERRORS = [
    # name, file text, line, text in the message
    ("unknown top-level key", 'host_memory = "2G"\nhost_mem = 1\n[[vm]]\nname="a"\nimage="front.jvmkit"\n', 2,
     "unknown key 'host_mem'; did you mean 'host_memory'?"),
    ("unknown key in a vm", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nreplica = 2\n', 4,
     "unknown key 'replica' in [[vm]] #1 (a); did you mean 'replicas'?"),
    ("a size that is not one", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nmemory = "lots"\n', 4,
     "[[vm]] #1 (a): 'memory' must be a size such as 512M or 2G, not 'lots'"),
    ("restart value", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nrestart = "sometimes"\n', 4,
     "'restart' must be one of no, on-failure, always, not 'sometimes'"),
    ("no image", '[[vm]]\nname = "a"\n\n[[vm]]\nname = "b"\nimage = "front.jvmkit"\n', 1, "[[vm]] #1 (a) has no 'image'"),
    ("image missing", '[[vm]]\nname = "a"\nimage = "nope.jvmkit"\n', 3, "is not a jvmkit image"),
    ("second entry's error", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\n[[vm]]\nname = "b"\nimage = "front.jvmkit"\n'
     'weight = 0\n', 7, "[[vm]] #2 (b): 'weight' must be between 1 and 1000, not 0"),
    ("one port for many replicas", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nreplicas = 2\npublish = ["80:8080"]\n',
     5, "every item of 'publish' gives one host port ('80:8080') to 2 replicas: write 80+:8080"),
    ("a port published twice", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nreplicas = 3\npublish = ["9000+:80"]\n'
     '[[vm]]\nname = "b"\nimage = "front.jvmkit"\npublish = ["9002:80"]\n', 9,
     "host port 9002 is published by both a-3 and b"),
    ("two VMs with one name", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nreplicas = 2\n[[vm]]\nname = "a-2"\n'
     'image = "front.jvmkit"\n', 6, "two VMs are named 'a-2'"),
    ("floor above ceiling", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nmemory = "512M"\nmin_memory = "1G"\n', 5,
     "min_memory 1024M is above memory 512M"),
    ("bad name", '[[vm]]\nname = "-x"\nimage = "front.jvmkit"\n', 2, "VM name '-x' is not valid"),
    ("vm not an array", 'vm = 3\n', 1, "'vm' must be an array of tables"),
    ("isolated with the host's loopback", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nnetwork = "isolated"\n'
     'allow_host_loopback = true\n', 5, "allow_host_loopback does not go with network = \"isolated\""),
    ("a network mode", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nnetwork = "open"\n', 4,
     "'network' must be one of outbound, isolated, not 'open'"),
    ("connect without libvirt", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nconnect = "qemu:///session"\n', 4,
     "'connect' is libvirt's URI"),
    ("an engine", '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nengine = "xen"\n', 4, "'engine' must be one of"),
]


@pytest.mark.parametrize("name,text,line,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_file_and_line(images, name, text, line, message):
    path = write(images, text)
    with pytest.raises(UsageError) as info:
        load(path)
    assert str(info.value).startswith(f"{path.resolve()}:{line}: "), str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_no_vms_and_bad_toml(images):
    with pytest.raises(UsageError, match="no VMs: add a \\[\\[vm\\]\\] table"):
        load(write(images, 'host_memory = "1G"\n'))
    with pytest.raises(UsageError, match="not valid TOML"):
        load(write(images, '[[vm]\n'))
    with pytest.raises(UsageError, match="no such file"):
        load(images / "missing.toml")


def test_the_fleet_name_comes_from_the_file_or_its_key(images):
    assert load(write(images, EXAMPLE, "web.toml")).name == "web"
    assert load(write(images, 'name = "prod"\n' + EXAMPLE, "web.toml")).name == "prod"


def test_up_with_a_bad_file_is_one_line_and_status_2(images):
    path = write(images, '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nmemory = "lots"\n')
    proc = subprocess.run([sys.executable, "-m", "jvmkit", "up", str(path)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().count("\n") == 0 and f"{path.resolve()}:4:" in proc.stderr, proc.stderr


def test_parse_without_image_checks():
    fleet = parse('[[vm]]\nname = "a"\nimage = "x.jvmkit"\nreplicas = 2\n', Path("/tmp/f.toml"), check_images=False)
    assert [v.name for v in fleet.vms] == ["a-1", "a-2"] and fleet.vms[0].image == Path("/tmp/x.jvmkit")


def test_network_and_engine_reach_the_run(images):
    """The fleet file takes `run`'s network policy (issue 16) and engine (issue 18) keys."""
    fleet = load(write(images, '[[vm]]\nname = "a"\nimage = "front.jvmkit"\nnetwork = "isolated"\n'
                               'engine = "libvirt"\nconnect = "qemu:///session"\n[[vm]]\nname = "b"\n'
                               'image = "front.jvmkit"\nallow_host_loopback = true\n'))
    a, b = fleet.get("a").run_args(), fleet.get("b").run_args()
    assert a[a.index("--engine") + 1] == "libvirt" and a[a.index("--connect") + 1] == "qemu:///session"
    assert a[a.index("--network") + 1] == "isolated" and "--allow-host-loopback" not in a
    assert "--allow-host-loopback" in b and "--engine" not in b and "--network" not in b
    # and `jvmkit run` takes them as the fleet writes them
    from jvmkit.cli import cli

    for argv in (a, b):
        assert cli.get_command(None, "run").make_context("run", argv[1:])


def test_tcg_cache_reaches_the_run_and_is_bounded(images):
    fleet = load(write(images, '[[vm]]\nname = "a"\nimage = "front.jvmkit"\ntcg_cache = "48M"\n'))
    argv = fleet.get("a").run_args()
    assert argv[argv.index("--tcg-cache") + 1] == "48M"
    with pytest.raises(UsageError, match="'tcg_cache' must be between 16M and 2048M"):
        load(write(images, '[[vm]]\nname = "a"\nimage = "front.jvmkit"\ntcg_cache = "4M"\n'))


def test_the_budget_counts_each_vms_own_translation_cache():
    from jvmkit.fleet.brain import QEMU_OVERHEAD_MIB, overhead_mib

    assert overhead_mib({"accel": "kvm", "tcg_tb_mib": 128}) == QEMU_OVERHEAD_MIB
    assert overhead_mib({"accel": "tcg", "tcg_tb_mib": 32}) == QEMU_OVERHEAD_MIB + 32
    assert overhead_mib({"accel": "tcg"}) == QEMU_OVERHEAD_MIB + 128  # a state written before the option
