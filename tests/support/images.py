"""Building what the tests pack and boot: the sample apps (samples/build.py) and jvmkit's CLI as a
user runs it (a child `python -m jvmkit`, so the tests see exit statuses and output as a user does)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JVMKIT = [sys.executable, "-m", "jvmkit"]
SAMPLES_MODULE = "jvmkit_samples_build"


def load_samples_build():
    """samples/build.py as a module. Loaded by path under its own name: a module called "build"
    on sys.path would shadow PyPA's `build` package."""
    if SAMPLES_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(SAMPLES_MODULE, ROOT / "samples" / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[SAMPLES_MODULE] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[SAMPLES_MODULE]


def build_samples(out: Path, names: list[str] | None = None) -> dict[str, Path]:
    """The sample apps built into `out` with the build JDK's javac: {name: jar}."""
    build = load_samples_build()
    return build.build_samples(out) if names is None else build.build_samples(out, names=names)


def jvmkit(*args, timeout: float, **kw) -> subprocess.CompletedProcess:
    """`jvmkit ARGS...` in a child process, output captured as text, no stdin."""
    return subprocess.run([*JVMKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def pack_image(jar: Path, image: Path, target: str, *extra, timeout: float = 900) -> Path:
    """`jvmkit pack JAR --target TARGET -o IMAGE EXTRA...`; asserts it worked (stderr shown if not)."""
    proc = jvmkit("pack", jar, "--target", target, "-o", image, *extra, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return image


def manifest_for(target: str, written, *, name: str = "img", kernel: dict | None = None):
    """A complete manifest around what a target's writer returned (`BundleFiles`), for tests that
    call the writer without `pack`: the sections pack fills in from the jar, the JDK and the agent
    get small fixed values."""
    from jvmkit.packager import manifest as mf

    return mf.Manifest(
        name=name, target=target, created_by="jvmkit tests",
        app=mf.AppInfo(jar="app.jar", main_class="com.example.Main", class_path=("/app/app.jar",),
                       jar_sha256="0" * 64),
        jdk=mf.JdkInfo(version="17.0.15", release=17, modules=("java.base",), profile={"name": "test"}),
        agent=mf.AgentInfo(path="/jvmkit/agent.jar", key="test"),
        kernel=mf.KernelInfo.from_json(kernel if kernel is not None else {"name": target}),
        command=mf.CommandInfo(java=("/jvm/bin/java",)),
        defaults=mf.Defaults(memory_mib=512, cpus=1),
        files=dict(written.files), boot=written.boot)
