"""A small app whose jars reach each other the ways a manifest Class-Path can, built with the real
JDK's javac (shared by test_jar.py, test_classpath_vm.py and test_pack_strict_class_path.py).

    <root>/app/app.jar           Main-Class m.Main; Class-Path (in this order):
        lib/r.jar                  relative, as before
        <abs>/b.jar                absolute host path
        <abs>/missing.jar          absolute, does not exist           -> one warning
        <abs>/classes/             absolute class directory (with a resource and a subpackage)
        file:<abs>/with%20space/u.jar   file: URL, percent-encoded
    <abs>/b.jar                  Class-Path: c.jar file:sub/e.jar   (relative to b, plain and as file: URL)
    <abs>/c.jar                  Class-Path: b.jar gone.jar         (a cycle back to b; a missing one -> one warning)
    <abs>/with space/u.jar       Class-Path: <abs>/b.jar            (b again by another route: taken once)

Each dependency uses one JDK module the app jar does not (b java.logging, c java.sql, the class
directory java.xml, u java.naming), so jdeps must see each of them for the module set to be right.
`m.Main` prints one line per dependency, with where the class was loaded from (or "failed ...").
`app-jars.jar` is the same app without the class directory entry.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from support.images import load_samples_build as _load_samples_build

build = _load_samples_build()

SOURCES = {
    "r/R.java": 'package r; public class R { public static String hello() { return "R ok"; } }',
    "b/B.java": 'package b; public class B { public static String hello() { '
                'return "B ok " + java.util.logging.Logger.getLogger("b.B").getName(); } }',
    "c/C.java": 'package c; public class C { public static String hello() { '
                'return "C ok " + java.sql.JDBCType.valueOf(4).getName(); } }',
    "e/E.java": 'package e; public class E { public static String hello() { return "E ok"; } }',
    "d/D.java": 'package d; public class D { public static String hello() throws Exception { '
                'String text; try (java.io.InputStream in = D.class.getResourceAsStream("/d/note.txt")) { '
                'text = new String(in.readAllBytes(), "UTF-8").trim(); } '
                'return "D ok " + d.sub.S.name() + " " + text + " " '
                '+ javax.xml.parsers.DocumentBuilderFactory.class.getSimpleName(); } }',
    "d/sub/S.java": 'package d.sub; public class S { public static String name() { return "S"; } }',
    "u/U.java": 'package u; public class U { public static String hello() { '
                'return "U ok " + javax.naming.NamingException.class.getSimpleName(); } }',
    "m/Main.java": """package m;
public class Main {
  static String where(Class<?> c) { return String.valueOf(c.getProtectionDomain().getCodeSource().getLocation()); }
  public static void main(String[] args) throws Exception {
    try { System.out.println("r: " + r.R.hello() + " @ " + where(r.R.class)); } catch (Throwable t) { System.out.println("r: failed " + t); }
    try { System.out.println("b: " + b.B.hello() + " @ " + where(b.B.class)); } catch (Throwable t) { System.out.println("b: failed " + t); }
    try { System.out.println("c: " + c.C.hello() + " @ " + where(c.C.class)); } catch (Throwable t) { System.out.println("c: failed " + t); }
    try { System.out.println("e: " + e.E.hello() + " @ " + where(e.E.class)); } catch (Throwable t) { System.out.println("e: failed " + t); }
    try { System.out.println("d: " + d.D.hello() + " @ " + where(d.D.class)); } catch (Throwable t) { System.out.println("d: failed " + t); }
    try { System.out.println("u: " + u.U.hello() + " @ " + where(u.U.class)); } catch (Throwable t) { System.out.println("u: failed " + t); }
  }
}
""",
}

# What m.Main prints for each dependency, without the "@ location" part.
EXPECTED = {"r": "R ok", "b": "B ok b.B", "c": "C ok INTEGER", "e": "E ok",
            "d": "D ok S from the class directory DocumentBuilderFactory", "u": "U ok NamingException"}
# The JDK modules the dependencies add (the app jar itself needs only java.base).
MODULES = ("java.base", "java.logging", "java.naming", "java.sql", "java.xml")


@dataclass(frozen=True)
class ChainApp:
    root: Path
    abs: Path          # the directory the absolute entries point into
    app: Path          # the app jar
    app_jars_only: Path  # the same app without the class directory entry (its "d" line fails)
    jars: dict         # name -> host jar (r, b, c, e, u)
    classes: Path      # the absolute class directory

    def guest(self, host: Path | str) -> str:
        """Where jvmkit places a jar reached by its absolute host path."""
        return "/app/lib/host" + str(host)


def _compile(src: Path, out: Path, classpath: list[Path]) -> None:
    javac = build.find_javac()
    files = sorted(str(p) for p in src.rglob("*.java"))
    cmd = [str(javac), "--release", "11", "-nowarn", "-d", str(out)]
    if classpath:
        cmd += ["-cp", ":".join(str(p) for p in classpath)]
    proc = subprocess.run(cmd + files, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def build_chain(root: Path) -> ChainApp:
    root = root.resolve()
    abs_dir = root / "abs"
    work = root / "work"
    classes = {}
    for pkg in ("r", "b", "c", "e", "d", "u"):
        src = work / "src" / pkg
        for name, text in SOURCES.items():
            if name.startswith(f"{pkg}/"):
                path = work / "src" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        out = work / "classes" / pkg
        _compile(src, out, [])
        classes[pkg] = out
    main_src = work / "src" / "m" / "Main.java"
    main_src.parent.mkdir(parents=True, exist_ok=True)
    main_src.write_text(SOURCES["m/Main.java"])
    _compile(main_src.parent, work / "classes" / "m", list(classes.values()))

    base = {"Manifest-Version": "1.0", "Created-By": "jvmkit tests"}
    jars = {
        "r": build.write_jar(root / "app" / "lib" / "r.jar", [classes["r"]], base),
        "b": build.write_jar(abs_dir / "b.jar", [classes["b"]], {**base, "Class-Path": "c.jar file:sub/e.jar"}),
        "c": build.write_jar(abs_dir / "c.jar", [classes["c"]], {**base, "Class-Path": "b.jar gone.jar"}),
        "e": build.write_jar(abs_dir / "sub" / "e.jar", [classes["e"]], base),
        "u": build.write_jar(abs_dir / "with space" / "u.jar", [classes["u"]],
                             {**base, "Class-Path": f"{abs_dir}/b.jar"}),
    }
    class_dir = abs_dir / "classes"
    for file in classes["d"].rglob("*.class"):
        target = class_dir / file.relative_to(classes["d"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
    (class_dir / "d" / "note.txt").write_text("from the class directory\n")
    encoded = str(abs_dir).replace("%", "%25").replace(" ", "%20")
    class_path = ["lib/r.jar", f"{abs_dir}/b.jar", f"{abs_dir}/missing.jar", f"{abs_dir}/classes/",
                  f"file:{encoded}/with%20space/u.jar"]
    app = build.write_jar(root / "app" / "app.jar", [work / "classes" / "m"],
                          {**base, "Main-Class": "m.Main", "Class-Path": " ".join(class_path)})
    jars_only = build.write_jar(root / "app" / "app-jars.jar", [work / "classes" / "m"],
                                {**base, "Main-Class": "m.Main",
                                 "Class-Path": " ".join(e for e in class_path if not e.endswith("/"))})
    return ChainApp(root=root, abs=abs_dir, app=app, app_jars_only=jars_only, jars=jars, classes=class_dir)


def parse_output(stdout: str) -> dict[str, tuple[str, str]]:
    """m.Main's lines -> {dependency: (what it printed, where its class came from)}."""
    out = {}
    for line in stdout.splitlines():
        name, sep, rest = line.partition(": ")
        if sep and name in EXPECTED:
            text, _, where = rest.partition(" @ ")
            out[name] = (text, where)
    return out
