"""`python -m privatune.cli`: the same command line as the `privatune` entry point."""

from __future__ import annotations

from privatune.cli import main

main()
