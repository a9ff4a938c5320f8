"""Build-tool integration: the Maven and Gradle samples pack images with jvmkit, the cache-service
sample (the balloon showcase) builds and gives memory back through its shrinker hook.

The builds run offline (`mvn -o`, `gradle --offline`) in copies of the samples under tmp_path, with
the machine's ~/.m2 (the sample's pom takes exec-maven-plugin from Debian's /usr/share/maven-repo:
apt package libexec-maven-plugin-java) and call this checkout's jvmkit through a small wrapper
script. A missing tool skips its tests with the reason, except under CI (CI=true), where .ci/run
must have installed it and the test fails instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support.servers import free_port

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
DEBIAN_EXEC_PLUGIN = Path("/usr/share/maven-repo/org/codehaus/mojo/exec-maven-plugin/3.1.0/exec-maven-plugin-3.1.0.jar")
MAVEN_MAIN = "io.jvmkit.samples.shortener.Shortener"
MAVEN_IMAGE = Path("target/shortener.jvmkit")
GRADLE_MAIN = "io.jvmkit.samples.kvstore.KvStore"
GRADLE_IMAGE = Path("build/kvstore.jvmkit")
BUILD_TIMEOUT = 900


def need(ok, reason: str) -> None:
    """Skip without `ok`; under CI, fail: .ci/run is meant to install everything these tests use."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it in .ci/run)")
    pytest.skip(reason)


def need_maven() -> None:
    need(shutil.which("mvn"), "Maven is not installed (apt-get install -y maven)")
    need(DEBIAN_EXEC_PLUGIN.is_file(),
         f"{DEBIAN_EXEC_PLUGIN} is missing: the Maven sample takes exec-maven-plugin from Debian's "
         "repository offline (apt-get install -y libexec-maven-plugin-java)")


def need_gradle() -> None:
    need(shutil.which("gradle"), "Gradle is not installed (apt-get install -y gradle: Debian's 4.4.1)")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cache_dir(request, tmp_path_factory) -> Path:
    """The session's shared jvmkit cache from conftest (`jvmkit_cache`) if there is one, else ours."""
    try:
        value = request.getfixturevalue("jvmkit_cache") or os.environ.get("JVMKIT_CACHE")
    except pytest.FixtureLookupError:
        value = None
    return Path(value) if value else tmp_path_factory.mktemp("jvmkit-cache")


@pytest.fixture(scope="module")
def build_env(cache_dir) -> dict[str, str]:
    env = dict(os.environ)
    env["JVMKIT_CACHE"] = str(cache_dir)
    env.pop("SOURCE_DATE_EPOCH", None)  # the build files set it
    env.pop("MAVEN_OPTS", None)
    return env


@pytest.fixture(scope="module")
def jvmkit_exe(tmp_path_factory) -> Path:
    """A `jvmkit` that runs this checkout with this interpreter, whatever is on PATH."""
    exe = tmp_path_factory.mktemp("bin") / "jvmkit"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" -m jvmkit "$@"\n')
    exe.chmod(0o755)
    return exe


def copy_sample(name: str, dest: Path) -> Path:
    shutil.copytree(SAMPLES / name, dest, ignore=shutil.ignore_patterns("target", "build", ".gradle"))
    return dest


def mvn(project: Path, env: dict, jvmkit_exe: Path, *args: str) -> subprocess.CompletedProcess:
    argv = ["mvn", "-o", "-q", "-B", f"-Djvmkit.executable={jvmkit_exe}", *args, "package"]
    return subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def read_manifest(image: Path) -> dict:
    return json.loads((image / "manifest.json").read_text())


def file_digests(manifest: dict) -> dict[str, str]:
    return {role: f["sha256"] for role, f in manifest["files"].items()}


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def maven_project(tmp_path_factory, build_env, jvmkit_exe) -> Path:
    """samples/maven-app built once with `mvn -o package` (jar + image)."""
    need_maven()
    project = copy_sample("maven-app", tmp_path_factory.mktemp("mvn") / "maven-app")
    proc = mvn(project, build_env, jvmkit_exe)
    assert proc.returncode == 0, output_of(proc)
    return project



class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def http(method: str, url: str, body: bytes | None = None, timeout: float = 10.0):
    """(status, headers (case-insensitive .get), body) without following redirects."""
    if body is None and method == "POST":
        body = b""
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def wait_healthy(base: str, proc: subprocess.Popen, seconds: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before answering /health\n{log.read_text()[-4000:] if log else ''}")
        try:
            if http("GET", base + "/health", timeout=5)[0] == 200:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    pytest.fail(f"{base}/health did not answer within {seconds:.0f} s ({last})\n{log.read_text()[-4000:] if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def exercise_shortener(base: str) -> None:
    status, headers, body = http("POST", base + "/api/links", b"https://example.org/docs?page=1")
    assert status == 201, body
    code = json.loads(body)["code"]
    status, headers, _ = http("GET", f"{base}/{code}")
    assert status == 302 and headers.get("Location") == "https://example.org/docs?page=1"
    status, _, body = http("GET", f"{base}/api/links/{code}")
    assert status == 200 and json.loads(body)["hits"] == 1
    assert http("POST", base + "/api/links", b"ftp://nope")[0] == 400


# ---------------------------------------------------------------- Maven

def test_maven_offline_build_without_jvmkit_gives_a_reproducible_jar_that_serves(tmp_path, build_env, jvmkit_exe):
    """The offline plugin set alone (jvmkit skipped): the jar is byte-identical across builds and runs."""
    need_maven()
    project = copy_sample("maven-app", tmp_path / "maven-app")
    proc = mvn(project, build_env, jvmkit_exe, "-Djvmkit.skip=true")
    assert proc.returncode == 0, output_of(proc)
    jar = project / "target" / "shortener.jar"
    first = hashlib.sha256(jar.read_bytes()).hexdigest()
    shutil.rmtree(project / "target")
    proc = mvn(project, build_env, jvmkit_exe, "-Djvmkit.skip=true")
    assert proc.returncode == 0, output_of(proc)
    assert hashlib.sha256(jar.read_bytes()).hexdigest() == first, "the jar is not reproducible"
    assert not (project / MAVEN_IMAGE).exists()

    port = free_port()
    log = tmp_path / "app.log"
    with log.open("w") as out:
        app = subprocess.Popen(["java", "-jar", str(jar), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, app, 30, log)
        exercise_shortener(base)
        assert http("POST", base + "/shutdown")[0] == 200
        assert app.wait(15) == 0, log.read_text()
    finally:
        stop(app)


def test_maven_package_builds_an_image(maven_project):
    image = maven_project / MAVEN_IMAGE
    assert (image / "manifest.json").is_file(), sorted(p.name for p in (maven_project / "target").iterdir())
    manifest = read_manifest(image)
    assert manifest["target"] == "linux"
    assert manifest["app"]["main_class"] == MAVEN_MAIN
    assert manifest["defaults"]["memory_mib"] == 256
    assert "jdk.httpserver" in manifest["jdk"]["modules"]


def test_maven_image_is_reproducible(maven_project, build_env, jvmkit_exe, tmp_path):
    image = maven_project / MAVEN_IMAGE
    first_files, first_tree = file_digests(read_manifest(image)), tree_digest(image)

    # the same checkout, built again from scratch
    shutil.rmtree(maven_project / "target")
    proc = mvn(maven_project, build_env, jvmkit_exe)
    assert proc.returncode == 0, output_of(proc)
    assert file_digests(read_manifest(image)) == first_files
    assert tree_digest(image) == first_tree, "two `mvn -o package` runs gave different image bytes"

    # another checkout of the same sources (another path): the same image
    other = copy_sample("maven-app", tmp_path / "elsewhere" / "maven-app")
    proc = mvn(other, build_env, jvmkit_exe)
    assert proc.returncode == 0, output_of(proc)
    assert file_digests(read_manifest(other / MAVEN_IMAGE)) == first_files
    assert tree_digest(other / MAVEN_IMAGE) == first_tree, "the image depends on the checkout's path"


def test_maven_build_fails_on_a_broken_jvmkit_toml(tmp_path, build_env, jvmkit_exe):
    need_maven()
    project = copy_sample("maven-app", tmp_path / "maven-app")
    config = project / "jvmkit.toml"
    lines = config.read_text().splitlines()
    lines.insert(4, 'colour = "blue"')  # an unknown key on line 5
    config.write_text("\n".join(lines) + "\n")
    proc = mvn(project, build_env, jvmkit_exe)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, output_of(proc)
    assert f"{config}:5" in out and "colour" in out, output_of(proc)
    assert not (project / MAVEN_IMAGE).exists()


@pytest.mark.vm
def test_maven_image_boots_and_serves_on_a_published_port(maven_project, build_env, jvmkit_exe, tmp_path):
    need(shutil.which("qemu-system-x86_64"), "QEMU is not installed (apt-get install -y qemu-system-x86)")
    port = free_port()
    log = tmp_path / "run.log"
    with log.open("w") as out:
        vm = subprocess.Popen([str(jvmkit_exe), "run", str(maven_project / MAVEN_IMAGE), "--publish", f"{port}:8080"],
                              stdout=out, stderr=subprocess.STDOUT, env=build_env, stdin=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, vm, 180, log)
        exercise_shortener(base)
        assert http("POST", base + "/shutdown")[0] == 200
        assert vm.wait(60) == 0, log.read_text()[-4000:]
        assert "shortener stopped" in log.read_text()
    finally:
        stop(vm)


# ---------------------------------------------------------------- Gradle

def test_gradle_build_builds_an_image(tmp_path, build_env, jvmkit_exe):
    need_gradle()
    project = copy_sample("gradle-app", tmp_path / "gradle-app")
    argv = ["gradle", "--offline", "--no-daemon", "-q", "build", f"-Pjvmkit.executable={jvmkit_exe}"]
    env = {**build_env, "GRADLE_USER_HOME": str(tmp_path / "gradle-home")}
    proc = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, output_of(proc)
    manifest = read_manifest(project / GRADLE_IMAGE)
    assert manifest["target"] == "linux"
    assert manifest["app"]["main_class"] == GRADLE_MAIN


# ---------------------------------------------------------------- cache-service (balloon showcase)

@pytest.fixture(scope="module")
def cache_service(tmp_path_factory, build_env, monkeypatch_module):
    need(shutil.which("javac"), "no javac (apt-get install -y openjdk-17-jdk-headless)")
    monkeypatch_module.setenv("JVMKIT_CACHE", build_env["JVMKIT_CACHE"])
    cache_build = load_module(SAMPLES / "cache-service" / "build.py")
    cache_load = load_module(SAMPLES / "cache-service" / "load.py")
    built = cache_build.build_cache_service(tmp_path_factory.mktemp("cache-service"))
    return built, cache_load


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"cache_service_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def start_cache_service(argv: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([*argv, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc, 30, log)
    return proc, base


def test_cache_service_hook_gives_memory_back_on_the_host(cache_service, tmp_path):
    built, _ = cache_service
    argv = ["java", "-Xmx256m", "-javaagent:" + str(built["agent_jar"]), "-jar", str(built["jar"])]
    proc, base = start_cache_service(argv, tmp_path / "svc.log")
    try:
        stats = json.loads(http("POST", base + "/fill?mb=32&item_kb=256")[2])
        assert stats["hook"] is True and stats["cache_bytes"] == 32 << 20
        assert http("GET", base + "/item/k1?kb=16")[1].get("X-Cache") == "miss"
        assert http("GET", base + "/item/k1?kb=16")[1].get("X-Cache") == "hit"
        status, _, body = http("POST", base + "/shrink?mb=10")  # what the agent does on a balloon shrink
        report = json.loads(body)
        assert status == 200 and report["released"] >= 10 << 20, report
        assert "cache-service=" in report["summary"]
        stats = json.loads(http("GET", base + "/stats")[2])
        assert stats["shrinks"] == 1 and stats["shrink_released_bytes"] == report["released"]
        assert stats["cache_bytes"] == (32 << 20) + (16 << 10) - report["released"]
        assert http("GET", base + "/item/k1")[1].get("X-Cache") == "hit", "the most recently used item was evicted"
        assert http("POST", base + "/shutdown")[0] == 200
        assert proc.wait(15) == 0
    finally:
        stop(proc)


def test_cache_service_runs_without_the_api_and_the_load_script_drives_it(cache_service, tmp_path):
    built, load = cache_service
    proc, base = start_cache_service(["java", "-Xmx256m", "-jar", str(built["jar"])], tmp_path / "svc.log")
    try:
        assert json.loads(http("GET", base + "/stats")[2])["hook"] is False
        assert http("POST", base + "/shrink?mb=1")[0] == 409
        plan = load.LoadPlan(url=base, fill_mb=8, chunk_mb=4, item_kb=512, reads=4, idle=1.0, sample=0.5,
                             deadline=60, shutdown=True)
        lines: list[str] = []
        samples = load.run_load(plan, echo=lines.append)
        phases = [s["phase"] for s in samples]
        assert phases[0] == "start" and "idle" in phases and phases[-1] == "fill2"
        assert samples[-1]["cache_bytes"] > [s for s in samples if s["phase"] == "idle"][-1]["cache_bytes"]
        assert proc.wait(15) == 0
    finally:
        stop(proc)
    with pytest.raises(load.LoadError, match="loopback"):
        load.check_loopback("http://192.0.2.1:8080")
