"""The `jvmkit` command line (click): parsing, output mode, error printing and exit codes.

Each command is a thin shell over a module that does the work; the options of `pack` and `run`
come from the settings table (jvmkit.settings, merged with jvmkit.toml by jvmkit.config). Every
failure is one line on stderr (see `main`): a click usage error or a `UsageError` exits 2, another
`JvmkitError` 1, an unexpected exception (a bug) 70; only `--debug` (or JVMKIT_DEBUG=1) shows a
traceback.
(~660 lines, over the ~450 the modules keep to: one click command per function, each a few lines of
options and a call, and the error mapping they share; split by command they would import each other.)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
import traceback
from pathlib import Path

import click

from jvmkit import __version__, ui
from jvmkit import config as configs
from jvmkit.config import cli_options as settings_options
from jvmkit.engines import EXPORT_FORMATS as ENGINE_FORMATS
from jvmkit.settings import SizeType
from jvmkit.errors import EXIT_INTERRUPTED, EXIT_SOFTWARE, EXIT_USAGE, JvmkitError
from jvmkit.packager import targets
from jvmkit.units import human, parse_mib

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
TARGET_NAMES = list(targets.NAMES)


def output_options(json_flag: bool = True):
    """--quiet/--debug (and --json) on every command; they set up jvmkit.ui's console."""

    def decorate(func):
        @click.option("--debug", is_flag=True, help="Show tracebacks and the commands jvmkit runs.")
        @click.option("-q", "--quiet", is_flag=True, help="Only print results and errors.")
        @functools.wraps(func)
        def wrapper(*args, debug=False, quiet=False, json_out=False, **kwargs):
            ui.configure(quiet=quiet, json=json_out, debug=debug or _env_debug())
            return func(*args, **kwargs)

        if json_flag:
            wrapper = click.option("--json", "json_out", is_flag=True, help="Print the result as JSON on stdout.")(wrapper)
        return wrapper

    return decorate


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="jvmkit")
def cli():
    """jvmkit: pack a Java application into a tiny bootable VM and run it with a JVM-aware balloon.

    \b
    Typical use:
      jvmkit pack app.jar --target linux      # -> app.jvmkit/ (trimmed JDK + CDS + kernel)
      jvmkit run app.jvmkit -- arg1 arg2      # boot it; exit status = the app's
      jvmkit run --balloon app.jvmkit         # give idle heap memory back to the host

    pack and run also read their settings from ./jvmkit.toml (or --config FILE); each option's
    --help names its key. Exit status: 0 done, 1 the environment (a missing tool, an unreachable
    mirror), 2 bad input, 70 a bug in jvmkit, 130 interrupted; `run` exits with the app's status.
    """


# ---- pack ----------------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@settings_options("pack")
@click.option("--list-profiles", is_flag=True, help="List the JDK profiles and exit.")
@output_options()
def pack(list_profiles, config_path, **settings):
    """Pack JAR with a trimmed JDK into a bootable VM image.

    Analyses the jar (manifest, Class-Path, jdeps), builds a runtime with only the modules the app
    needs (jlink, cached) plus a CDS archive, adds the guest agent, and writes NAME.jvmkit/ for the
    chosen target. Prints one summary line (or --json). Settings not given as options come from
    jvmkit.toml (its top level), each option's [jvmkit.toml: KEY] says which key.
    """
    from jvmkit.packager.pack import pack as do_pack

    console = ui.current()
    if list_profiles:
        _print_profiles(console)
        return
    request = configs.pack_request(settings, config_path)
    if request.snapshot:
        from jvmkit.vm.snapshot import readiness

        readiness(request.ready_port, request.ready_line, request.ready_after, request.ready_url)  # fails before packing
    result = do_pack(request)
    if request.snapshot:  # pack --snapshot: the image is complete; now boot it once and save it ready
        from jvmkit.settings import SnapshotOptions
        from jvmkit.vm.snaptake import take

        taken = take(result.output, SnapshotOptions(ready_port=request.ready_port, ready_line=request.ready_line,
                                                    ready_after=request.ready_after, ready_url=request.ready_url,
                                                    ready_timeout=request.ready_timeout))
        console.result(result.summary() + "\n" + taken.summary(), {**result.to_dict(), "snapshot": taken.to_dict()})
        return
    console.result(result.summary(), result.to_dict())


def _print_profiles(console):
    from jvmkit.profiles import available_profiles, load_profile

    profiles = [load_profile(name) for name in available_profiles()]
    data = {p.name: {**p.to_dict(), "description": p.description} for p in profiles}
    lines = [f"{p.name:<10} {p.description}" for p in profiles]
    console.result("\n".join(lines), {"profiles": data})


# ---- run / ps / stop ----------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@settings_options("run")
@output_options(json_flag=False)
def run(image, args, config_path, **settings):
    """Boot IMAGE under QEMU; the exit status is the app's.

    Arguments after `--` replace the image's default app arguments. The app's output goes to
    stdout; with --verbose the kernel and init messages go to stderr. Exit status: the app's own,
    or 124 (--timeout hit), 125 (the VM failed: panic, crash, QEMU error), 130 (interrupted).
    Settings not given as options come from jvmkit.toml's [run] and [balloon] tables, each
    option's [jvmkit.toml: KEY] says which key.
    """
    from jvmkit.vm.runner import run as do_run

    options = configs.run_options(settings, config_path, args=tuple(args) if _had_separator() else None)
    if options.balloon:
        from jvmkit.balloon.host import run_with_balloon

        status = run_with_balloon(image, dataclasses.replace(options, jmx=True), min_memory_mib=options.min_memory_mib,
                                  interval=options.balloon_interval, log_path=options.balloon_log,
                                  weight=options.balloon_weight)
        # The JMX client's JVM lives in this process (JPype); threads still blocked in a Java call
        # would abort a normal interpreter shutdown, so leave directly once everything is flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(do_run(image, options))


def _had_separator() -> bool:
    return "--" in sys.argv[1:]


@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@settings_options("snapshot")
@click.option("--remove", is_flag=True, help="Remove the image's snapshot instead of taking one.")
@output_options()
def snapshot(image, args, remove, config_path, **settings):
    """Boot IMAGE, wait until the app is ready, and save the VM into the image.

    `jvmkit run IMAGE` then restores that VM instead of booting it, when the run asks for the same
    memory, vCPUs and app arguments on the same QEMU (else it boots cold, saying why). Ready means:
    the app called io.jvmkit.Ready.signal() (default), or --ready-port, --ready-line or
    --ready-after. Arguments after `--` replace the image's default app arguments. The snapshot
    holds the guest's memory (secrets included): its files are 0600; `export` never writes them.
    """
    from jvmkit.settings import SnapshotOptions
    from jvmkit.vm import snaptake

    console = ui.current()
    if remove:
        removed = snaptake.remove(image)
        console.result(f"{image}: snapshot removed" if removed else f"{image} has no snapshot",
                       {"image": str(image), "removed": removed})
        return
    options = SnapshotOptions(**configs.merge("snapshot", settings, config_path,
                                              args=tuple(args) if _had_separator() else None))
    result = snaptake.take(image, options)
    console.result(result.summary(), result.to_dict())


@cli.command(context_settings=CONTEXT)
@output_options()
def ps():
    """List running VMs, grouped by the fleet they belong to (`jvmkit up`)."""
    from jvmkit.fleet.state import memberships
    from jvmkit.vm import rundir

    fleets = memberships()
    rows = [r.read_state() | {"name": r.name, "fleet": fleets.get(r.name)} for r in rundir.running()]
    rows.sort(key=lambda r: (r["fleet"] is None, r["fleet"] or "", r["name"]))
    console = ui.current()
    if console.json:
        console.result("", {"vms": rows})
        return
    if not rows:
        console.result("no VMs are running", {})
        return
    width = max([5] + [len(r["fleet"] or "-") for r in rows])
    lines = [f"{'FLEET':<{width}} {'NAME':<28} {'TARGET':<6} {'MEMORY':>7} {'CPUS':>4} {'ACCEL':<5} {'BOOT':<8} {'UP':>7}  PORTS"]
    for row in rows:
        up = time.time() - row.get("started", time.time())
        lines.append(f"{row['fleet'] or '-':<{width}} {row['name']:<28} {row.get('target', '?'):<6} "
                     f"{str(row.get('memory_mib', '?')) + 'M':>7} {row.get('cpus', '?'):>4} {row.get('accel', '?'):<5} "
                     f"{row.get('boot', '-'):<8} {up:>6.0f}s  {', '.join(row.get('ports', []))}")
    console.result("\n".join(lines), {"vms": rows})


# ---- up / down ---------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-d", "--detach", is_flag=True, help="Start the fleet and return; a supervisor keeps it running.")
@click.option("--supervise", is_flag=True, hidden=True)
@output_options()
def up(file, detach, supervise):
    """Start the VMs of the fleet FILE together and keep them running.

    \b
    FILE is a fleet file (TOML):
      host_memory = "6G"            # what all VMs on the host may use [MemTotal minus a reserve]
      parallel = 2                  # VMs booting at once [all]
      [[vm]]
      name = "cache"                # replicas are cache-1 .. cache-4
      image = "cache-service.jvmkit"
      replicas = 4
      memory = "1G"                 # ceiling per VM
      min_memory = "256M"           # floor per VM
      weight = 2                    # share under contention [1]
      publish = ["18080+:8080"]     # one host port per replica, counting up
      args = ["--port", "8080"]
      restart = "on-failure"        # no | on-failure | always, with backoff [no]
      network = "outbound"          # outbound | isolated; allow_host_loopback = true [as run]
      engine = "qemu"               # qemu | libvirt (+ connect = "URI") [qemu]

    Each VM runs as `jvmkit run --balloon` (unless `balloon = false`) and joins the host's memory
    budget, which one balloon brain per host divides among all VMs. A VM whose floor does not fit
    in what is left of host_memory waits up to 60 s while the idle VMs' shrinker hooks make room
    (when their live heaps could), else it is not started. Output lines are prefixed with the VM's name;
    Ctrl-C stops them all. With -d the command returns once the VMs have booted (exit status 1 if
    one was not admitted or ended, with one line each saying why); `jvmkit down FILE|NAME` stops
    them.
    """
    from jvmkit.fleet import up as fleets

    if supervise:
        sys.exit(fleets.foreground(file))
    if not detach:
        sys.exit(fleets.foreground(file))
    status, data = fleets.detach(file)
    none = data["vms"] and all(vm.get("phase") == "refused" for vm in data["vms"].values())
    how = "ended" if data["ended"] else "started no VM" if none else "is up"
    lines = [f"fleet {data['fleet']} {how} (supervisor pid {data['supervisor_pid']}, log {data['log']})"]
    for name, vm in data["vms"].items():
        if vm.get("phase") == "refused":
            continue
        ports = f"  {', '.join(vm.get('publish') or [])}" if vm.get("publish") else ""
        lines.append(f"  {name:<28} {vm.get('phase')}{ports}")
    for note in data["refused"] + ([data["ended"]] if data["ended"] else []):
        ui.current().notice(f"jvmkit up: {note}")
    ui.current().result("\n".join(lines), data)
    sys.exit(status)


@cli.command(context_settings=CONTEXT)
@click.argument("target", metavar="FILE|NAME")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds before VMs are killed.")
@output_options()
def down(target, timeout):
    """Stop the fleet NAME (or the one started from FILE): all its VMs, and its supervisor."""
    from jvmkit.fleet.state import down as do_down

    name, stopped = do_down(target, timeout)
    ui.current().result(f"fleet {name} is down" + (f": stopped {', '.join(stopped)}" if stopped else ""),
                        {"fleet": name, "stopped": stopped})


@cli.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds before QEMU is killed.")
@output_options(json_flag=False)
def stop(name, timeout):
    """Stop the running VM NAME (its `jvmkit run` then exits 130)."""
    from jvmkit.vm import rundir

    run = rundir.find(name)
    state = run.read_state()
    pid = state.get("jvmkit_pid")
    import signal as _signal

    if pid:
        os.kill(pid, _signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and rundir.pid_alive(state.get("qemu_pid")):
        time.sleep(0.1)
    if rundir.pid_alive(state.get("qemu_pid")):
        os.kill(state["qemu_pid"], _signal.SIGKILL)
    ui.current().result(f"stopped {name}", {"stopped": name})


# ---- inspect / export -----------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip checking the files' SHA-256 digests.")
@output_options()
def inspect(image, no_verify):
    """Show what is inside IMAGE (its manifest), verified against its digests."""
    from jvmkit.packager import bundle as bundles

    b = bundles.load(image, verify=not no_verify)
    ui.current().result(describe_manifest(b), b.manifest.to_json())


def describe_manifest(b) -> str:
    m = b.manifest
    app, jdk, kernel = m.app, m.jdk, m.kernel
    lines = [
        f"image      {b.path}  ({human(m.size)}, format {m.format}, {m.created_by or '?'})",
        f"target     {m.target}",
        f"app        {Path(app.jar).name}  main {app.main_class}",
        f"class path {':'.join(app.class_path)}",
        f"jdk        {jdk.version}  profile {jdk.profile.get('name', '?')}  CDS {'yes' if jdk.cds else 'no'}"
        f"  runtime {human(jdk.runtime_size)}",
        f"modules    {', '.join(jdk.modules)}",
        f"kernel     {kernel.name or '?'} {kernel.version or ''}  sha256 {str(kernel.sha256 or '?')[:16]}",
        f"command    {' '.join(m.command.java)}",
        f"app args   {' '.join(m.command.args) or '(none)'}",
        f"defaults   memory {m.defaults.memory_mib}M  cpus {m.defaults.cpus}",
        *targets.get(m.target).describe(m),
        "files",
    ]
    for role, f in sorted(m.files.items()):
        lines.append(f"  {role:<10} {f.path:<22} {human(f.size):>10}  sha256 {f.sha256[:16]}")
    if m.snapshot is not None:
        s = m.snapshot
        used = f", guest used {s.guest_used_mib} MiB" if s.guest_used_mib is not None else ""
        lines += [f"snapshot   present: taken {s.taken or '?'} at {s.memory_mib}M, {s.cpus} vCPU, {s.accel}, "
                  f"QEMU {s.qemu_version}, ready by {s.ready}; args {' '.join(s.args) or '(none)'}",
                  f"  state      {s.state.path:<22} {human(s.state.size):>10}  sha256 {s.state.sha256[:16]}{used}"
                  f"  (0600: the guest's memory)"]
    return "\n".join(lines)


# Every target's Target.export_formats, in order (tests/test_libvirt_xml.py checks it against the
# targets): listed here because importing the targets to ask costs ~80 ms on every command.
EXPORT_FORMATS = ("raw", "qcow2", *ENGINE_FORMATS)


@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The disk file (raw, qcow2) or the directory (libvirt, kubevirt) to write.")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="raw", show_default=True,
              help="What to write (raw, qcow2: osv images only).")
@click.option("--loader", type=click.Path(path_type=Path),
              help="osv: OSv's loader image (build/last/loader.img) for raw/qcow2/kubevirt "
                   "[default: the one cached with the image's kernel].")
@click.option("-p", "--publish", multiple=True, metavar="[ADDR:]HOST:GUEST",
              help="libvirt: forward a host TCP port to the guest; kubevirt: a Service port HOST -> GUEST "
                   "(repeatable).")
@click.option("--memory", "memory_mib", type=SizeType(), metavar="SIZE",
              help="libvirt, kubevirt: guest memory [default: the image's].")
@click.option("--cpus", type=click.IntRange(1, 64), metavar="N", help="libvirt, kubevirt: vCPUs [default: the image's].")
@click.option("--accel", type=click.Choice(["kvm", "tcg"]), default="kvm", show_default=True,
              help="libvirt: domain type kvm, or qemu (TCG) for hosts without KVM.")
@click.option("--image-ref", metavar="REF",
              help="kubevirt: the containerDisk's image reference in the manifest [default: jvmkit/NAME:latest].")
@output_options()
def export(image, output, fmt, loader, publish, memory_mib, cpus, accel, image_ref):
    """Write IMAGE in a format other engines boot.

    \b
    raw, qcow2  osv: one bootable OSv disk
    libvirt     DIR/domain.xml + the boot files (virsh define DIR/domain.xml)
    kubevirt    DIR/containerdisk (OCI layout), DIR/containerdisk.tar (OCI archive),
                DIR/virtualmachine.yaml (VirtualMachine + Service)
    """
    from jvmkit.packager import bundle as bundles

    b = bundles.load(image)
    dest = targets.get(b.target, "image target").export(
        b, fmt, output, loader=loader, publish=tuple(publish), memory_mib=memory_mib, cpus=cpus, accel=accel,
        image_ref=image_ref)
    if dest.is_dir():
        files = sorted(p.name for p in dest.iterdir())
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        ui.current().result(f"{dest}/  {human(size)}  {fmt}: {', '.join(files)}",
                            {"directory": str(dest), "format": fmt, "files": files, "size": size})
        return
    ui.current().result(f"{dest}  {human(dest.stat().st_size)}  {fmt}", {"disk": str(dest), "format": fmt,
                                                                          "size": dest.stat().st_size})


# ---- doctor ----------------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.option("--jdk", type=click.Path(path_type=Path), help="Check this JDK instead of the default one.")
@click.option("--probe-kvm", is_flag=True, help="Run the KVM probe now (else its cached verdict is shown).")
@output_options()
def doctor(jdk, probe_kvm):
    """Report what jvmkit needs and what it found on this machine."""
    from jvmkit.doctor import report, render

    data = report(jdk, probe_kvm)
    ui.current().result(render(data), data)
    if not data["ok"]:
        sys.exit(1)


# ---- cache -----------------------------------------------------------------------------------------

@cli.group(context_settings=CONTEXT)
def cache():
    """Look at and clean jvmkit's cache (runtimes, agents, kernels, downloads)."""


@cache.command("ls")
@output_options()
def cache_ls():
    """List cache entries with their sizes and last use."""
    from jvmkit import cache as caches

    entries = caches.list_entries()
    rows = [{"kind": e.kind, "key": e.key, "size": e.size, "last_used": e.last_used, "path": str(e.path)}
            for e in entries]
    total = sum(e.size for e in entries)
    lines = [f"cache {caches.cache_root()}  ({len(entries)} entries, {human(total)})"]
    for e in entries:
        age = (time.time() - e.last_used) / 86400
        lines.append(f"  {e.kind:<9} {e.key:<44} {human(e.size):>10}  used {age:.1f} days ago")
    ui.current().result("\n".join(lines), {"root": str(caches.cache_root()), "entries": rows, "total": total})


@cache.command("prune")
@click.option("--older-than", type=float, default=30.0, show_default=True, metavar="DAYS",
              help="Remove entries not used for this many days.")
@click.option("--all", "remove_all", is_flag=True, help="Remove every entry.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@output_options()
def cache_prune(older_than, remove_all, dry_run):
    """Remove cache entries that have not been used for a while."""
    from jvmkit import cache as caches

    removed = caches.prune(0 if remove_all else older_than, dry_run=dry_run)
    freed = sum(e.size for e in removed)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {len(removed)} entries, {human(freed)}"] + [f"  {e.kind}/{e.key}" for e in removed]
    ui.current().result("\n".join(lines), {"removed": [f"{e.kind}/{e.key}" for e in removed], "freed": freed,
                                           "dry_run": dry_run})


# ---- kernel ------------------------------------------------------------------------------------------

@cli.group(context_settings=CONTEXT)
def kernel():
    """Get, import and list guest kernels."""


@kernel.command("pull")
@click.argument("target", type=click.Choice(TARGET_NAMES))
@click.option("--suite", help="linux: Debian suite [default: the host's, else bookworm].")
@click.option("--mirror", help="linux: Debian mirror URL [default: from apt's sources].")
@click.option("--version", "version", help="osv: release tag [default: the newest known].")
@click.option("--url", help="osv: base URL of the release downloads (for mirrors and tests).")
@click.option("--refresh", is_flag=True, help="linux: re-read the archive's index even if cached.")
@click.option("--sha256", "sha256", help="osv: SHA-256 of osv-loader.elf.x86_64.gz (when none is pinned).")
@output_options()
def kernel_pull(target, suite, mirror, version, url, refresh, sha256):
    """Download a guest kernel into the cache (verified by SHA-256)."""
    k = targets.get(target).pull_kernel(suite=suite, mirror=mirror, refresh=refresh, version=version, url=url,
                                        sha256=sha256)
    info = k.describe()
    ui.current().result(f"{target} kernel {info.get('version')} in {info.get('path')}", info)


@kernel.command("import")
@click.argument("target", type=click.Choice(TARGET_NAMES))
@click.argument("path", type=click.Path(path_type=Path))
@output_options()
def kernel_import(target, path):
    """Add a kernel you built to the cache (OSv loader, or a Linux bzImage/vmlinux)."""
    k = targets.get(target).import_kernel(path)
    info = k.describe()
    ui.current().result(f"imported {target} kernel {info.get('version')} ({info.get('sha256', '')[:16]})", info)


@kernel.command("ls")
@output_options()
def kernel_ls():
    """List cached kernels."""
    from jvmkit.packager.kernels import store

    rows = store.list_kernels()
    lines = [f"{'TARGET':<6} {'VERSION':<28} {'SHA256':<16} {'SIZE':>10}"]
    lines += [f"{r['target']:<6} {r['version']:<28} {r['sha256'][:16]:<16} {human(r['size']):>10}" for r in rows]
    ui.current().result("\n".join(lines) if rows else "no kernels cached (see `jvmkit kernel pull`)", {"kernels": rows})


# ---- balloon -----------------------------------------------------------------------------------------

@cli.group(context_settings=CONTEXT)
def balloon():
    """Look at and steer the memory balloon of running VMs."""


@balloon.command("status")
@click.argument("name", required=False)
@output_options()
def balloon_status(name):
    """Show memory, balloon, heap and the last balloon decision of running VMs, and the host's budget.

    MEMORY is the VM's ceiling, GUEST MEM the memory the balloon leaves the guest now (JSON
    guest_mib), BALLOON the balloon's size, what it holds back of MEMORY (balloon_mib); TARGET is
    where the host's balloon brain is taking it, FLOOR the least it may be left, WEIGHT its share
    under contention. The last line is the budget all VMs on the host share.
    """
    from jvmkit.balloon.control import budget_line, fleet_status, status_rows

    fleet = fleet_status()
    rows = status_rows(name, fleet)
    lines = [f"{'NAME':<28} {'MEMORY':>7} {'GUEST MEM':>9} {'BALLOON':>8} {'HEAP USED':>10} {'COMMITTED':>10} "
             f"{'TARGET':>7} {'FLOOR':>6} {'WEIGHT':>6}  LAST DECISION"]
    for r in rows:
        head = f"{r['name']:<28} {_mib(r.get('memory_mib')):>7} "
        if not r.get("controlled"):
            lines.append(head + r["note"])
            continue
        last = r.get("last") or r.get("note") or ""
        if r.get("above_set_ceiling") and r.get("last"):
            last = f"{r['note']}; {last}"
        weight = "-" if r.get("weight") is None else str(r["weight"])
        lines.append(head + f"{_mib(r.get('guest_mib')):>9} {_mib(r.get('balloon_mib')):>8} "
                     f"{_mib(r.get('heap_used_mib')):>10} {_mib(r.get('heap_committed_mib')):>10} "
                     f"{_mib(r.get('target_mib')):>7} {_mib(r.get('floor_mib')):>6} {weight:>6}  {last}")
    budget = budget_line(fleet)
    if budget and rows:
        lines.append(budget)
    ui.current().result("\n".join(lines) if rows else "no VMs are running", {"vms": rows, "budget": fleet})


def _mib(value) -> str:
    return "-" if value is None else f"{float(value):.0f}M"


@balloon.command("set")
@click.argument("name")
@click.argument("size")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the result.")
@output_options()
def balloon_set(name, size, timeout):
    """Set the memory VM NAME may use to SIZE (e.g. 384M).

    Needs a VM run with --balloon: the guest's heap is shrunk first, and the balloon stops at the
    floor — what the guest needs (live heap + headroom + what it uses besides the heap + a reserve
    above its low-memory mark) or --min-memory, whichever is higher; the answer says which. If the
    app grows later, the guest gets memory back above SIZE rather than starve.
    """
    from jvmkit.balloon.control import set_line, set_target

    result = set_target(name, parse_mib(size, "SIZE"), timeout)
    ui.current().result(set_line(name, result), result)


# ---- entry point -------------------------------------------------------------------------------------

def _env_debug() -> bool:
    return os.environ.get("JVMKIT_DEBUG", "") not in ("", "0")


def _debug_wanted() -> bool:
    argv = sys.argv[1:]
    before_args = argv[:argv.index("--")] if "--" in argv else argv
    return ui.current().debug or _env_debug() or "--debug" in before_args


def _command_path(ctx: click.Context | None) -> str:
    """`jvmkit run` for an error in `run`'s arguments; from argv when click gives no context."""
    if ctx is not None:
        return ctx.command_path
    words, group = ["jvmkit"], cli
    for arg in sys.argv[1:]:
        if arg == "--" or not isinstance(group, click.Group):
            break
        if arg.startswith("-"):
            continue
        sub = group.get_command(None, arg)  # type: ignore[arg-type]
        if sub is None:
            break
        words.append(arg)
        group = sub
    return " ".join(words)


def _param_name(param: click.Parameter | None, fallback: str | None = None) -> str:
    if isinstance(param, click.Option):
        return next((o for o in param.opts if o.startswith("--")), param.opts[0])
    if isinstance(param, click.Argument):
        return param.human_readable_name.strip("[]").rstrip(".")
    return (fallback or "a parameter").strip("'")


def _sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def usage_line(exc: click.UsageError) -> str:
    """One line for a click usage error: what is wrong, naming the option or argument, and the
    --help to read (pure but for argv when click has no context)."""
    if isinstance(exc, click.MissingParameter):
        what = exc.param_type or (exc.param.param_type_name if exc.param else "parameter")
        message = f"missing {what} {_param_name(exc.param, exc.param_hint)}"
        choices = getattr(getattr(exc.param, "type", None), "choices", None)
        if choices:
            message += f" (one of: {', '.join(map(str, choices))})"
    elif isinstance(exc, click.BadParameter):
        message = f"{_param_name(exc.param, exc.param_hint)}: {_sentence(exc.message)}"
    elif isinstance(exc, click.NoSuchOption):
        message = f"no such option {exc.option_name}"
        if exc.possibilities:
            message += f" (did you mean {' or '.join(sorted(exc.possibilities))}?)"
    else:
        message = _sentence(exc.message)
    return f"{message} (see {_command_path(exc.ctx)} --help)"


def main() -> None:
    """Run the CLI; map every way it can end to one line on stderr and an exit status:
    2 bad input (click's usage errors, UsageError), 1 other JvmkitError (the environment: missing
    tools, an unreachable mirror, a full disk), 70 a bug in jvmkit (EX_SOFTWARE), 130 interrupted."""
    try:
        cli.main(prog_name="jvmkit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("jvmkit: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `jvmkit` or `jvmkit GROUP`: help, as click 8.1 did
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        print(f"jvmkit: error: {usage_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        print(f"jvmkit: error: {_sentence(exc.format_message())}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except JvmkitError as exc:
        if _debug_wanted():
            traceback.print_exc()
        print(f"jvmkit: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("jvmkit: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: say so in one line, the traceback only on request
        if _debug_wanted():
            traceback.print_exc()
            hint = "the traceback is above"
        else:
            hint = "--debug or JVMKIT_DEBUG=1 shows the traceback"
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        print(f"jvmkit: internal error: {' '.join(detail.split())} (a bug in jvmkit; {hint})", file=sys.stderr)
        sys.exit(EXIT_SOFTWARE)
