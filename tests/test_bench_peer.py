"""The peer comparison (issue 13): the independent epsilon recomputation, the figures read back from each side, and
(slow) both federations end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from privatune.common.accounting import INDEPENDENT_REL_TOLERANCE, sample_rate, steps_per_epoch
from privatune.simulations.benchmarks.peer.bench import PeerPlan, plain_side, privatune_side, render, run
from privatune.simulations.benchmarks.peer.epsilon import composed_epsilon, round_mechanism, true_epsilons

SIGMA, DELTA, BATCH, EPOCHS = 1.0, 1e-5, 64, 3


def opacus_epsilon(steps: int, q: float, accountant: str) -> float:
    """What an Opacus accountant says after ``steps`` steps at (SIGMA, q): the library both sides report with."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(SIGMA, q, steps)]
    return float(acc.get_epsilon(delta=DELTA))


def test_round_mechanism_is_opacus_poisson_loader() -> None:
    # Opacus' make_private samples at 1 / len(loader) for len(loader) steps an epoch: both sides train so.
    assert round_mechanism(327, BATCH, EPOCHS, SIGMA) == (SIGMA, 1 / 6, 18)
    assert round_mechanism(327, BATCH, EPOCHS, SIGMA) == (SIGMA, sample_rate(327, BATCH), 3 * steps_per_epoch(327, 64))


def test_composed_epsilon_matches_opacus_over_all_steps() -> None:
    n = 327
    q, k = sample_rate(n, BATCH), EPOCHS * steps_per_epoch(n, BATCH)
    for rounds in (1, 3):
        # RDP: the same bound as Opacus' RDP accountant over every round's steps.
        assert composed_epsilon(n, BATCH, EPOCHS, rounds, SIGMA, DELTA, "rdp") == pytest.approx(
            opacus_epsilon(rounds * k, q, "rdp"), rel=1e-9
        )
    # PLD (dp-accounting): within the accountants' own error of Opacus' PRV, which both sides report with.
    pld = composed_epsilon(n, BATCH, EPOCHS, 3, SIGMA, DELTA)
    prv = opacus_epsilon(3 * k, q, "prv")
    assert abs(pld - prv) <= INDEPENDENT_REL_TOLERANCE * prv + 0.02


def test_one_round_epsilon_under_reports_a_multi_round_run() -> None:
    one = composed_epsilon(327, BATCH, EPOCHS, 1, SIGMA, DELTA)
    three = composed_epsilon(327, BATCH, EPOCHS, 3, SIGMA, DELTA)
    assert composed_epsilon(327, BATCH, EPOCHS, 0, SIGMA, DELTA) == 0.0
    assert one < three < 3 * one  # composition grows, sub-linearly


def test_true_epsilons_compose_only_the_rounds_each_client_trained() -> None:
    got = true_epsilons({"client-0": 327, "client-1": 327}, {"client-0": 3, "client-1": 1}, BATCH, EPOCHS, SIGMA, DELTA)
    assert got["client-0"]["one_round_pld"] == got["client-1"]["one_round_pld"]
    assert got["client-1"]["composed_pld"] == got["client-1"]["one_round_pld"]
    assert got["client-0"]["composed_pld"] > got["client-1"]["composed_pld"]
    assert got["client-0"]["composed_rdp"] >= got["client-0"]["composed_pld"]  # RDP is the looser bound


def test_each_side_read_back(tmp_path: Path) -> None:
    metrics = [
        {"round": 0, "seconds": 1.0, "clients": {}},
        {"round": 1, "seconds": 11.0, "clients": {"client-0": {"num-examples": 10.0, "epsilon": 2.0}}},
        {"round": 2, "seconds": 16.0, "clients": {"client-0": {"num-examples": 10.0, "epsilon": 3.0}}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    priv = privatune_side({"test_accuracy": 0.9, "status": "completed"}, tmp_path)
    assert priv["round_seconds"] == [10.0, 5.0]
    assert priv["clients"] == {"client-0": {"rounds": 2, "num_examples": 10, "reported": 3.0}}
    per_round = [{"client-0": {"epsilon": 2.0, "num-examples": 10}}] * 2
    plain = plain_side({"round_seconds": [4.0, 5.0], "test_accuracy": 0.8, "status": "completed", "clients": per_round})
    assert plain["clients"] == {"client-0": {"rounds": 2, "num_examples": 10, "reported": 2.0}}


def test_plan_refuses_what_cannot_compare() -> None:
    with pytest.raises(ValueError, match="--clients"):
        PeerPlan(clients=1).checked()
    with pytest.raises(ValueError, match="--noise-multiplier"):
        PeerPlan(noise_multiplier=0.0).checked()
    rc = PeerPlan().checked().run_config()
    assert rc["val-fraction"] == 0.0 and rc["noise-multiplier"] == 1.0  # every record trains, sigma fixed


@pytest.mark.slow
def test_both_sides_run_and_plain_under_reports(tmp_path: Path) -> None:
    plan = PeerPlan(clients=2, rounds=2, local_epochs=1, max_records=200).checked()
    result = run(plan, tmp_path, log=lambda _line: None)
    plain, priv = result["sides"]["plain"], result["sides"]["privatune"]
    for side in (plain, priv):
        assert side["status"] == "completed"
        assert len(side["round_seconds"]) == 2 and all(s > 0 for s in side["round_seconds"])
        assert 0.0 <= side["test_accuracy"] <= 1.0
        assert set(side["clients"]) == {"client-0", "client-1"}
    for name, c in plain["clients"].items():
        # The plain example reports one round's epsilon: the one-round value, below the composition.
        assert c["reported"] == pytest.approx(c["one_round_pld"], rel=0.03, abs=0.02)
        assert c["reported"] < c["composed_pld"]
        # privatune reports the composition over both rounds.
        assert priv["clients"][name]["reported"] == pytest.approx(c["composed_pld"], rel=0.03, abs=0.02)
    assert math.isfinite(result["ratio_median_round"]) and result["ratio_median_round"] > 0
    assert "privatune / plain" in render(result)
    assert (tmp_path / "bench_peer.json").exists()
