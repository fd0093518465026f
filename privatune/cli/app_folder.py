"""``privatune app-folder DEST``: the folder a coordinator runs ``flwr run`` on.

flwr 1.42 packages the folder it is given into a Flower App bundle and sends it to the SuperLink. A checkout
is a poor folder to give it: flwr *rewrites* a ``pyproject.toml`` that still holds a legacy
``[tool.flwr.federations]`` table, and the bundle would carry tests, caches and run folders. The app folder
holds just ``pyproject.toml`` (without those tables) and the app's top-level packages.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import typer

from privatune.cli.inputs import UsageError
from privatune.cli.terminal import console

_HEADER = re.compile(r"\s*\[+\s*([^\]]+?)\s*\]+")
LEGACY_TABLE = "tool.flwr.federations"
# What a bundle has no use for; flwr itself keeps only .py/.toml/.md/.json/.yaml files.
_IGNORED = ("__pycache__", "*.pyc", "test_*.py", "*_test.py")


def without_legacy_tables(pyproject: str) -> str:
    """``pyproject`` with every ``[tool.flwr.federations...]`` table removed, all else byte for byte."""
    kept: list[str] = []
    skipping = False
    for line in pyproject.splitlines(keepends=True):
        header = _HEADER.match(line)
        if header:
            skipping = header.group(1).startswith(LEGACY_TABLE)
        if not skipping:
            kept.append(line)
    return "".join(kept)


def app_packages(src: Path) -> list[Path]:
    """The app's top-level packages: folders holding ``__init__.py``, tests excepted."""
    return [c for c in sorted(src.iterdir()) if c.is_dir() and (c / "__init__.py").is_file() and c.name != "tests"]


def stage_app(src: Path, dest: Path) -> Path:
    """Copy the Flower app at ``src`` into ``dest`` (made if needed) and return ``dest``. Symlinks stay
    symlinks (privatune's ``privatune/common`` -> ``../common``; the bundle leaves them out)."""
    pyproject = src / "pyproject.toml"
    if not pyproject.is_file():
        raise UsageError(f"{src} is not a Flower app: it has no pyproject.toml; give --source the app's folder")
    text = pyproject.read_text(encoding="utf-8")
    if "[tool.flwr.app" not in text:
        raise UsageError(f"{pyproject} has no [tool.flwr.app] table, so flwr cannot run it as an app")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(without_legacy_tables(text), encoding="utf-8")
    for package in app_packages(src):
        shutil.copytree(
            package, dest / package.name, symlinks=True, ignore=shutil.ignore_patterns(*_IGNORED), dirs_exist_ok=True
        )
    return dest


def default_source() -> Path:
    """The checkout this privatune runs from (an installed wheel has no pyproject.toml: --source is needed)."""
    return Path(__file__).resolve().parents[2]


def app_folder(
    dest: Path = typer.Argument(..., help="the app folder to write (flwr run DEST); made if needed"),
    source: Path | None = typer.Option(None, "--source", help="the app to copy (default: this privatune checkout)"),
) -> None:
    """Write the folder a coordinator gives `flwr run`: pyproject.toml and the app's packages, nothing else."""
    src = (source or default_source()).expanduser().resolve()
    out = stage_app(src, dest.expanduser())
    names = ", ".join(p.name for p in app_packages(out))
    console.print(f"wrote {out}: pyproject.toml and {names}; run it with: flwr run {out} --stream")
