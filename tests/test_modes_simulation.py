"""A whole simulated federation in each new fine-tuning mode (lora, last-k with k=2), DP on, tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode, extra", [("lora", ""), ("last-k", "last-k=2")])
def test_a_text_federation_completes_in_the_mode(mode, extra, tmp_path):
    out = tmp_path / mode
    cmd = [
        sys.executable, "-m", "privatune.cli", "simulate", "--preset", "trec6", "--clients", "2", "--rounds", "1",
        "--epsilon", "8", "--mode", mode, "--out", str(out),
        "--run-config", f"max-records=120 batch-size=16 local-epochs=1 max-length=16 {extra}".strip(),
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["mode"] == mode
    assert 0 <= summary["test_accuracy"] <= 1
    eps = summary["per_client_epsilon"]
    assert sorted(eps) == ["client-0", "client-1"] and all(0 < e <= 8.0 * 1.01 for e in eps.values())
    assert len(list((out / "ledgers").glob("site-*.ledger.sqlite"))) == 2
