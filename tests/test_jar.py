"""Jar analysis (jvmkit.packager.jar) and finding the build JDK (jvmkit.jdk).

Pure parts (manifest, class path, module sets, jdeps output) are tested on literals; analysis runs
the real jdeps of the build JDK over the samples and over small jars made here from their classes.
"""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from jvmkit import jdk as jdks
from jvmkit import ui
from jvmkit.errors import JvmkitError, UsageError
from jvmkit.packager import jar as jars

import classpath_apps
from support.images import load_samples_build

build = load_samples_build()


@pytest.fixture(scope="module")
def jdk() -> jdks.Jdk:
    try:
        found = jdks.find_jdk(None)
    except JvmkitError as exc:
        pytest.skip(f"no build JDK: {exc}")
    if found.is_jre or found.jmods is None:
        pytest.skip(f"the build JDK at {found.home} has no jmods/jdeps")
    return found


@pytest.fixture(scope="module")
def hello_class(samples) -> bytes:
    with zipfile.ZipFile(samples["hello"]) as zf:
        return zf.read("hello/Hello.class")


def make_jar(path: Path, entries: dict[str, bytes], manifest: dict[str, str] | bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        if manifest is not None:
            data = manifest if isinstance(manifest, bytes) else build.manifest_bytes({"Manifest-Version": "1.0", **manifest})
            zf.writestr("META-INF/MANIFEST.MF", data)
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def analyze(jar: Path, jdk, **kw) -> jars.AppSpec:
    kw.setdefault("libs", [])
    kw.setdefault("add_modules", [])
    kw.setdefault("jvm_args", [])
    kw.setdefault("app_args", [])
    return jars.analyze(jar, main=kw.pop("main", None), jdk=jdk, **kw)


# --- manifest (pure) -----------------------------------------------------------------------------

def test_manifest_continuation_lines_and_line_ends():
    data = (b"Manifest-Version: 1.0\r\n"
            b"Main-Class: com.example.Ma\r\n in\r\n"
            b"Class-Path: lib/a.jar \n lib/b.j\n ar\n  lib/c.jar\r"
            b"multi-release: true\r\n"
            b"\r\n"
            b"Name: com/example/\r\nMain-Class: not.the.main.Section\r\n")
    m = jars.parse_manifest(data)
    assert jars.manifest_value(m, "Main-Class") == "com.example.Main"
    # a continuation line's first space is dropped, the rest of the line is kept
    assert jars.parse_class_path(jars.manifest_value(m, "Class-Path")) == ["lib/a.jar", "lib/b.jar", "lib/c.jar"]
    assert jars.manifest_value(m, "Multi-Release") == "true"
    assert "Name" not in m  # only the main section


def test_manifest_continuation_splitting_a_utf8_sequence():
    value = "x" * 49 + "é" * 10
    line = f"Implementation-Title: {value}".encode()
    raw = line[:72] + b"\r\n " + line[72:] + b"\r\n\r\n"
    assert (line[72] & 0xC0) == 0x80  # the cut lands inside an "é"
    assert jars.parse_manifest(raw)["Implementation-Title"] == value


def test_manifest_writer_wraps_at_72_bytes_and_round_trips():
    entries = " ".join(f"lib/some-rather-long-library-name-{i}.jar" for i in range(8))
    attrs = {"Manifest-Version": "1.0", "Main-Class": "a.B", "Class-Path": entries, "Title": "Zürich " * 20}
    data = build.manifest_bytes(attrs)
    assert all(len(line) <= 72 for line in data.split(b"\r\n"))
    parsed = jars.parse_manifest(data)
    assert parsed == {k: v.strip() for k, v in attrs.items()}


def test_class_path_entries_are_url_decoded():
    assert jars.parse_class_path("  lib/my%20lib.jar   other.jar ") == ["lib/my lib.jar", "other.jar"]
    assert jars.parse_class_path(None) == []


def test_modular_jar_detection():
    assert jars.is_modular({"module-info.class", "a/B.class"})
    assert jars.is_modular({"META-INF/versions/11/module-info.class", "a/B.class"})
    assert not jars.is_modular({"a/module-info.class", "a/B.class", "META-INF/versions/x/module-info.class"})


def test_manifest_jvm_flags():
    flags = jars.manifest_jvm_flags(("java.base/java.lang",), ("java.base/sun.nio.ch",), True, 22)
    assert flags == ("--add-opens=java.base/java.lang=ALL-UNNAMED", "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
                     "--enable-native-access=ALL-UNNAMED")
    assert jars.manifest_jvm_flags((), (), True, 21) == ()


def test_class_file_release():
    assert jars.class_file_release(b"\xca\xfe\xba\xbe\x00\x00\x00\x3d") == 17
    assert jars.class_file_release(b"\xca\xfe\xba\xbe\x00\x00\x00\x45") == 25
    assert jars.class_file_release(b"PK\x03\x04....") is None


# --- module sets (pure) ---------------------------------------------------------------------------

def test_parse_module_deps_both_forms():
    assert jars.parse_module_deps("java.base,java.logging,java.xml\n") == ["java.base", "java.logging", "java.xml"]
    summary = ("app.jar -> java.base\napp.jar -> java.xml\napp.jar -> lib/textutil.jar\napp.jar -> helper.jar\n"
               "app.jar -> not found\ntextutil.jar -> java.logging\nm -> some.library.module\n"
               "Warning: split package: x\n")
    assert jars.parse_module_deps(summary) == ["java.base", "java.logging", "java.xml", "some.library.module"]
    known = {"java.base", "java.logging", "java.xml"}
    assert jars.parse_module_deps(summary, known) == ["java.base", "java.logging", "java.xml"]
    assert jars.parse_module_deps("") == []


def test_required_modules():
    got = jars.required_modules(["java.xml", "java.base"], ["jdk.httpserver,java.sql", "java.sql"],
                                ["java.instrument", "java.management"], [])
    assert got == ("java.base", "java.instrument", "java.management", "java.sql", "java.xml", "jdk.httpserver")
    assert jars.required_modules((), (), (), ()) == ("java.base",)


def test_unknown_add_module_suggests_close_matches():
    with pytest.raises(UsageError) as err:
        jars.check_add_modules(["java.sql,java.loging"], ["java.base", "java.logging", "java.sql"], "/jdk")
    assert "java.loging" in str(err.value) and "did you mean java.logging" in str(err.value)
    assert jars.check_add_modules(["java.sql,java.base", "java.sql"], ["java.base", "java.sql"]) == ["java.sql", "java.base"]


def test_jdeps_command_and_failure_text():
    cmd = jars.jdeps_command("/jdk/bin/jdeps", [Path("app.jar"), Path("lib/a.jar"), Path("lib/b.jar")], 17)
    assert cmd[0] == "/jdk/bin/jdeps" and "-s" in cmd and "-q" in cmd
    assert cmd[cmd.index("--multi-release") + 1] == "17"
    assert cmd[cmd.index("--class-path") + 1] == "lib/a.jar:lib/b.jar"
    assert cmd[-3:] == ["app.jar", "lib/a.jar", "lib/b.jar"]
    assert "--class-path" not in jars.jdeps_command("jdeps", [Path("app.jar")], 17)
    trace = ('Exception in thread "main" java.io.UncheckedIOException: java.util.zip.ZipException: bad\n'
             "\tat jdk.jdeps/com.sun.tools.jdeps.Archive.getInstance(Archive.java:55)\n"
             "Caused by: java.util.zip.ZipException: zip END header not found\n\t... 5 more\n")
    assert jars.explain_jdeps_failure(trace) == "ZipException: zip END header not found"
    assert jars.explain_jdeps_failure("Warning: x\nError: app.jar is a multi-release jar file but\n") == \
        "app.jar is a multi-release jar file but"


# --- analysis of the samples (real jdeps) ---------------------------------------------------------

def test_hello_needs_only_java_base(samples, jdk):
    app = analyze(samples["hello"], jdk)
    assert app.main_class == "hello.Hello" and app.main_class_source == "manifest"
    assert app.jdeps_modules == ("java.base",)
    assert app.class_path == (samples["hello"],) and app.guest_class_path == ("/app/app.jar",)
    assert not app.modular and not app.multi_release and app.manifest_jvm_flags == ()


def test_httpd_needs_jdk_httpserver(samples, jdk):
    assert analyze(samples["httpd"], jdk).jdeps_modules == ("java.base", "jdk.httpserver")


def test_multijar_class_path_and_modules(samples, jdk):
    app = analyze(samples["multijar"], jdk, jvm_args=["-Xss1m"], app_args=["--top", "2"],
                  add_modules=["jdk.crypto.ec"])
    lib = samples["multijar"].parent / "lib"
    assert app.main_class == "multijar.App"
    assert app.class_path == (samples["multijar"], lib / "textutil.jar", lib / "jsonish.jar")
    assert app.guest_class_path == ("/app/app.jar", "/app/lib/textutil.jar", "/app/lib/jsonish.jar")
    # java.xml comes from the app jar, java.logging only from lib/textutil.jar
    assert app.jdeps_modules == ("java.base", "java.logging", "java.xml")
    assert app.add_modules == ("jdk.crypto.ec",) and app.jvm_args == ("-Xss1m",) and app.app_args == ("--top", "2")
    d = app.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert str(samples["multijar"].parent) not in json.dumps(d)  # no host paths in manifest.json
    assert d["class_path"] == list(app.guest_class_path) and d["jar"] == "app.jar"


def test_lib_jars_go_to_app_lib(samples, jdk, tmp_path):
    lib = samples["multijar"].parent / "lib"
    app = analyze(samples["hello"], jdk, libs=[lib / "textutil.jar"])
    assert app.guest_class_path == ("/app/app.jar", "/app/lib/textutil.jar")
    assert app.jdeps_modules == ("java.base", "java.logging")
    # a --lib already on the Class-Path is not listed twice
    again = analyze(samples["multijar"], jdk, libs=[lib / "jsonish.jar"])
    assert again.guest_class_path == ("/app/app.jar", "/app/lib/textutil.jar", "/app/lib/jsonish.jar")
    # two different jars with the same name would clash in /app/lib
    other = make_jar(tmp_path / "other" / "textutil.jar", {"x/Y.class": b""})
    with pytest.raises(UsageError, match="both be /app/lib/textutil.jar"):
        analyze(samples["multijar"], jdk, libs=[other])


def test_main_override_and_main_in_class_path(samples, jdk, tmp_path, hello_class):
    app = analyze(samples["multijar"], jdk, main="textutil/Csv.class")  # any class of the class path is fine
    assert app.main_class == "textutil.Csv" and app.main_class_source == "--main"
    bare = make_jar(tmp_path / "bare.jar", {"hello/Hello.class": hello_class})  # no manifest at all
    assert analyze(bare, jdk, main="hello.Hello").main_class == "hello.Hello"


def test_transitive_class_path(tmp_path, jdk, hello_class):
    make_jar(tmp_path / "lib" / "b.jar", {"b/B.class": hello_class})
    make_jar(tmp_path / "lib" / "a.jar", {"a/A.class": hello_class},
             {"Class-Path": "b.jar gone.jar"})  # a library's missing entry is skipped, as the JVM does
    app_jar = make_jar(tmp_path / "app.jar", {"hello/Hello.class": hello_class},
                       {"Main-Class": "hello.Hello", "Class-Path": "lib/a.jar"})
    app = analyze(app_jar, jdk)
    assert app.guest_class_path == ("/app/app.jar", "/app/lib/a.jar", "/app/lib/b.jar")
    assert app.class_path[2] == tmp_path / "lib" / "b.jar"


def test_manifest_attributes_become_flags_and_modules(tmp_path, jdk, hello_class):
    jar = make_jar(tmp_path / "attrs.jar", {"hello/Hello.class": hello_class}, {
        "Main-Class": "hello.Hello",
        "Add-Opens": "java.base/java.lang jdk.unsupported/sun.misc java.base/java.lang",
        "Add-Exports": "java.base/sun.nio.ch",
        "Launcher-Agent-Class": "hello.Hello",
        "Enable-Native-Access": "ALL-UNNAMED",
        "Implementation-Title": "a title long enough to need a continuation line in the manifest " * 2,
    })
    app = analyze(jar, jdk)
    assert app.add_opens == ("java.base/java.lang", "jdk.unsupported/sun.misc")
    assert app.add_exports == ("java.base/sun.nio.ch",)
    assert app.launcher_agent == "hello.Hello"
    assert app.manifest_jvm_flags[:3] == ("--add-opens=java.base/java.lang=ALL-UNNAMED",
                                          "--add-opens=jdk.unsupported/sun.misc=ALL-UNNAMED",
                                          "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED")
    assert ("--enable-native-access=ALL-UNNAMED" in app.manifest_jvm_flags) == (jdk.release >= 22)
    assert {"jdk.unsupported", "java.instrument"} <= set(app.jdeps_modules)


def test_multi_release_main_class(tmp_path, jdk, hello_class):
    versioned = {"META-INF/versions/11/hello/Hello.class": hello_class}
    mr = make_jar(tmp_path / "mr.jar", versioned, {"Main-Class": "hello.Hello", "Multi-Release": "true"})
    app = analyze(mr, jdk)
    assert app.multi_release and app.jdeps_modules == ("java.base",)
    plain = make_jar(tmp_path / "plain.jar", versioned, {"Main-Class": "hello.Hello"})
    with pytest.raises(UsageError, match="no hello/Hello.class in plain.jar"):
        analyze(plain, jdk)


def test_modular_jar_is_detected(tmp_path, jdk, hello_class):
    jar = make_jar(tmp_path / "mod.jar", {"hello/Hello.class": hello_class,
                                          "META-INF/versions/11/module-info.class": b"\xca\xfe\xba\xbe"},
                   {"Main-Class": "hello.Hello", "Multi-Release": "true"})
    info = jars.read_jar(jar)
    assert info.modular and info.multi_release


# --- bad inputs: one line naming the input ------------------------------------------------------------

def test_not_a_file(tmp_path, jdk):
    with pytest.raises(UsageError) as err:
        analyze(tmp_path / "nope.jar", jdk)
    assert "nope.jar" in str(err.value) and "no such file" in str(err.value)
    with pytest.raises(UsageError, match="is not a file"):
        analyze(tmp_path, jdk)


def test_not_a_zip(tmp_path, jdk):
    bad = tmp_path / "bad.jar"
    bad.write_text("this is not a zip\n")
    with pytest.raises(UsageError) as err:
        analyze(bad, jdk)
    assert str(bad) in str(err.value) and "not a zip" in str(err.value)


def test_no_manifest_or_no_main_class(tmp_path, jdk, hello_class):
    bare = make_jar(tmp_path / "bare.jar", {"hello/Hello.class": hello_class})
    with pytest.raises(UsageError) as err:
        analyze(bare, jdk)
    assert "bare.jar has no manifest" in str(err.value) and "--main" in str(err.value)
    nomain = make_jar(tmp_path / "nomain.jar", {"hello/Hello.class": hello_class}, {"Created-By": "test"})
    with pytest.raises(UsageError) as err:
        analyze(nomain, jdk)
    assert "nomain.jar has no Main-Class" in str(err.value) and "--main" in str(err.value)


def test_main_class_not_in_jar(samples, jdk, tmp_path, hello_class):
    with pytest.raises(UsageError) as err:
        analyze(samples["hello"], jdk, main="hello.Nope")
    assert "--main hello.Nope" in str(err.value) and "hello/Nope.class" in str(err.value)
    with pytest.raises(UsageError, match="not a Java class name"):
        analyze(samples["hello"], jdk, main="hello Hello")
    wrong = make_jar(tmp_path / "wrong.jar", {"hello/Hello.class": hello_class}, {"Main-Class": "hello.Missing"})
    with pytest.raises(UsageError) as err:
        analyze(wrong, jdk)
    assert "Main-Class hello.Missing" in str(err.value) and "wrong.jar" in str(err.value)


def test_class_path_jar_missing(tmp_path, jdk, hello_class):
    jar = make_jar(tmp_path / "app.jar", {"hello/Hello.class": hello_class},
                   {"Main-Class": "hello.Hello", "Class-Path": "lib/there.jar lib/missing.jar"})
    make_jar(tmp_path / "lib" / "there.jar", {"x/X.class": hello_class})
    with pytest.raises(UsageError) as err:
        analyze(jar, jdk)
    msg = str(err.value)
    assert "'lib/missing.jar'" in msg and str(jar) in msg and "does not exist" in msg


def test_class_path_entries_that_cannot_be_placed(tmp_path, jdk, hello_class):
    """A relative entry that leaves the jar's directory stays refused, as before. (Absolute
    entries, file: URLs and directories are placed now: see the Class-Path tests below.)"""
    jar = make_jar(tmp_path / "sub" / "app.jar", {"hello/Hello.class": hello_class},
                   {"Main-Class": "hello.Hello", "Class-Path": "../up.jar"})
    with pytest.raises(UsageError, match="outside the jar's directory") as err:
        analyze(jar, jdk)
    assert "../up.jar" in str(err.value)


def test_class_path_jar_not_a_zip(tmp_path, jdk, hello_class):
    jar = make_jar(tmp_path / "app.jar", {"hello/Hello.class": hello_class},
                   {"Main-Class": "hello.Hello", "Class-Path": "lib.jar"})
    (tmp_path / "lib.jar").write_text("nope")
    with pytest.raises(UsageError, match=r"lib\.jar.*not a jar"):
        analyze(jar, jdk)
    with pytest.raises(UsageError, match="--lib .*nothere.jar: no such file"):
        analyze(make_jar(tmp_path / "ok.jar", {"hello/Hello.class": hello_class}, {"Main-Class": "hello.Hello"}),
                jdk, libs=[tmp_path / "nothere.jar"])


def test_unknown_add_module(samples, jdk):
    with pytest.raises(UsageError) as err:
        analyze(samples["hello"], jdk, add_modules=["java.sql,jdk.httpserverr"])
    assert "'jdk.httpserverr'" in str(err.value) and "did you mean jdk.httpserver" in str(err.value)


def test_class_files_newer_than_the_jdk(tmp_path, jdk, hello_class):
    newer = bytearray(hello_class)
    newer[6:8] = (jdk.release + 44 + 3).to_bytes(2, "big")
    jar = make_jar(tmp_path / "new.jar", {"hello/Hello.class": bytes(newer)}, {"Main-Class": "hello.Hello"})
    with pytest.raises(JvmkitError) as err:
        analyze(jar, jdk)
    assert f"needs Java {jdk.release + 3}" in str(err.value) and "--jdk" in str(err.value)


def test_jdeps_failure_is_one_line(tmp_path, jdk, hello_class, monkeypatch):
    jar = make_jar(tmp_path / "ok.jar", {"hello/Hello.class": hello_class}, {"Main-Class": "hello.Hello"})
    fake = tmp_path / "jdeps"
    fake.write_text("#!/bin/sh\necho 'Warning: something' >&2\necho 'Error: cannot analyse that' >&2\nexit 1\n")
    fake.chmod(0o755)
    import dataclasses

    broken = dataclasses.replace(jdk, jdeps=fake)
    with pytest.raises(JvmkitError) as err:
        analyze(jar, broken)
    assert str(err.value).startswith(f"jdeps failed on {jar}: cannot analyse that")
    assert "\n" not in str(err.value)


# --- Class-Path as the JVM reads it: absolute paths, file: URLs, directories ----------------------

@pytest.fixture
def console(monkeypatch) -> io.StringIO:
    """What jvmkit prints (warnings) during the test."""
    stream = io.StringIO()
    monkeypatch.setattr(ui, "_current", ui.Console(stream=stream))
    return stream


def warnings_of(console: io.StringIO) -> list[str]:
    return [line for line in console.getvalue().splitlines() if line.startswith("jvmkit: warning:")]


def test_class_path_entry_forms():
    e = jars.parse_entry
    assert e("lib/a.jar") == jars.Entry("lib/a.jar", "relative", "lib/a.jar")
    assert e("file:lib/my%20a.jar").kind == "relative" and e("file:lib/my%20a.jar").path == "lib/my a.jar"
    for raw in ("/usr/share/java/a.jar", "file:/usr/share/java/a.jar", "file:///usr/share/java/a.jar",
                "FILE://localhost/usr/share/java/a.jar", "/usr/share/java/../java/./a.jar"):
        assert (e(raw).kind, e(raw).path) == ("absolute", "/usr/share/java/a.jar"), raw
    assert e("file:/opt/my%20libs/a%25b.jar").path == "/opt/my libs/a%b.jar"
    assert e("a%3Ab.jar") == jars.Entry("a%3Ab.jar", "relative", "a:b.jar")  # the scheme is read before decoding
    assert e("classes/").directory and e("file:/opt/classes/").directory and not e("classes").directory
    assert e("/opt/classes/").path == "/opt/classes"
    for raw in ("http://example.org/a.jar", "jar:file:/a.jar!/", "file://elsewhere/a.jar", "C:/lib/a.jar", "/"):
        assert e(raw).kind == "ignored" and e(raw).reason, raw
    assert jars.class_path_tokens(" a.jar\tb%20c.jar ") == ["a.jar", "b%20c.jar"]
    assert jars.guest_path_for_host("/usr/share/java/a.jar") == "/app/lib/host/usr/share/java/a.jar"


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> classpath_apps.ChainApp:
    return classpath_apps.build_chain(tmp_path_factory.mktemp("chain"))


def test_absolute_class_path_chain(chain, jdk, console):
    """app -> lib/r.jar, /abs/b.jar (-> c.jar -> b.jar again, gone.jar; -> file:sub/e.jar),
    /abs/missing.jar, /abs/classes/, file:/abs/with%20space/u.jar (-> /abs/b.jar again)."""
    app = analyze(chain.app, jdk)
    a, j = chain.abs, chain.jars
    assert app.class_path == (chain.app, j["r"], j["b"], j["c"], j["e"], chain.classes, j["u"])
    assert app.guest_class_path == ("/app/app.jar", "/app/lib/r.jar", chain.guest(a / "b.jar"), chain.guest(a / "c.jar"),
                                    chain.guest(a / "sub" / "e.jar"), chain.guest(a / "classes"),
                                    chain.guest(a / "with space" / "u.jar"))
    # the image gets files only: each jar once, and the class directory file by file
    d = chain.guest(a / "classes")
    assert dict(app.files) == {
        "/app/app.jar": chain.app, "/app/lib/r.jar": j["r"],
        chain.guest(a / "b.jar"): j["b"], chain.guest(a / "c.jar"): j["c"], chain.guest(a / "sub/e.jar"): j["e"],
        chain.guest(a / "with space/u.jar"): j["u"],
        f"{d}/d/D.class": chain.classes / "d/D.class", f"{d}/d/sub/S.class": chain.classes / "d/sub/S.class",
        f"{d}/d/note.txt": chain.classes / "d/note.txt"}
    assert [g for g, _ in app.files] == sorted(g for g, _ in app.files)
    # jdeps saw what was taken in: b java.logging, c java.sql, the directory java.xml, u java.naming
    assert app.jdeps_modules == classpath_apps.MODULES
    # each entry the JVM skips: one line naming the jar and the entry
    assert warnings_of(console) == [
        f"jvmkit: warning: skipping Class-Path entry 'gone.jar' of {a / 'c.jar'}: {a / 'gone.jar'} does not exist "
        f"(the JVM skips it too)",
        f"jvmkit: warning: skipping Class-Path entry '{a}/missing.jar' of {chain.app}: {a / 'missing.jar'} does not "
        f"exist (the JVM skips it too)"]
    assert str(chain.root) not in json.dumps(app.to_dict()["class_path_sources"])


def test_the_host_jvm_resolves_the_same_class_path(chain, jdk):
    """The oracle: `java -jar` on the host loads each dependency from an entry of the analysed
    class path, and uses every one of them."""
    proc = subprocess.run([str(jdk.java), "-jar", str(chain.app)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = classpath_apps.parse_output(proc.stdout)
    assert {name: text for name, (text, _) in out.items()} == classpath_apps.EXPECTED
    loaded = {Path(unquote(urlsplit(where).path)) for _, where in out.values()}
    assert loaded == set(analyze(chain.app, jdk).class_path[1:])


def test_strict_class_path_makes_a_skipped_entry_an_error(chain, jdk, console, tmp_path, hello_class):
    with pytest.raises(UsageError) as err:
        analyze(chain.app, jdk, strict_class_path=True)
    msg = str(err.value)
    assert "\n" not in msg and "'gone.jar'" in msg and str(chain.abs / "c.jar") in msg and "does not exist" in msg
    remote = make_jar(tmp_path / "remote.jar", {"hello/Hello.class": hello_class},
                      {"Main-Class": "hello.Hello", "Class-Path": "http://example.org/x.jar"})
    assert analyze(remote, jdk).guest_class_path == ("/app/app.jar",)
    assert "'http://example.org/x.jar'" in warnings_of(console)[-1] and "the JVM skips it too" in warnings_of(console)[-1]
    with pytest.raises(UsageError, match="'http://example.org/x.jar' of .*remote.jar cannot be loaded: it is a http: URL"):
        analyze(remote, jdk, strict_class_path=True)


def test_lib_naming_an_absolute_entry_is_that_entry(chain, jdk, tmp_path, console):
    plain = analyze(chain.app, jdk)
    link = tmp_path / "elsewhere.jar"
    link.symlink_to(chain.jars["c"])  # another name for the same file
    again = analyze(chain.app, jdk, libs=[chain.jars["b"], link])
    assert again.guest_class_path == plain.guest_class_path and again.files == plain.files
    # a --lib first reached as a --lib keeps /app/lib/NAME, and its absolute Class-Path is followed
    with zipfile.ZipFile(chain.app) as zf:
        main_class = zf.read("m/Main.class")
    lib_app = make_jar(tmp_path / "solo" / "app.jar", {"m/Main.class": main_class}, {"Main-Class": "m.Main"})
    solo = analyze(lib_app, jdk, libs=[chain.jars["u"]])
    assert solo.guest_class_path == ("/app/app.jar", "/app/lib/u.jar", chain.guest(chain.abs / "b.jar"),
                                     chain.guest(chain.abs / "c.jar"), chain.guest(chain.abs / "sub/e.jar"))


def test_relative_class_directory_and_file_url(tmp_path, jdk, hello_class):
    classes = tmp_path / "classes" / "hello"
    classes.mkdir(parents=True)
    (classes / "Hello.class").write_bytes(hello_class)
    (tmp_path / "classes" / "empty").mkdir()
    make_jar(tmp_path / "lib" / "x y.jar", {"x/X.class": hello_class})
    app_jar = make_jar(tmp_path / "app.jar", {"a/A.class": hello_class},
                       {"Main-Class": "hello.Hello", "Class-Path": "classes/ file:lib/x%20y.jar"})
    app = analyze(app_jar, jdk)  # the main class is found in the directory
    assert app.guest_class_path == ("/app/app.jar", "/app/classes", "/app/lib/x y.jar")
    assert dict(app.files) == {"/app/app.jar": app_jar, "/app/classes/hello/Hello.class": classes / "Hello.class",
                               "/app/lib/x y.jar": tmp_path / "lib" / "x y.jar"}
    assert app.class_path[1] == tmp_path / "classes"


def test_directory_entries_the_jvm_would_not_read(tmp_path, jdk, hello_class, console):
    (tmp_path / "classes").mkdir()
    make_jar(tmp_path / "a.jar", {"x/X.class": hello_class})
    # a directory named without the trailing "/" is read as a jar by the JVM: refused, as before
    no_slash = make_jar(tmp_path / "app1.jar", {"hello/Hello.class": hello_class},
                        {"Main-Class": "hello.Hello", "Class-Path": "classes"})
    with pytest.raises(UsageError, match="is not a file .it is a directory"):
        analyze(no_slash, jdk)
    # a jar named with a trailing "/" holds no classes for the JVM: skipped
    slash = make_jar(tmp_path / "app2.jar", {"hello/Hello.class": hello_class},
                     {"Main-Class": "hello.Hello", "Class-Path": f"{tmp_path}/a.jar/"})
    assert analyze(slash, jdk).guest_class_path == ("/app/app.jar",)
    assert "is not a directory" in warnings_of(console)[-1]


def test_guest_layout_clashes_are_one_line(tmp_path, jdk, hello_class, chain):
    """A --lib file called `host` would be where absolute entries go: refused, not merged."""
    host_lib = make_jar(tmp_path / "host", {"x/X.class": hello_class})
    app_jar = make_jar(tmp_path / "app.jar", {"hello/Hello.class": hello_class},
                       {"Main-Class": "hello.Hello", "Class-Path": f"{chain.abs}/sub/e.jar"})
    with pytest.raises(UsageError) as err:
        analyze(app_jar, jdk, libs=[host_lib])
    assert "/app/lib/host" in str(err.value) and str(host_lib) in str(err.value) and "\n" not in str(err.value)


def test_cycles_and_self_references_end(tmp_path, jdk, hello_class):
    a = tmp_path / "a.jar"
    make_jar(a, {"hello/Hello.class": hello_class},
             {"Main-Class": "hello.Hello", "Class-Path": f"{a} {tmp_path}/b.jar a.jar"})
    make_jar(tmp_path / "b.jar", {"b/B.class": hello_class}, {"Class-Path": f"file://{a} ./b.jar"})
    app = analyze(a, jdk)
    assert app.guest_class_path == ("/app/app.jar", f"/app/lib/host{tmp_path}/b.jar")


# --- finding the JDK -------------------------------------------------------------------------------

def fake_jdk(root: Path, real: jdks.Jdk, *, version: str, tools=("java", "javac", "jlink", "jdeps"),
             modules: str | None = "java.base java.logging") -> Path:
    (root / "bin").mkdir(parents=True)
    lines = [f'JAVA_VERSION="{version}"']
    if modules:
        lines.append(f'MODULES="{modules}"')
    (root / "release").write_text("\n".join(lines) + "\n")
    for tool in tools:
        (root / "bin" / tool).symlink_to(getattr(real, tool))
    return root


def test_version_parsing():
    assert jdks.feature_release("17.0.15") == 17
    assert jdks.feature_release("1.8.0_392") == 8
    assert jdks.feature_release("25-ea") == 25
    assert jdks.feature_release("21+35") == 21
    assert jdks.feature_release("banana") is None
    out = ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment (build 17.0.15+6-Debian-1deb12u1)\n'
           "OpenJDK 64-Bit Server VM (build 17.0.15+6-Debian-1deb12u1, mixed mode, sharing)\n")
    assert jdks.parse_java_version_output(out) == ("17.0.15", "17.0.15+6-Debian-1deb12u1")
    assert jdks.parse_release_file('A="x y"\nB=1\n\n# c\n') == {"A": "x y", "B": "1"}


def test_find_jdk_explicit_env_and_path(jdk, tmp_path, monkeypatch):
    assert jdks.find_jdk(jdk.home).home == jdk.home
    assert jdks.find_jdk(jdk.home / "bin" / "java").home == jdk.home.resolve()
    monkeypatch.setenv("JAVA_HOME", str(jdk.home))
    found = jdks.find_jdk(None)
    assert found.home == jdk.home and found.source == "JAVA_HOME"
    monkeypatch.delenv("JAVA_HOME")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "java").symlink_to(jdk.java)  # like /usr/bin/java -> /etc/alternatives/java -> ...
    monkeypatch.setenv("PATH", str(bindir))
    found = jdks.find_jdk(None)
    assert found.home == jdk.java.resolve().parent.parent and found.source == "PATH"
    assert found.release == jdk.release and found.jmods is not None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(JvmkitError, match="no JDK found"):
        jdks.find_jdk(None)


def test_find_jdk_bad_paths(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--jdk .*nowhere: no such directory"):
        jdks.find_jdk(tmp_path / "nowhere")
    with pytest.raises(UsageError, match=f"--jdk {tmp_path} is not a JDK"):
        jdks.find_jdk(tmp_path)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    with pytest.raises(UsageError, match=f"JAVA_HOME={tmp_path} is not a JDK"):
        jdks.find_jdk(None)


def test_real_jdk(jdk):
    assert jdk.release >= 11 and jdk.version.startswith(str(jdk.release))
    modules = jdk.modules()
    assert "java.base" in modules and "jdk.httpserver" in modules and modules == sorted(modules)
    assert jdk.require_jmods() == jdk.home / "jmods"


def test_jdk_without_jmods(jdk, tmp_path):
    home = fake_jdk(tmp_path / "jdk", jdk, version=f"{jdk.release}.0.1")
    fake = jdks.find_jdk(home)
    assert fake.jmods is None and not fake.is_jre and fake.release == jdk.release
    assert fake.modules() == ["java.base", "java.logging"]  # from the release file
    with pytest.raises(JvmkitError) as err:
        fake.require_jmods()
    msg = str(err.value)
    assert str(home) in msg and "no jmods" in msg
    assert f"apt-get install openjdk-{jdk.release}-jmods" in msg and "--jdk PATH" in msg


def test_jre_is_refused(jdk, tmp_path, samples):
    home = fake_jdk(tmp_path / "jre", jdk, version="17.0.2", tools=("java",), modules=None)
    jre = jdks.find_jdk(home)
    assert jre.is_jre and "java.base" in jre.modules()  # from `java --list-modules`
    with pytest.raises(JvmkitError) as err:
        jre.require_jmods()
    msg = str(err.value)
    assert str(home) in msg and "JRE" in msg and "openjdk-17-jdk-headless" in msg and "--jdk" in msg
    with pytest.raises(JvmkitError, match="has no jdeps"):
        analyze(samples["hello"], jre)


def test_old_java_is_refused(jdk, tmp_path):
    home = fake_jdk(tmp_path / "j8", jdk, version="1.8.0_392", tools=("java",))
    with pytest.raises(JvmkitError, match="Java 8; jvmkit needs JDK 11"):
        jdks.find_jdk(home)


def _linkable_jdk() -> Path | None:
    for home in sorted(Path("/usr/lib/jvm").glob("*")) if Path("/usr/lib/jvm").is_dir() else []:
        try:
            candidate = jdks.jdk_at(home)
        except JvmkitError:
            continue
        if candidate.jmods is None and candidate.linkable_runtime:
            return home
    return None


def test_jdk_linking_from_its_runtime_image_needs_no_jmods():
    home = _linkable_jdk()
    if home is None:
        pytest.skip("no JDK 24+ with a linkable run-time image (JEP 493) under /usr/lib/jvm")
    jdk = jdks.find_jdk(home)
    assert jdk.jmods is None and jdk.require_jmods() is None
