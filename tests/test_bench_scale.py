"""The scale benchmark end to end, tiny (issue 13): 50 clients of a Fashion-MNIST subset, 10 % sampled, 2 rounds;
who trained is in the results, and each site's ledger holds spends for exactly the rounds it trained, composing
to the epsilon the server recorded for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENTS, ROUNDS = 50, 2


@pytest.mark.slow
def test_a_tiny_scale_cell_samples_and_composes_per_client(tmp_path: Path) -> None:
    from privatune.common.accounting import epsilon_of
    from privatune.common.fashion_mnist import locate
    from privatune.common.ledger import SiteLedger
    from privatune.common.ledger.names import SERVER_LEDGER_NAME

    try:
        locate("train")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not installed")
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "privatune.simulations.benchmarks.scale", "--out", str(out)]
    cmd += ["--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--max-records", "1500"]
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench_scale.json").read_text())
    (cell,) = result["cells"]
    assert cell["status"] == "completed", (out / "logs" / f"clients-{CLIENTS}.log").read_text()[-3000:]
    assert cell["sampled_per_round"] == [CLIENTS // 10] * ROUNDS
    assert len(cell["round_seconds"]) == ROUNDS and cell["peak_tree_mib"] > cell["peak_client_actor_mib"] > 0
    assert "| 50 " in result["table"]

    run = out / "runs" / f"clients-{CLIENTS}"
    summary = json.loads((run / "summary.json").read_text())
    participation = summary["participation"]
    assert sum(len(r) for r in participation.values()) == CLIENTS // 10 * ROUNDS
    assert cell["clients_trained"] == len(participation) and cell["rounds_trained_min"] == 0
    spends = {}
    for path in run.rglob("*.ledger.sqlite"):
        if path.name != SERVER_LEDGER_NAME:
            entries = [r.entry for r in SiteLedger(path).entries()]
            if entries:
                spends[entries[0].site_id] = entries
    assert set(spends) == set(participation)  # a client that was never sampled spent nothing
    for cid, rounds in participation.items():
        assert [e.round for e in spends[cid]] == rounds
        mechanism = spends[cid][-1].dp_mechanism
        composed = epsilon_of([mechanism.gaussian] * len(rounds), mechanism.delta, mechanism.accountant)
        assert summary["per_client_epsilon"][cid] == pytest.approx(composed, rel=1e-6)
        assert composed <= 4.0 + 1e-6
    assert cell["max_client_epsilon"] == pytest.approx(max(summary["per_client_epsilon"].values()))
