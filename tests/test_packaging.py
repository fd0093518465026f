"""The shape of the package: one installed namespace, and the folders' sides kept apart.

A wheel built from the checkout holds exactly one top-level package, ``privatune``, with every module of the
four folders under it; no module imports a folder as a bare top-level package (``import common``), and a side
never imports the other (``client/`` runs at a site, ``server/`` at the coordinator, ``common/`` is both).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "client", "server", "simulations")
SOURCE_DIRS = ("privatune", *FOLDERS)
# What each part may import of privatune (besides itself and common): the architecture, as a table.
MAY_IMPORT = {
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "simulations": {"common", "client", "server", "simulations"},
}


def _modules(folder: str) -> list[Path]:
    """The .py files of a folder, not following symlinks (privatune/common is one, to common/)."""
    found = []
    for dirpath, _dirs, files in os.walk(ROOT / folder):  # os.walk does not follow symlinked folders
        if "__pycache__" not in dirpath:
            found += [Path(dirpath) / f for f in files if f.endswith(".py")]
    return sorted(found)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in SOURCE_DIRS:  # the symlinks in privatune/ are copied as symlinks, as git checks them out
        shutil.copytree(ROOT / folder, src / folder, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (built,) = out.glob("privatune-*.whl")
    return built


def test_the_wheel_adds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"privatune"}, sorted(top)


def test_the_wheel_holds_every_module_of_the_four_folders(wheel):
    """A subpackage folder missing from pyproject's package list would be silently left out of installs."""
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"privatune/{p.relative_to(ROOT).as_posix()}" for folder in FOLDERS for p in _modules(folder)}
    expected |= {f"privatune/{p.relative_to(ROOT / 'privatune').as_posix()}" for p in _modules("privatune")}
    assert sorted(expected - names) == []


def test_no_module_imports_a_folder_as_a_top_level_package():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: import {name}"
        for folder in (*SOURCE_DIRS, "tests")
        for path in _modules(folder)
        for line, name in _imports(path)
        if name.split(".")[0] in FOLDERS
    ]
    assert bad == [], "use the privatune namespace (privatune.common...):\n" + "\n".join(bad)


@pytest.mark.parametrize("part", FOLDERS)
def test_a_side_imports_only_what_it_may(part):
    bad = []
    for path in _modules(part):
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "privatune":
                continue
            target = parts[1] if len(parts) > 1 else ""
            if target not in MAY_IMPORT[part]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: import {name}")
    assert bad == [], f"{part}/ may import only {sorted(MAY_IMPORT[part])} of privatune:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_namespace_links_each_folder(folder):
    link = ROOT / "privatune" / folder
    assert link.is_symlink() and os.readlink(link) == f"../{folder}"


def test_the_flower_components_point_into_the_namespace():
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "privatune.server.app:app", "clientapp": "privatune.client.app:app"}


@pytest.mark.slow
def test_an_installed_copy_runs_a_simulation_outside_the_checkout(wheel, tmp_path):
    """`pip install` of the wheel (into a target folder, on this venv's dependencies), then `privatune simulate`
    from a folder with no checkout in sight: every import resolves inside the installed copy."""
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin") == [
        "privatune"
    ]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "MPLCONFIGDIR")}
    env.update(PYTHONPATH=str(target), HOME=str(tmp_path / "home"))
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import privatune.server.app as s, privatune.client.app as c; print(s.__file__, c.__file__)",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(Path(f).is_relative_to(target) for f in where.stdout.split()), where.stdout
    out = work / "run"
    sim = subprocess.run(
        [
            sys.executable,
            "-m",
            "privatune.cli",
            "simulate",
            "--preset",
            "digits",
            "--clients",
            "2",
            "--rounds",
            "1",
            "--epsilon",
            "4",
            "--run-config",
            "max-records=300",
            "--out",
            str(out),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    assert (out / "summary.json").is_file() and (out / "ledgers").is_dir()


def test_a_flower_app_bundle_imports_its_own_copy(tmp_path):
    """`flwr run .` ships the files Flower collects (it skips symlinks, so privatune/common is not among them);
    the bundle's ClientApp and ServerApp must still import, from the bundle, not from any other copy."""
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    files = filter_paths_for_publish(collect_files(ROOT))
    assert "privatune/__init__.py" in files and not any(p.startswith("privatune/common/") for p in files)
    fab = tmp_path / "fab"
    for rel, src in files.items():
        if rel.endswith(".py") or rel == "pyproject.toml":
            dest = fab / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes() if isinstance(src, Path) else src)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import privatune.server.app as s, privatune.client.app as c; print(s.__file__); print(c.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(fab)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(Path(f).resolve().is_relative_to(fab.resolve()) for f in proc.stdout.split()), proc.stdout
