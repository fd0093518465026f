"""The harness's pure parts: config strings Flower parses back exactly, app staging, ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import tomli
from flwr.common.config import parse_config_args

from .harness import format_config, free_port, stage_app, write_node_config_toml

CONFIG = {
    "site-id": "hospital-a",
    "data-path": "/data/with space/notes.csv",
    "windows-path": r"C:\data\notes.csv",  # backslashes: written as a TOML literal string
    "quoted": 'say "hi"',
    "max-epsilon": 8.0,
    "min-clients": 3,
    "dp": True,
}


def test_format_config_round_trips_through_flowers_parser() -> None:
    text = format_config(CONFIG)
    assert parse_config_args([text]) == CONFIG


def test_node_config_file_round_trips(tmp_path: Path) -> None:
    path = write_node_config_toml(tmp_path / "site.toml", CONFIG)
    assert parse_config_args([str(path)]) == CONFIG  # what `--node-config site.toml` does
    assert tomli.loads(path.read_text()) == CONFIG


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"bad key": "x"}, ValueError),
        ({"k=v": "x"}, ValueError),
        ({"k": "both ' and \" quotes"}, ValueError),
        ({"k": [1, 2]}, TypeError),
    ],
)
def test_format_config_refuses_what_flower_would_misread(config: dict, error: type) -> None:
    with pytest.raises(error):
        format_config(config)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_stage_app_drops_legacy_federations_and_non_app_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "app.py").write_text("x = 1\n")
    (src / "pkg" / "test_app.py").write_text("")
    (src / "pkg" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (src / "tests").mkdir()
    (src / "tests" / "__init__.py").write_text("")
    (src / "runs").mkdir()  # not a package: outputs stay behind
    (src / "runs" / "big.json").write_text("{}")
    pyproject = (
        '[project]\nname = "a"\nversion = "1"\n\n'
        "[tool.flwr.app.config]\nk = 1\n\n"
        '[tool.flwr.federations]\ndefault = "sim"\n\n'
        "[tool.flwr.federations.sim]\noptions.num-supernodes = 2\n\n"
        '[tool.pytest.ini_options]\naddopts = "-q"\n'
    )
    (src / "pyproject.toml").write_text(pyproject)
    dest = stage_app(src, tmp_path / "dest")
    staged = tomli.loads((dest / "pyproject.toml").read_text())
    assert "federations" not in staged["tool"]["flwr"]
    assert staged["tool"]["flwr"]["app"]["config"] == {"k": 1}
    assert staged["tool"]["pytest"]["ini_options"] == {"addopts": "-q"}
    assert (src / "pyproject.toml").read_text() == pyproject  # the source is untouched
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["pkg/__init__.py", "pkg/app.py", "pyproject.toml"]
