"""jvmkit: pack a Java application into a tiny bootable VM and run it with a JVM-aware balloon."""

__version__ = "0.1.0"
