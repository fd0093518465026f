"""docs/architecture.md names modules and functions; this keeps every name true, so the page cannot go stale.

Two kinds of reference are checked, both written as inline code: a path ending in ``.py`` (the file must exist
in the checkout), and a dotted name under the ``privatune`` namespace such as ``client.round.train_at_site`` or
``privatune.cli.keys.decrypt`` (the module must exist, and the name after it must be defined there -- a def, a
class, an assignment or a re-exported import -- with at most one more level: a method or nested function).
Only the standard library's ast is used: nothing is imported, so the test takes well under a second.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"

# The first part of a dotted name, and the folder it lives in (relative to the privatune package).
PACKAGE_ROOTS = {
    "common": ROOT / "common",
    "client": ROOT / "client",
    "server": ROOT / "server",
    "simulations": ROOT / "simulations",
    "cli": ROOT / "privatune" / "cli",
    "pki": ROOT / "privatune" / "pki",
}
# Inline code that looks dotted but names a file the code writes, not a module (``server.ledger.sqlite``).
DATA_SUFFIXES = (".sqlite", ".json", ".jsonl", ".ctx", ".png", ".safetensors", ".md", ".toml", ".npy", ".npz", ".csv")
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
DOTTED = re.compile(rf"^(?:privatune\.)?(?:{'|'.join(PACKAGE_ROOTS)})(?:\.{IDENTIFIER})+$")
PY_PATH = re.compile(r"^[\w.-]+(?:/[\w.-]+)+\.py$")


def inline_code(text: str) -> list[str]:
    """Every inline code span outside fenced blocks, with a trailing ``()`` dropped."""
    spans: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            spans += [s.strip().removesuffix("()") for s in re.findall(r"`([^`\n]+)`", line)]
    return spans


def path_references(text: str) -> list[str]:
    return sorted({s for s in inline_code(text) if PY_PATH.match(s)})


def dotted_references(text: str) -> list[str]:
    return sorted({s for s in inline_code(text) if DOTTED.match(s) and not s.endswith(DATA_SUFFIXES)})


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _defined(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """The names a block of statements defines, each with the statement defining it."""
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = node
    return names


def _module_file(folder: Path, parts: list[str]) -> Path | None:
    base = folder.joinpath(*parts)
    if base.with_suffix(".py").is_file() and parts:
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def resolve(reference: str) -> str | None:
    """None when ``reference`` names something that exists, else why it does not."""
    head, *parts = reference.removeprefix("privatune.").split(".")
    folder = PACKAGE_ROOTS[head]
    if head == "pki":  # privatune/pki.py, a module rather than a folder
        folder, parts = ROOT / "privatune", ["pki", *parts]
    for cut in range(len(parts), -1, -1):
        module = _module_file(folder, parts[:cut])
        if module is not None:
            names = parts[cut:]
            break
    else:
        return f"no module for {reference}"
    if len(names) > 2:
        return f"{reference}: {'.'.join(names)} is too deep to be a name in {module.relative_to(ROOT)}"
    body = _tree(module).body
    for depth, name in enumerate(names):
        defined = _defined(body)
        if name not in defined:
            return f"{reference}: {name} is not defined in {module.relative_to(ROOT)}"
        node = defined[name]
        if depth + 1 < len(names):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                return f"{reference}: {name} in {module.relative_to(ROOT)} is neither a class nor a function"
            body = node.body
    return None


def test_the_page_names_modules_and_functions():
    """The patterns below must keep finding references: a page without any would pass vacuously."""
    text = DOC.read_text(encoding="utf-8")
    assert len(path_references(text)) >= 20
    assert len(dotted_references(text)) >= 60


@pytest.mark.parametrize("path", path_references(DOC.read_text(encoding="utf-8")))
def test_every_module_path_exists(path):
    assert (ROOT / path).is_file(), f"docs/architecture.md names {path}, which is not in the checkout"


def test_every_dotted_name_is_defined():
    problems = [why for why in map(resolve, dotted_references(DOC.read_text(encoding="utf-8"))) if why]
    assert not problems, "docs/architecture.md names what the code no longer has:\n" + "\n".join(problems)


def test_the_resolver_rejects_what_does_not_exist():
    assert resolve("client.round.train_at_site") is None
    assert resolve("common.ledger.storage.SiteLedger.append") is None
    assert resolve("privatune.cli.keys.decrypt") is None
    assert resolve("client.round.no_such_function") is not None
    assert resolve("common.ledger.storage.SiteLedger.no_such_method") is not None
    assert resolve("server.no_such_module.run") is not None


def test_the_readme_links_the_page():
    assert "docs/architecture.md" in README.read_text(encoding="utf-8")
