"""`python -m jvmkit` runs the CLI."""

from jvmkit.cli import main

main()
