"""Bad input to `privatune simulate` is refused before any model, Ray or training starts."""

import time

import pytest
from typer.testing import CliRunner

from privatune.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "imagenet"], "unknown preset"),
        (["--epsilon", "0"], "target-epsilon"),
        (["--epsilon", "-3"], "target-epsilon"),
        (["--epsilon", "lots"], "--epsilon"),
        (["--preset", "digits", "--clients", "5000"], "cannot split"),
        (["--mode", "everything"], "mode"),
        (["--run-config", "lr=-1"], "lr"),
    ],
)
def test_simulate_refuses_bad_configuration_quickly(tmp_path, args, message):
    start = time.perf_counter()
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code != 0
    assert message in result.output
    # Refused at the edge: no model load, no Ray (which takes far longer than this).
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out" / "summary.json").exists()
