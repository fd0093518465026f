"""Client sampling (issue 13): who trains in a round is drawn at the server from the seed and the round, and a
client's epsilon composes only over the rounds it trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privatune.server.run_record import RoundReport, RunRecorder
from privatune.server.sampling import sample_clients, sample_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("connected", "fraction", "per_round", "min_clients", "expected"),
    [
        (10, 1.0, 0, 2, 10),  # the default: everyone
        (10, 0.25, 0, 2, 2),  # floor(2.5), as Flower
        (10, 0.1, 0, 2, 2),  # never below min-clients
        (10, 1.0, 3, 2, 3),  # a number wins over the fraction
        (10, 1.0, 1, 2, 2),  # ... but not below min-clients
        (4, 1.0, 9, 1, 4),  # nor above who is connected
        (1000, 0.1, 0, 2, 100),
    ],
)
def test_sample_size(connected, fraction, per_round, min_clients, expected):
    assert sample_size(connected, fraction, per_round, min_clients) == expected


def test_the_sample_depends_on_seed_round_and_nodes_only():
    nodes = list(range(100, 200))
    first = sample_clients(nodes, 10, seed=42, server_round=3)
    assert len(set(first)) == 10 and set(first) <= set(nodes) and first == sorted(first)
    assert sample_clients(list(reversed(nodes)), 10, seed=42, server_round=3) == first  # order of arrival is moot
    others = {tuple(sample_clients(nodes, 10, seed=42, server_round=r)) for r in range(1, 21)}
    assert len(others) == 20  # rounds draw differently
    assert sample_clients(nodes, 10, seed=43, server_round=3) != first
    assert sample_clients(nodes, 100, seed=1, server_round=1) == nodes
    with pytest.raises(ValueError, match="cannot sample 101 of 100"):
        sample_clients(nodes, 101, seed=1, server_round=1)


def test_participation_lists_the_rounds_each_client_trained(tmp_path):
    rec = RunRecorder(tmp_path, summary_base={"run_id": "r"})
    rec.finish_round(RoundReport(round=0))
    rec.finish_round(RoundReport(round=1, clients={"a": {}, "b": {}}, sampled=2, aggregated=True))
    rec.finish_round(RoundReport(round=2, clients={"b": {}}, rejected_spends={"c": {}}, sampled=2, aggregated=True))
    summary = rec.summary()
    assert summary["participation"] == {"a": [1], "b": [1, 2], "c": [2]}  # a rejected update was still trained
    assert summary["clients_sampled_per_round"] == [2, 2]


@pytest.mark.slow
def test_a_sampled_client_composes_epsilon_over_the_rounds_it_trained(tmp_path):
    from privatune.common.accounting import epsilon_of
    from privatune.common.ledger import SiteLedger
    from privatune.common.ledger.names import SERVER_LEDGER_NAME

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "privatune.cli", "simulate", "--preset", "digits", "--clients", "4", "--rounds", "3"]
    cmd += ["--epsilon", "4", "--out", str(out), "--run-config", "max-records=600 clients-per-round=2 local-epochs=1"]
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["clients_sampled_per_round"] == [2, 2, 2]
    participation = summary["participation"]
    assert sum(len(rounds) for rounds in participation.values()) == 6
    ledgers = {}
    for path in out.rglob("*.ledger.sqlite"):
        if path.name == SERVER_LEDGER_NAME:
            continue
        entries = [r.entry for r in SiteLedger(path).entries()]
        if entries:
            ledgers[entries[0].site_id] = entries
    assert set(ledgers) == set(participation)
    for cid, rounds in participation.items():
        entries = ledgers[cid]
        assert [e.round for e in entries] == rounds  # spent in the rounds it trained, and only those
        mechanism = entries[-1].dp_mechanism
        composed = epsilon_of([mechanism.gaussian] * len(rounds), mechanism.delta, mechanism.accountant)
        assert summary["per_client_epsilon"][cid] == pytest.approx(composed, rel=1e-6)
        assert composed <= 4.0 + 1e-6
        if len(rounds) < 3:  # noise was calibrated for all 3 rounds: fewer rounds spend less
            assert composed < 4.0 - 0.05
