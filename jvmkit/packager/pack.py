"""`jvmkit pack`: jar analysis → trimmed runtime → guest agent → the target's image writer.

`PackRequest` is everything the CLI (or a jvmkit.toml) says; `pack()` does the work and returns a
`PackResult`. The guest command line is decided by the pure `guest_java_argv()`. The bundle is
written to a staging directory beside the output and renamed into place only when complete.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from jvmkit import __version__, cache, fileio, guest, ui
from jvmkit.balloon.agent_build import LAUNCHER_MAIN
from jvmkit.config import PackRequest
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import bundle as bundles
from jvmkit.packager import manifest as mf
from jvmkit.packager import targets
from jvmkit.packager.targets.base import PackInputs

DEFAULT_TARGET = targets.DEFAULT
GUEST_AGENT = guest.GUEST_AGENT



@dataclass(frozen=True)
class PackResult:
    output: Path
    manifest: mf.Manifest
    size: int
    seconds: float
    runtime_built: bool
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        from jvmkit.units import human

        jdk = self.manifest.jdk
        return (f"{self.output}  {human(self.size)}  target={self.manifest.target}  "
                f"java={jdk.release} runtime_modules={len(jdk.modules)}  {self.seconds:.1f}s")

    def to_dict(self) -> dict:
        return {"image": str(self.output), "size": self.size, "target": self.manifest.target,
                "modules": list(self.manifest.jdk.modules), "seconds": round(self.seconds, 3),
                "runtime_built": self.runtime_built, "timings": self.timings,
                "manifest": self.manifest.to_json()}


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds") from None


# JVM options by which a user sizes the heap; the profile's initial heap size then gives way (an
# -Xmx below it would stop the JVM: "Initial heap size set to a larger value than the maximum").
HEAP_SIZE_OPTIONS = ("-Xmx", "-Xms", "-XX:MaxHeapSize=", "-XX:InitialHeapSize=")


def defer_heap_sizing(profile_flags: list[str], user_jvm_args: list[str]) -> list[str]:
    """The profile's flags without its -XX:InitialHeapSize when the user sizes the heap (pure)."""
    if any(arg.startswith(HEAP_SIZE_OPTIONS) for arg in user_jvm_args):
        return [flag for flag in profile_flags if not flag.startswith("-XX:InitialHeapSize=")]
    return list(profile_flags)


def guest_java_argv(*, main_class: str, guest_class_path: list[str], profile_flags: list[str],
                    manifest_flags: list[str], user_jvm_args: list[str], launcher: bool,
                    appcds_archive: str | None = None, agent_first: bool = False,
                    agent_flags: tuple[str, ...] = guest.AGENT_FLAGS) -> list[str]:
    """The java command line inside the guest, without the app's arguments (pure). `agent_first`
    puts the agent jar before the app's class path (an archive trained through the Launcher was
    written with it there)."""
    argv = [f"{guest.GUEST_RUNTIME}/bin/java", *profile_flags, *manifest_flags]
    if appcds_archive:
        argv.append(f"-XX:SharedArchiveFile={appcds_archive}")
    # The agent jar is always on the class path (the Shrinker API and the Launcher live there);
    # the agent itself (agent_flags) is started only for runs that ask for it (`run --balloon`).
    agent_jar = GUEST_AGENT.lstrip("/") if guest_class_path and not guest_class_path[0].startswith("/") else GUEST_AGENT
    class_path = [agent_jar, *guest_class_path] if agent_first else [*guest_class_path, agent_jar]
    argv += [*user_jvm_args, *agent_flags, "-cp", ":".join(class_path)]
    if launcher:
        argv.append(LAUNCHER_MAIN)
    argv.append(main_class)
    return argv


def default_memory(req: PackRequest, floor, output: Path) -> int:
    """The image's default guest memory: the requested one, raised to the target's floor unless
    --memory asked for less (then the pack fails with the figure to use, as `run` states it)."""
    if req.memory_mib >= floor.mib:
        return req.memory_mib
    if req.memory_given:
        floor.check(req.memory_mib, f"--memory {req.memory_mib}M", str(output))
    ui.current().info(f"  default guest memory raised from {req.memory_mib}M to {floor.mib}M: {floor.reason}")
    return floor.mib


def image_name(jar: Path) -> str:
    name = jar.name.removesuffix(".jar")
    return name or "app"


def pack(req: PackRequest) -> PackResult:
    from jvmkit import jdk as jdks
    from jvmkit.balloon import agent_build
    from jvmkit.packager import appcds
    from jvmkit.packager import jar as jars
    from jvmkit.packager.runtime import RuntimeSpec, cds_mapping_flags, ensure_runtime
    from jvmkit.profiles import load_profile

    console = ui.current()
    started = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - t0, 3)
        return now

    target = targets.get(req.target)
    output = req.output or bundles.default_output(image_name(req.jar))
    if output.exists() and not req.force:
        raise UsageError(f"output {output} already exists", hint="use --force to replace it, or -o to choose another path")
    profile = load_profile(req.profile)
    jdk = jdks.find_jdk(req.jdk)
    if profile.runtime == "jlink" or jdk.is_jre:  # copying a JDK needs no jmods; a JRE lacks javac for the agent
        jdk.require_jmods()
    t = time.monotonic()
    console.info(f"jvmkit: packing {req.jar} for target {target.name} (profile {profile.name}, JDK {jdk.version})")
    app = jars.analyze(req.jar, main=req.main, libs=list(req.libs), add_modules=list(req.add_modules),
                       jvm_args=list(req.jvm_args), app_args=list(req.app_args), jdk=jdk,
                       strict_class_path=req.strict_class_path)
    t = lap("analyze", t)
    # The kernel first: a missing one is the likeliest failure, and it needs no runtime to find out.
    kernel = target.resolve_kernel(req.kernel, suite=req.suite, mirror=req.mirror)
    t = lap("kernel", t)
    if profile.all_modules or profile.runtime == "copy":  # a copied JDK: its release file lists them
        modules = ("ALL-MODULE-PATH",)
    else:
        modules = jars.required_modules(app.jdeps_modules if profile.add_jdeps_modules else (),
                                        list(req.add_modules), list(agent_build.AGENT_MODULES),
                                        list(profile.modules))
    console.info(f"  main class {app.main_class}; root modules for jlink: {', '.join(modules)}")
    spec = RuntimeSpec(jdk_home=str(jdk.home), jdk_version=jdk.version, jdk_release=jdk.release,
                       modules=tuple(modules), compress=profile.compress, strip_debug=profile.strip_debug,
                       cds=profile.runtime != "copy", copy=profile.runtime == "copy")
    runtime = ensure_runtime(spec, jdk.jlink, jdk.jmods)
    if not runtime.built_now:
        console.info(f"  runtime: reused from cache ({runtime.path.parent.name})")
    t = lap("runtime", t)
    agent = agent_build.build_agent(jdk.javac, jdk.release)
    t = lap("agent", t)
    app_files = list(app.files)  # (guest path, host file), sorted; class directories file by file
    mtime = source_date_epoch()
    class_path = list(app.guest_class_path)
    archive = None
    agent_flags = guest.agent_flags(target.agent_seed_path() or guest.GUEST_SEED)

    profile_flags = defer_heap_sizing([*profile.jvm_flags(), *cds_mapping_flags(jdk.release, runtime.cds_archive is not None)],
                                      [*app.manifest_jvm_flags, *req.jvm_args])
    staging = bundles.staging_dir(output, req.force)
    try:
        launcher = target.uses_launcher
        guest_mtime = target.guest_mtime(mtime)
        if req.appcds:
            jvm_flags = [*profile_flags, *app.manifest_jvm_flags, *req.jvm_args]
            files = [(g, Path(h)) for g, h in app_files]
            main, args, train_cp = app.main_class, list(req.app_args), list(app.guest_class_path)
            if launcher:  # through the Launcher with the agent jar first, as the guest starts it
                files, main, args = [(GUEST_AGENT, Path(agent.agent_jar)), *files], LAUNCHER_MAIN, [main, *args]
                train_cp = [GUEST_AGENT, *train_cp]
            trained = appcds.train(runtime=runtime.path, jvm_flags=jvm_flags, main_class=main, app_args=args,
                                   app_files=files, mtime=guest_mtime, timeout=req.train_timeout,
                                   dest=staging / ".app.jsa", class_path=train_cp)
            app_files.append((appcds.GUEST_ARCHIVE, trained))
            class_path, archive = appcds.relative_class_path(class_path), appcds.GUEST_ARCHIVE
            t = lap("appcds", t)
        elif launcher and runtime.cds_archive is not None:
            try:
                built = appcds.launcher_archive(runtime=runtime.path, runtime_key=spec.key(),
                                                agent=(GUEST_AGENT, Path(agent.agent_jar)), agent_key=agent.key,
                                                jvm_flags=profile_flags, mtime=guest_mtime)
            except JvmkitError as exc:  # an optimisation: the image works without it
                console.info(f"  note: no CDS archive for the launcher ({exc}); the image starts without one")
            else:
                app_files.append((appcds.GUEST_LAUNCHER_ARCHIVE, built))
                class_path, archive = appcds.relative_class_path(class_path), appcds.GUEST_LAUNCHER_ARCHIVE
            t = lap("launcher cds", t)
        argv = guest_java_argv(main_class=app.main_class, guest_class_path=class_path,
                               profile_flags=profile_flags, manifest_flags=list(app.manifest_jvm_flags),
                               user_jvm_args=list(req.jvm_args), launcher=launcher,
                               appcds_archive=archive, agent_first=launcher and archive is not None,
                               agent_flags=agent_flags)
        written = target.write_bundle(staging, PackInputs(
            kernel=kernel, java_argv=tuple(argv), app_args=tuple(req.app_args), runtime=runtime.path,
            app_files=tuple((g, Path(h)) for g, h in app_files), agent_jar=Path(agent.agent_jar), mtime=mtime,
            agent_flags=agent_flags))
        memory_mib = default_memory(req, target.memory_floor(written.files), output)
        t = lap("image", t)
        app_info = {**app.to_dict(), "jar_sha256": fileio.sha256_file(req.jar), "args": list(req.app_args)}
        manifest = mf.Manifest(
            name=output.name.removesuffix(bundles.SUFFIX),
            target=target.name,
            created_by=f"jvmkit {__version__}",
            source_date_epoch=mtime,
            app=mf.decode(mf.AppInfo, app_info, "app"),
            jdk=mf.JdkInfo(version=jdk.version, release=jdk.release, modules=tuple(runtime.modules),
                           profile=profile.to_dict(), cds=runtime.cds_archive is not None,
                           runtime_size=runtime.size, runtime_key=spec.key(),
                           appcds=archive if req.appcds else None,
                           launcher_cds=archive if archive and not req.appcds else None),
            agent=mf.AgentInfo(path=GUEST_AGENT, key=agent.key),
            kernel=mf.KernelInfo.from_json(target.kernel_info(kernel)),
            command=mf.CommandInfo(java=tuple(argv), args=tuple(req.app_args), agent_flags=agent_flags),
            defaults=mf.Defaults(memory_mib=memory_mib, cpus=req.cpus),
            guest=mf.GuestInfo(ports=tuple(req.ports), jmx_port=guest.JMX_GUEST_PORT),
            files=written.files,
            boot=written.boot,
        )
        (staging / ".app.jsa").unlink(missing_ok=True)
        bundles.write_manifest(staging, manifest)
        size = cache.dir_size(staging)
        bundles.publish(staging, output)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise JvmkitError(f"no space left on the device while writing {output}",
                              hint="free space or choose another -o/--output") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PackResult(output=output, manifest=manifest, size=size, seconds=time.monotonic() - started,
                      runtime_built=runtime.built_now, timings=timings)
