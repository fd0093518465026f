"""Write-ahead spending, crash recovery and budgets, through the real ClientApp handler."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from privatune.client.app import train
from privatune.common.accounting import epsilon_of
from privatune.common.ledger import SiteLedger
from tests.helpers.messages import digits_config, initial_state

NODE = {"partition-id": 0, "num-partitions": 3}


def _cfg(tmp_path, **kw):
    return digits_config(tmp_path, **{"num_server_rounds": 3, "target_epsilon": 6.0, **kw})


_state = initial_state


def _ledger(tmp_path):
    return SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite")


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    sys.path.insert(0, {root!r})
    from tests.helpers.messages import make_context, make_message
    from tests.test_privacy_budget import _cfg, _state
    import privatune.client.app as client_app
    from pathlib import Path
    cfg = _cfg(Path({tmp!r}))
    real = client_app.encode_update
    def killed_before_reply(*a, **k):
        os._exit(137)  # the process dies after training, before any reply leaves
    client_app.encode_update = killed_before_reply
    client_app.train(make_message(cfg, _state(cfg), server_round=1), make_context({node!r}, run_id=7))
    """
)


def test_spend_survives_a_crash_between_training_and_reply_and_the_restart_continues(
    tmp_path, message_factory, context_factory
):
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    script = CRASH_SCRIPT.format(root=root, tmp=str(tmp_path), node=NODE)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    (first,) = _ledger(tmp_path).entries()  # the spend is on disk although no reply was sent
    assert first.entry.round == 1 and first.entry.epsilon_run > 0

    # The restarted client (a fresh process in deployment; a fresh handler call here) continues the ledger.
    cfg = _cfg(tmp_path)
    reply = train(message_factory(cfg, _state(cfg), server_round=2), context_factory(NODE, run_id=7)).content
    assert reply["status"]["status"] == "trained"
    records = _ledger(tmp_path).entries()
    assert [r.entry.round for r in records] == [1, 2]
    expected = epsilon_of([r.entry.mechanism for r in records], records[-1].entry.delta, records[-1].entry.accountant)
    assert reply["metrics"]["epsilon"] == pytest.approx(expected, abs=1e-6)
    assert reply["metrics"]["epsilon"] > first.entry.epsilon_run


def test_budget_applies_across_runs_on_the_same_dataset(tmp_path, message_factory, context_factory):
    cfg = _cfg(tmp_path, num_server_rounds=1, target_epsilon=3.0)
    node = {**NODE, "max-epsilon": 5.0}
    r1 = train(message_factory(cfg, _state(cfg)), context_factory(node, run_id=1)).content
    assert r1["status"]["status"] == "trained"
    assert r1["metrics"]["epsilon-dataset"] == pytest.approx(r1["metrics"]["epsilon"])
    # A second run on the same data: its own epsilon restarts, the dataset's does not, and the budget holds.
    r2 = train(message_factory(cfg, _state(cfg)), context_factory(node, run_id=2)).content
    assert r2["status"]["status"] == "trained"
    assert r2["metrics"]["epsilon-dataset"] > r2["metrics"]["epsilon"]
    assert r2["metrics"]["epsilon-dataset"] <= 5.0
    trained = 2
    for run_id in range(3, 12):
        r = train(message_factory(cfg, _state(cfg)), context_factory(node, run_id=run_id)).content
        if r["status"]["status"] != "trained":
            break
        assert r["metrics"]["epsilon-dataset"] <= 5.0
        trained += 1
    assert r["status"]["status"] == "budget-exhausted"
    assert "max-epsilon=5" in r["status"]["reason"]
    assert len(_ledger(tmp_path).entries()) == trained  # the refused round spent nothing


@pytest.mark.slow
def test_run_ends_cleanly_when_too_few_clients_have_budget(tmp_path):
    out = tmp_path / "sim"
    cmd = [
        sys.executable,
        "-m",
        "privatune.cli",
        "simulate",
        "--preset",
        "digits",
        "--clients",
        "3",
        "--rounds",
        "4",
        "--epsilon",
        "8",
        "--out",
        str(out),
        "--run-config",
        "sim-max-epsilon=6 local-epochs=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "privacy budget" in summary["stopped_reason"] and summary["status"] == "stopped"
    assert 1 <= summary["rounds_completed"] < 4
    assert all(e <= 6.0 for e in summary["per_client_epsilon"].values())
    assert "stopped early" in proc.stdout
    audit = subprocess.run([sys.executable, "-m", "privatune.cli", "audit", str(out)], capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
