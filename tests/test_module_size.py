"""Modules stay small enough to read: about 500 lines at most, unless one holds a single kind of thing.

A longer module says so in its docstring with the phrase "One kind of thing:" followed by what it holds (for
example, every CLI command of one group). The limit is the issue's "about 500"; 550 leaves room for a docstring.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 550
MARKER = "One kind of thing:"


def _sources() -> list[Path]:
    found = []
    for folder in ("privatune", "common", "client", "server", "simulations"):
        for dirpath, _dirs, files in os.walk(ROOT / folder):  # not into privatune/'s symlinks
            found += [Path(dirpath) / f for f in files if f.endswith(".py") and "__pycache__" not in dirpath]
    return sorted(found)


def test_no_module_is_long_without_saying_why():
    long = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > LIMIT and MARKER not in doc:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert long == [], f"split these, or say '{MARKER} ...' in the docstring:\n" + "\n".join(long)
