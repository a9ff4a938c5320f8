"""The `jvmkit` command line (click): parsing, output mode, error printing and exit codes.

Each command is a thin shell over a module that does the work. A `JvmkitError` becomes one line
on stderr (`jvmkit: error: ...`) and its exit code; only `--debug` (or JVMKIT_DEBUG=1) shows a
traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import click

from jvmkit import __version__, ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.units import human, parse_mib

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def output_options(json_flag: bool = True):
    """--quiet/--debug (and --json) on every command; they set up jvmkit.ui's console."""

    def decorate(func):
        @click.option("--debug", is_flag=True, help="Show tracebacks and the commands jvmkit runs.")
        @click.option("-q", "--quiet", is_flag=True, help="Only print results and errors.")
        @functools.wraps(func)
        def wrapper(*args, debug=False, quiet=False, json_out=False, **kwargs):
            ui.configure(quiet=quiet, json=json_out, debug=debug or bool(os.environ.get("JVMKIT_DEBUG")))
            return func(*args, **kwargs)

        if json_flag:
            wrapper = click.option("--json", "json_out", is_flag=True, help="Print the result as JSON on stdout.")(wrapper)
        return wrapper

    return decorate


def size_mib(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_mib(value, f"--{param.name.replace('_mib', '').replace('_', '-')}")
    except UsageError as exc:
        raise click.BadParameter(exc.message) from None


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="jvmkit")
def cli():
    """jvmkit: pack a Java application into a tiny bootable VM and run it with a JVM-aware balloon.

    \b
    Typical use:
      jvmkit pack app.jar --target linux      # -> app.jvmkit/ (trimmed JDK + CDS + kernel)
      jvmkit run app.jvmkit -- arg1 arg2      # boot it; exit status = the app's
      jvmkit run --balloon app.jvmkit         # give idle heap memory back to the host
    """


# ---- pack ----------------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.argument("jar", required=False, type=click.Path(path_type=Path))
@click.option("-t", "--target", type=click.Choice(["osv", "linux"]), default=None,
              help="Image kind: an OSv unikernel (default) or a Linux micro-VM.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Image bundle to write [default: ./NAME.jvmkit].")
@click.option("-f", "--force", is_flag=True, help="Replace an existing output.")
@click.option("--main", "main_class", metavar="CLASS", help="Main class, when the jar's manifest has none.")
@click.option("--lib", "libs", multiple=True, type=click.Path(path_type=Path), metavar="JAR",
              help="Extra class-path jar (repeatable).")
@click.option("--add-modules", "add_modules", multiple=True, metavar="M[,M...]",
              help="JDK modules to add to what jdeps finds.")
@click.option("--jvm-arg", "jvm_args", multiple=True, metavar="ARG", help="JVM option for the guest (repeatable).")
@click.option("--arg", "app_args", multiple=True, metavar="ARG", help="Default argument for the app (repeatable).")
@click.option("--profile", metavar="NAME|FILE.toml", help="JDK profile [default: auto]; see --list-profiles.")
@click.option("--list-profiles", is_flag=True, help="List the JDK profiles and exit.")
@click.option("--jdk", type=click.Path(path_type=Path), help="Build JDK [default: JAVA_HOME, else java on PATH].")
@click.option("--memory", "memory_mib", callback=size_mib, metavar="SIZE", help="Default guest memory [512M].")
@click.option("--cpus", type=click.IntRange(1, 64), default=None, help="Default guest vCPUs [1].")
@click.option("--kernel", type=click.Path(path_type=Path), help="Use this guest kernel instead of the cached one.")
@click.option("--appcds", is_flag=True, help="Train an AppCDS archive by running the app on the host (runs your code).")
@click.option("--train-timeout", type=float, default=None, metavar="SECONDS", help="Bound on the AppCDS training run [60].")
@click.option("--suite", help="Debian suite for the linux kernel [default: the host's, else bookworm].")
@click.option("--mirror", help="Debian mirror URL [default: from apt's sources].")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="jvmkit.toml to read [default: ./jvmkit.toml if present].")
@output_options()
def pack(jar, list_profiles, config_path, **flags):
    """Pack JAR with a trimmed JDK into a bootable VM image.

    Analyses the jar (manifest, Class-Path, jdeps), builds a runtime with only the modules the app
    needs (jlink, cached) plus a CDS archive, adds the guest agent, and writes NAME.jvmkit/ for the
    chosen target. Prints one summary line (or --json).
    """
    from jvmkit import config as configs
    from jvmkit.packager.pack import pack as do_pack

    console = ui.current()
    if list_profiles:
        _print_profiles(console)
        return
    request = configs.pack_request(jar, flags, config_path)
    result = do_pack(request)
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
@click.option("--memory", "memory_mib", callback=size_mib, metavar="SIZE", help="Guest memory [the image's default].")
@click.option("--cpus", type=click.IntRange(1, 64), help="Guest vCPUs [the image's default].")
@click.option("-p", "--publish", multiple=True, metavar="[ADDR:]HOST:GUEST",
              help="Forward a host TCP port to the guest (host side 127.0.0.1 unless ADDR is given).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              help="Accelerator: KVM only if a real probe succeeds (auto), or force one.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop the VM after this long (exit status 124).")
@click.option("-v", "--verbose", is_flag=True, help="Show kernel and init messages on stderr.")
@click.option("--name", help="VM name for ps/stop/balloon [default: image name + random suffix].")
@click.option("--balloon", is_flag=True, help="Run the JVM-aware memory balloon for this VM.")
@click.option("--min-memory", "min_memory_mib", callback=size_mib, metavar="SIZE",
              help="Balloon floor: never shrink the guest below this [default: a share of --memory].")
@click.option("--balloon-interval", type=click.FloatRange(min=0.5), default=2.0, show_default=True,
              metavar="SECONDS", help="How often the balloon re-decides.")
@click.option("--balloon-log", type=click.Path(path_type=Path), help="Write every balloon decision as JSON lines.")
@output_options(json_flag=False)
def run(image, args, memory_mib, cpus, publish, accel, timeout, verbose, name, balloon, min_memory_mib,
        balloon_interval, balloon_log):
    """Boot IMAGE under QEMU; the exit status is the app's.

    Arguments after `--` replace the image's default app arguments. The app's output goes to
    stdout; with --verbose the kernel and init messages go to stderr. Exit status: the app's own,
    or 124 (--timeout hit), 125 (the VM failed: panic, crash, QEMU error), 130 (interrupted).
    """
    from jvmkit.vm.runner import RunOptions
    from jvmkit.vm.runner import run as do_run

    options = RunOptions(memory_mib=memory_mib, cpus=cpus, publish=tuple(publish), accel=accel, timeout=timeout,
                         verbose=verbose, args=tuple(args) if _had_separator() else None, name=name, jmx=balloon)
    if balloon:
        from jvmkit.balloon.host import run_with_balloon

        status = run_with_balloon(image, options, min_memory_mib=min_memory_mib, interval=balloon_interval,
                                  log_path=balloon_log)
        # The JMX client's JVM lives in this process (JPype); threads still blocked in a Java call
        # would abort a normal interpreter shutdown, so leave directly once everything is flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(do_run(image, options))


def _had_separator() -> bool:
    return "--" in sys.argv[1:]


@cli.command(context_settings=CONTEXT)
@output_options()
def ps():
    """List running VMs."""
    from jvmkit.vm import rundir

    rows = [r.read_state() | {"name": r.name} for r in rundir.running()]
    console = ui.current()
    if console.json:
        console.result("", {"vms": rows})
        return
    if not rows:
        console.result("no VMs are running", {})
        return
    lines = [f"{'NAME':<28} {'TARGET':<6} {'MEMORY':>7} {'CPUS':>4} {'ACCEL':<5} {'UP':>7}  PORTS"]
    for row in rows:
        up = time.time() - row.get("started", time.time())
        lines.append(f"{row['name']:<28} {row.get('target', '?'):<6} {str(row.get('memory_mib', '?')) + 'M':>7} "
                     f"{row.get('cpus', '?'):>4} {row.get('accel', '?'):<5} {up:>6.0f}s  {', '.join(row.get('ports', []))}")
    console.result("\n".join(lines), {"vms": rows})


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
    ui.current().result(describe_manifest(b), b.manifest)


def describe_manifest(b) -> str:
    m = b.manifest
    app, jdk, kernel = m["app"], m["jdk"], m.get("kernel", {})
    size = sum(f["size"] for f in m["files"].values())
    lines = [
        f"image      {b.path}  ({human(size)}, format {m['format']}, {m.get('created_by', '?')})",
        f"target     {m['target']}",
        f"app        {Path(app.get('jar', '?')).name}  main {app.get('main_class')}",
        f"class path {':'.join(app.get('class_path', []))}",
        f"jdk        {jdk['version']}  profile {jdk['profile']['name']}  CDS {'yes' if jdk.get('cds') else 'no'}"
        f"  runtime {human(jdk.get('runtime_size', 0))}",
        f"modules    {', '.join(jdk['modules'])}",
        f"kernel     {kernel.get('name', '?')} {kernel.get('version', '')}  sha256 {str(kernel.get('sha256', '?'))[:16]}",
        f"command    {' '.join(m['command']['java'])}",
        f"app args   {' '.join(m['command'].get('args', [])) or '(none)'}",
        f"defaults   memory {m['defaults']['memory_mib']}M  cpus {m['defaults']['cpus']}",
        "files",
    ]
    for role, f in sorted(m["files"].items()):
        lines.append(f"  {role:<10} {f['path']:<22} {human(f['size']):>10}  sha256 {f['sha256'][:16]}")
    return "\n".join(lines)


@cli.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The disk file to write.")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True)
@click.option("--loader", type=click.Path(path_type=Path),
              help="OSv's loader image (build/last/loader.img) [default: the one cached with the image's kernel].")
@output_options()
def export(image, output, fmt, loader):
    """Write an osv IMAGE as one bootable OSv disk (boot loader + command line + filesystem)."""
    from jvmkit.packager import osv_image

    dest = osv_image.export_classic(image, loader, output, fmt)
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
@click.argument("target", type=click.Choice(["linux", "osv"]))
@click.option("--suite", help="linux: Debian suite [default: the host's, else bookworm].")
@click.option("--mirror", help="linux: Debian mirror URL [default: from apt's sources].")
@click.option("--version", "version", help="osv: release tag [default: the newest known].")
@click.option("--url", help="osv: base URL of the release downloads (for mirrors and tests).")
@click.option("--refresh", is_flag=True, help="linux: re-read the archive's index even if cached.")
@click.option("--sha256", "sha256", help="osv: SHA-256 of osv-loader.elf.x86_64.gz (when none is pinned).")
@output_options()
def kernel_pull(target, suite, mirror, version, url, refresh, sha256):
    """Download a guest kernel into the cache (verified by SHA-256)."""
    from jvmkit.packager import kernels, osv_kernels

    if target == "linux":
        k = kernels.pull_linux(suite=suite, mirror=mirror, refresh=refresh)
    else:
        k = osv_kernels.pull_osv(version=version, base_url=url, sha256=sha256)
    info = k.describe()
    ui.current().result(f"{target} kernel {info.get('version')} in {info.get('path')}", info)


@kernel.command("import")
@click.argument("target", type=click.Choice(["linux", "osv"]))
@click.argument("path", type=click.Path(path_type=Path))
@output_options()
def kernel_import(target, path):
    """Add a kernel you built to the cache (OSv loader, or a Linux bzImage/vmlinux)."""
    from jvmkit.packager import kernels, osv_kernels

    k = osv_kernels.import_osv(path) if target == "osv" else kernels.import_linux(path)
    info = k.describe()
    ui.current().result(f"imported {target} kernel {info.get('version')} ({info.get('sha256', '')[:16]})", info)


@kernel.command("ls")
@output_options()
def kernel_ls():
    """List cached kernels."""
    from jvmkit.packager import kernels

    rows = kernels.list_kernels()
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
    """Show memory, balloon, heap and the last balloon decision of running VMs.

    GUEST MEM is the memory the balloon leaves the guest (JSON guest_mib), BALLOON the balloon's
    size, what it holds back of MEMORY (balloon_mib).
    """
    from jvmkit.balloon.control import status_rows

    rows = status_rows(name)
    lines = [f"{'NAME':<28} {'MEMORY':>7} {'GUEST MEM':>9} {'BALLOON':>8} {'HEAP USED':>10} {'COMMITTED':>10}  "
             f"LAST DECISION"]
    for r in rows:
        head = f"{r['name']:<28} {_mib(r.get('memory_mib')):>7} "
        if not r.get("controlled"):
            lines.append(head + r["note"])
            continue
        last = r.get("last") or r.get("note") or ""
        if r.get("above_set_ceiling") and r.get("last"):
            last = f"{r['note']}; {last}"
        lines.append(head + f"{_mib(r.get('guest_mib')):>9} {_mib(r.get('balloon_mib')):>8} "
                     f"{_mib(r.get('heap_used_mib')):>10} {_mib(r.get('heap_committed_mib')):>10}  {last}")
    ui.current().result("\n".join(lines) if rows else "no VMs are running", {"vms": rows})


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

def main() -> None:
    try:
        cli.main(prog_name="jvmkit", standalone_mode=False)
    except click.exceptions.Abort:
        print("jvmkit: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except JvmkitError as exc:
        if ui.current().debug:
            traceback.print_exc()
        print(f"jvmkit: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("jvmkit: interrupted", file=sys.stderr)
        sys.exit(130)
