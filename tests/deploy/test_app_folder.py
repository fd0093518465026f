"""`privatune app-folder` and the flwr connection trap the coordinator's guide steers around.

Issue 12 (deployment polish): `flwr supernode register ... privatune` failed when run from the folder that
holds the checkout, because flwr 1.42 reads a connection name that is also a folder with a pyproject.toml as
a legacy app folder. The guide now leaves the (default) connection out; these tests pin both behaviours.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli

from .harness import REPO_ROOT, _bin

CONFIG = """[superlink]
default = "privatune"

[superlink.privatune]
address = "127.0.0.1:9"
insecure = true
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "privatune.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_app_folder_holds_the_app_and_nothing_else(tmp_path: Path) -> None:
    dest = tmp_path / "app"
    proc = _cli("app-folder", str(dest), "--source", ".", cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {dest}" in proc.stdout and "flwr run" in proc.stdout
    assert sorted(p.name for p in dest.iterdir()) == ["client", "common", "privatune", "pyproject.toml", "server"] + (
        ["simulations"] if (REPO_ROOT / "simulations" / "__init__.py").exists() else []
    )
    staged = tomli.loads((dest / "pyproject.toml").read_text())
    assert "federations" not in staged["tool"]["flwr"] and staged["tool"]["flwr"]["app"]["components"]
    assert (dest / "privatune" / "common").is_symlink()  # the checkout's layout; a bundle leaves links out
    assert (dest / "privatune" / "common" / "config.py").is_file()
    assert not list(dest.rglob("__pycache__")) and not list(dest.rglob("test_*.py"))


def test_app_folder_refuses_a_folder_that_is_not_an_app(tmp_path: Path) -> None:
    proc = _cli("app-folder", str(tmp_path / "app"), "--source", str(tmp_path), cwd=tmp_path)
    assert proc.returncode != 0
    assert "has no pyproject.toml" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def beside_a_checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder holding a checkout called privatune, and a FLWR_HOME whose default connection is privatune."""
    (tmp_path / "privatune").mkdir()
    (tmp_path / "privatune" / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG)
    return tmp_path, {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}


def _flwr(*args: str, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run([_bin("flwr"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
    return " ".join((proc.stdout + proc.stderr).split())


def test_the_documented_bare_flwr_command_works_beside_a_checkout(beside_a_checkout) -> None:
    cwd, env = beside_a_checkout
    named = _flwr("supernode", "list", "privatune", cwd=cwd, env=env)
    assert "Cannot migrate configuration" in named  # the trap: the name is read as the checkout folder
    bare = _flwr("supernode", "list", cwd=cwd, env=env)
    assert "Cannot migrate" not in bare and "Connection to the SuperLink is unavailable" in bare  # it dialled
    assert (cwd / "privatune" / "pyproject.toml").read_text() == (REPO_ROOT / "pyproject.toml").read_text()
