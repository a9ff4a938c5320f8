"""Real Debian jars whose manifest Class-Path is absolute, fetched through jvmkit's own Debian code.

Debian's libbase-java ships /usr/share/java/libbase.jar with `Class-Path:
/usr/share/java/commons-logging.jar` (libcommons-logging-java), whose own Class-Path names three
jars by relative path that are only Suggested (avalon-framework.jar, excalibur-logkit.jar,
log4j-1.2.jar), so they are missing on a normal host. Both packages are small (~180 KiB). They are
taken from the configured Debian mirror with `debian.open_archive` / `fetch_deb` (verified against
the signed index, cached in the test cache, so JVMKIT_TEST_CACHE keeps them between runs) and
unpacked with `debian.extract_deb` into a temporary root.

Tests must not install packages, yet the entries must be real absolute paths. So the tests that
need /usr/share/java/... to be the Debian files run their command in a private mount namespace
(`unshare --mount --map-root-user`) in which the unpacked usr/share/java is bind-mounted over
/usr/share/java: the host's own /usr/share/java is never written, and other processes never see
the mount. The host's `java -jar` is run there too, as the oracle. Without unshare (no user
namespaces) those tests skip; one test runs on the host as it is, where the answer depends on
whether the host has libcommons-logging-java installed, and checks the branch it finds.

Network: these run wherever the configured Debian mirror answers (CI's does: its linux VM tests
pull their kernel from it too), and skip with the reason when the archive can't be reached.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support.images import load_samples_build as _load_samples_build
from jvmkit import jdk as jdks
from jvmkit import ui
from jvmkit.errors import JvmkitError
from jvmkit.packager import jar as jars

build = _load_samples_build()

pytestmark = [pytest.mark.network]

PACKAGES = ("libbase-java", "libcommons-logging-java")
SHARE = "/usr/share/java"
LIBBASE = f"{SHARE}/libbase.jar"
LOGGING = f"{SHARE}/commons-logging.jar"
OPTIONAL = ("avalon-framework.jar", "excalibur-logkit.jar", "log4j-1.2.jar")
JVMKIT = [sys.executable, "-m", "jvmkit"]

MAIN = """package t;
public class Main {
  static String where(Class<?> c) { return String.valueOf(c.getProtectionDomain().getCodeSource().getLocation()); }
  public static void main(String[] args) {
    Class<?> info = org.pentaho.reporting.libraries.base.LibBaseInfo.class;
    System.out.println("libbase: " + info.getSimpleName() + " @ " + where(info));
    Object log = org.apache.commons.logging.LogFactory.getLog("t");
    System.out.println("commons-logging: " + log.getClass().getName() + " @ "
        + where(org.apache.commons.logging.LogFactory.class));
  }
}
"""


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory) -> Path:
    from jvmkit.packager import debian

    try:
        archive = debian.open_archive(want=lambda name: name in PACKAGES)
        root = tmp_path_factory.mktemp("debian-root")
        for name in PACKAGES:
            pkg = archive.newest(name)
            if pkg is None:
                pytest.skip(f"{name} is not in Debian {archive.suite} at the configured mirror")
            debian.extract_deb(debian.fetch_deb(pkg), root)
    except JvmkitError as exc:  # ArchiveUnavailable, MirrorUnreachable, a failed download
        pytest.skip(f"Debian's archive cannot be reached: {exc}")
    return root


@pytest.fixture(scope="module")
def main_jar(debian_root, tmp_path_factory) -> Path:
    """A tiny app whose Class-Path names libbase.jar by its Debian path, and which uses a class of
    commons-logging.jar, which only libbase.jar's own (absolute) Class-Path brings in."""
    work = tmp_path_factory.mktemp("debian-app")
    src = work / "src" / "t" / "Main.java"
    src.parent.mkdir(parents=True)
    src.write_text(MAIN)
    share = debian_root / SHARE.lstrip("/")
    proc = subprocess.run([str(build.find_javac()), "--release", "11", "-d", str(work / "classes"),
                           "-cp", f"{share}/libbase.jar:{share}/commons-logging.jar", str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return build.write_jar(work / "main.jar", [work / "classes"],
                           {"Manifest-Version": "1.0", "Main-Class": "t.Main", "Class-Path": LIBBASE})


def in_debian_namespace(debian_root: Path, argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run argv where /usr/share/java is the unpacked Debian tree (a private mount namespace)."""
    if shutil.which("unshare") is None or not Path(SHARE).is_dir():
        pytest.skip(f"needs util-linux unshare and an existing {SHARE} to mount the Debian tree over")
    script = 'mount --bind "$1" "$2" || exit 97; shift 2; exec "$@"'
    cmd = ["unshare", "--mount", "--map-root-user", "--propagation", "private", "sh", "-c", script, "sh",
           str(debian_root / SHARE.lstrip("/")), SHARE, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode == 97 or "unshare failed" in proc.stderr:
        pytest.skip(f"no private mount namespace here: {proc.stderr.strip()[-200:]}")
    return proc


ANALYZE = """import json, sys
from pathlib import Path
from jvmkit import jdk
from jvmkit.packager import jar
app = jar.analyze(Path(sys.argv[1]), jdk=jdk.find_jdk(None), strict_class_path=sys.argv[2] == "strict")
print(json.dumps({"class_path": [str(p) for p in app.class_path], "guest": list(app.guest_class_path),
                  "modules": list(app.jdeps_modules), "files": [[g, str(h)] for g, h in app.files]}))
"""


def test_the_debian_jar_names_its_dependency_by_absolute_path(debian_root):
    """The premise: Debian's libbase.jar really has an absolute Class-Path."""
    info = jars.read_jar(debian_root / LIBBASE.lstrip("/"))
    assert jars.manifest_value(info.manifest, "Class-Path") == LOGGING
    logging = jars.read_jar(debian_root / LOGGING.lstrip("/"))
    assert jars.class_path_tokens(jars.manifest_value(logging.manifest, "Class-Path")) == list(OPTIONAL)


def test_debian_jars_at_their_real_paths(debian_root, main_jar):
    """/usr/share/java/libbase.jar -> /usr/share/java/commons-logging.jar -> 3 missing: the host
    JVM and jvmkit's analysis resolve the same chain."""
    oracle = in_debian_namespace(debian_root, ["java", "-jar", str(main_jar)], timeout=120)
    assert oracle.returncode == 0, oracle.stderr
    assert oracle.stdout.splitlines() == [
        f"libbase: LibBaseInfo @ file:{LIBBASE}",
        f"commons-logging: org.apache.commons.logging.impl.Jdk14Logger @ file:{LOGGING}"]

    proc = in_debian_namespace(debian_root, [sys.executable, "-c", ANALYZE, str(main_jar), "lenient"])
    assert proc.returncode == 0, proc.stderr
    app = json.loads(proc.stdout)
    assert app["class_path"] == [str(main_jar), LIBBASE, LOGGING]
    assert app["guest"] == ["/app/app.jar", f"/app/lib/host{LIBBASE}", f"/app/lib/host{LOGGING}"]
    # libbase uses java.sql and java.desktop, commons-logging java.logging: jdeps saw both jars
    assert {"java.sql", "java.desktop", "java.logging"} <= set(app["modules"])
    warned = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warned) == 1, proc.stderr
    assert f"3 Class-Path entries of {LOGGING}" in warned[0]
    assert all(f"'{name}' ({SHARE}/{name} does not exist)" in warned[0] for name in OPTIONAL)

    strict = in_debian_namespace(debian_root, [sys.executable, "-c", ANALYZE, str(main_jar), "strict"])
    assert strict.returncode != 0 and "UsageError" in strict.stderr
    assert f"'avalon-framework.jar' of {LOGGING} is missing" in strict.stderr


def test_debian_jar_outside_usr_share_java(debian_root, main_jar, tmp_path, monkeypatch):
    """On the host as it is: a main jar naming the unpacked libbase.jar by its (absolute) path
    under the test's directory. libbase.jar's own entry then names the host's
    /usr/share/java/commons-logging.jar, which is taken in if this host has it, else skipped with
    one warning."""
    unpacked = debian_root / LIBBASE.lstrip("/")
    app_jar = tmp_path / "main.jar"
    with zipfile.ZipFile(main_jar) as zf:
        main_class = zf.read("t/Main.class")
    classes = tmp_path / "classes" / "t"
    classes.mkdir(parents=True)
    (classes / "Main.class").write_bytes(main_class)
    build.write_jar(app_jar, [tmp_path / "classes"], {"Manifest-Version": "1.0", "Main-Class": "t.Main",
                                                       "Class-Path": str(unpacked)})
    stream = io.StringIO()
    monkeypatch.setattr(ui, "_current", ui.Console(stream=stream))
    app = jars.analyze(app_jar, jdk=jdks.find_jdk(None))
    assert app.class_path[1] == unpacked and app.guest_class_path[1] == f"/app/lib/host{unpacked}"
    assert {"java.sql", "java.desktop"} <= set(app.jdeps_modules)
    if Path(LOGGING).exists():  # the host has libcommons-logging-java: its jar is taken in
        assert app.class_path[2:] == (Path(LOGGING),) and app.guest_class_path[2] == f"/app/lib/host{LOGGING}"
        assert "java.logging" in app.jdeps_modules
    else:
        assert len(app.class_path) == 2
        assert f"skipping Class-Path entry '{LOGGING}' of {unpacked}" in stream.getvalue()


@pytest.mark.vm
def test_debian_app_packed_and_run_in_a_linux_guest(debian_root, main_jar, tmp_path):
    """Packed where /usr/share/java is the Debian tree, run on the host as it is: the guest loads
    both Debian jars from the image."""
    image = tmp_path / "debian-app.jvmkit"
    packed = in_debian_namespace(debian_root, [*JVMKIT, "pack", str(main_jar), "--target", "linux",
                                               "-o", str(image), "--memory", "384M"])
    assert packed.returncode == 0, packed.stderr
    run = subprocess.run([*JVMKIT, "run", str(image)], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        f"libbase: LibBaseInfo @ file:/app/lib/host{LIBBASE}",
        f"commons-logging: org.apache.commons.logging.impl.Jdk14Logger @ file:/app/lib/host{LOGGING}"]
