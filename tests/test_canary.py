"""The one-run canary audit: its statistics (common.canary) and the run through the client's DP path."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from privatune.common.accounting import epsilon_of, steps_per_epoch
from privatune.common.canary import (
    audit_from_scores,
    count_correct,
    draw_inclusion,
    epsilon_lower_bound,
    make_guesses,
    p_value,
)

# ---------------------------------------------------------------------------------------------- statistics


def _reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The Theorem 3.1 bound written out with exact binomial terms (math.comb), independent of scipy."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, tail + 2 * m * delta * alpha)


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [
        (100, 20, 15, 0.5, 1e-5),
        (1000, 50, 50, 3.0, 1e-5),
        (200, 40, 25, 0.0, 1e-3),
        (500, 60, 45, 1.7, 0.0),
        (1000, 100, 100, 3.4, 1e-5),
        (300, 30, 1, 0.2, 1e-4),
    ],
)
def test_p_value_matches_an_exact_binomial_computation(m, r, v, eps, delta) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(_reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("r", [1, 10, 50, 200])
def test_perfect_guesses_without_delta_have_a_closed_form(r: int) -> None:
    # delta = 0, v = r: the p-value is q^r, so the bound is the eps whose q = 0.05^(1/r).
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(10 * r, r, r, 0.0) == pytest.approx(max(0.0, math.log(q / (1 - q))), abs=1e-5)


def test_perfect_guesses_give_a_bound_that_grows_with_r() -> None:
    bounds = [epsilon_lower_bound(1000, r, r, 1e-5) for r in (5, 10, 20, 50, 100, 200)]
    assert bounds[0] > 0
    assert all(b2 > b1 + 0.3 for b1, b2 in itertools.pairwise(bounds))
    assert 3.3 < bounds[4] < 3.6  # 100 of 100 right, m = 1000, delta 1e-5: about 3.47


def test_bound_is_monotonic_in_the_number_of_correct_guesses() -> None:
    r = 100
    bounds = [epsilon_lower_bound(1000, r, v, 1e-5) for v in range(r + 1)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    assert all(b == 0.0 for b in bounds[: r // 2 + 1])  # no better than chance: no evidence
    assert bounds[-1] > bounds[90] > bounds[75] > 0


def test_bound_is_the_first_eps_the_test_cannot_reject() -> None:
    m, r, v, delta = 1000, 200, 180, 1e-5
    eps = epsilon_lower_bound(m, r, v, delta)
    assert p_value(m, r, v, eps, delta) <= 0.05 < p_value(m, r, v, eps + 1e-4, delta)
    grid = np.linspace(0, eps, 50)
    assert all(p_value(m, r, v, float(e), delta) <= 0.05 for e in grid)  # every eps below it is rejected


def test_more_confidence_or_more_delta_means_a_smaller_bound() -> None:
    base = epsilon_lower_bound(1000, 100, 95, 1e-5, 0.95)
    assert epsilon_lower_bound(1000, 100, 95, 1e-5, 0.99) < base
    assert epsilon_lower_bound(1000, 100, 95, 1e-3, 0.95) < base
    assert epsilon_lower_bound(1000, 100, 95, 0.0, 0.95) >= base


def test_random_scores_give_a_bound_near_zero() -> None:
    bounds = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        included = draw_inclusion(1000, rng)
        res = audit_from_scores(rng.normal(size=1000), included, 100, 100, 1e-5)
        bounds.append(res.epsilon_lower_bound)
    assert max(bounds) < 0.5
    assert sum(b > 0 for b in bounds) <= 4  # a 95 % test: about 1 in 20 may be above 0


def test_bound_is_valid_for_randomised_response() -> None:
    # Each canary's score is its bit through eps-DP randomised response (plus a tie-breaker): an eps=1 mechanism.
    eps, trials, above = 1.0, 40, 0
    for seed in range(trials):
        rng = np.random.default_rng(1000 + seed)
        included = draw_inclusion(200, rng)
        keep = rng.random(200) < math.exp(eps) / (1 + math.exp(eps))
        said_in = np.where(keep, included, ~included)
        scores = said_in.astype(float) + 1e-3 * rng.random(200)
        res = audit_from_scores(scores, included, 50, 50, 0.0)
        above += res.epsilon_lower_bound > eps
    assert above <= 6  # expected at most 2 of 40 at 95 % confidence


def test_guesses_take_the_extremes_and_break_ties_by_index() -> None:
    scores = np.array([0.5, 3.0, -1.0, 2.0, 0.5, -2.0, 0.5])
    g = make_guesses(scores, 2, 2)
    assert g.tolist() == [0, 1, -1, 1, 0, -1, 0]
    ties = make_guesses(np.zeros(6), 2, 2)
    assert ties.tolist() == [-1, -1, 0, 0, 1, 1]
    assert make_guesses(scores, 0, 0).tolist() == [0] * 7
    included = np.array([False, True, False, False, True, True, False])
    assert count_correct(g, included) == (4, 2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_guesses(np.zeros(4), 3, 2), "only 4 canaries"),
        (lambda: make_guesses(np.array([0.0, np.nan]), 1, 0), "finite"),
        (lambda: make_guesses(np.zeros((2, 2)), 1, 0), "1-D"),
        (lambda: count_correct(np.array([2, 0]), np.array([True, False])), "abstain"),
        (lambda: count_correct(np.array([1, 0]), np.array([1, 0])), "booleans"),
        (lambda: epsilon_lower_bound(10, 5, 6, 1e-5), "correct"),
        (lambda: epsilon_lower_bound(10, 11, 6, 1e-5), "canaries"),
        (lambda: epsilon_lower_bound(10, 5, 3, 1.5), "delta"),
        (lambda: epsilon_lower_bound(10, 5, 3, 1e-5, confidence=95), "confidence"),
        (lambda: draw_inclusion(0, np.random.default_rng(0)), "canaries"),
    ],
)
def test_bad_input_is_refused_with_a_reason(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_inclusion_is_a_fair_coin_per_canary() -> None:
    bits = draw_inclusion(20_000, np.random.default_rng(7))
    assert bits.dtype == bool and abs(bits.mean() - 0.5) < 0.02


# ---------------------------------------------------------------------------------------------- the run


def _audit(**kw):
    from privatune.simulations.canary_audit import CanarySettings, run_canary_audit

    return run_canary_audit(CanarySettings(**kw))


def test_canaries_are_out_of_distribution_with_fixed_labels() -> None:
    from privatune.simulations.canary_audit import make_canaries

    names = tuple(str(i) for i in range(10))
    a = make_canaries("image", names, 50, np.random.default_rng(3))
    b = make_canaries("image", names, 50, np.random.default_rng(3))
    assert a.fingerprint() == b.fingerprint() and a.inputs.shape == (50, 1, 28, 28)
    assert len(np.unique(a.inputs)) == 2  # lit or dark pixels, nothing like a digit's grey strokes
    texts = make_canaries("text", ("x", "y"), 20, np.random.default_rng(3))
    assert len(set(texts.inputs)) == 20 and set(texts.labels.tolist()) <= {0, 1}


@pytest.fixture(scope="module")
def head_runs():
    """The same small audit with DP off and on; head mode on cached digits features, 320 steps (a few s each)."""
    common = dict(preset="digits", mode="head", canaries=200, epochs=40, batch_size=64, lr=0.2)
    return _audit(dp=False, **common), _audit(dp=True, epsilon=8.0, **common)


def test_without_dp_the_bound_is_far_above_zero(head_runs) -> None:
    off, on = head_runs
    assert math.isinf(off.epsilon_claimed) and off.noise_multiplier == 0.0
    assert off.epsilon_lower_bound > 1.0
    assert off.epsilon_lower_bound > on.epsilon_lower_bound + 1.0
    assert off.canary_loss_in < off.canary_loss_out  # the model memorised its canaries
    assert not off.violation  # an infinite claim cannot be exceeded


def test_with_dp_the_bound_is_at_or_below_the_claim(head_runs) -> None:
    _, on = head_runs
    assert on.noise_multiplier > 0
    assert on.epsilon_lower_bound <= on.epsilon_claimed and not on.violation
    # The claim is the accountant's epsilon of exactly the mechanism the client ran.
    per_epoch = steps_per_epoch(on.train_records, on.batch_size)
    assert on.steps == on.epochs * per_epoch and on.sample_rate == pytest.approx(1 / per_epoch)
    assert on.epsilon_claimed == epsilon_of([(on.noise_multiplier, on.sample_rate, on.steps)], on.delta, "rdp")
    assert on.epsilon_claimed <= 8.0
    assert on.train_records == on.client_records + on.audit.included


@pytest.mark.slow
def test_default_partial_mode_without_and_with_dp() -> None:
    """The default mode (the CNN's last block + head) with a few epochs: about 5 s off, 10 s on."""
    off = _audit(preset="digits", canaries=200, epochs=5, dp=False)
    on = _audit(preset="digits", canaries=200, epochs=5, dp=True, epsilon=8.0)
    assert off.mode == on.mode == "last-k"  # partial is last-k with k=1 (RunConfig canonicalises it)
    assert off.epsilon_lower_bound > 2.0
    assert on.epsilon_lower_bound <= on.epsilon_claimed and not on.violation
    assert off.epsilon_lower_bound > on.epsilon_lower_bound + 1.5


def test_a_bound_above_the_claim_is_reported_loudly(monkeypatch, tmp_path: Path) -> None:
    """Simulate an accountant that under-reports: the audit must call it a bug and exit 1."""
    from typer.testing import CliRunner

    import privatune.simulations.canary_audit as ca
    from privatune.cli import app

    monkeypatch.setattr(ca, "epsilon_of", lambda history, delta, accountant="rdp": 0.25)
    out = tmp_path / "audit.json"
    result = CliRunner().invoke(
        app, ["canary-audit", "--mode", "head", "--canaries", "200", "--no-dp", "--json", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert "BUG" in result.output and "exceeds the claimed epsilon" in result.output
    data = json.loads(out.read_text())
    assert data["violation"] is True and data["epsilon_lower_bound"] > 0.25


@pytest.mark.parametrize(
    "args, message",
    [
        (["--canaries", "1"], "--canaries"),
        (["--canaries", "10", "--k", "6"], "--k"),
        (["--mode", "everything"], "--mode"),
        (["--epsilon", "0"], "--epsilon"),
        (["--preset", "imagenet"], "unknown preset"),
        (["--client", "3"], "--client"),
        (["--clients", "5000"], "cannot split"),
    ],
)
def test_bad_settings_are_refused_before_training(args, message) -> None:
    from typer.testing import CliRunner

    from privatune.cli import app

    result = CliRunner().invoke(app, ["canary-audit", *args])
    assert result.exit_code == 2 and message in result.output, result.output


# ------------------------------------------------------------------ `privatune audit`: the 80-column summary


def test_audit_summary_fits_an_80_column_terminal(tmp_path: Path) -> None:
    """Not a canary test: the compact `privatune audit` view (common.audit.render_table), which this work changed."""
    from rich.console import Console

    from privatune.common.audit import audit_paths, render_table
    from tests.helpers.federation_ledgers import SGD, federate, sql

    federate(tmp_path, rounds=3, run_id="765349905569732518", mech=SGD, max_epsilon=50.0)

    def show(entries: bool = False) -> list[str]:
        console = Console(width=80, record=True, color_system=None)
        console.print(render_table(audit_paths([tmp_path]), entries=entries))
        return console.export_text().splitlines()

    lines = show()
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "PASS" in text and "site-s1.ledger.sqlite" in text and "server.ledger.sqlite" in text
    report = audit_paths([tmp_path])
    last = [e for e in report.entries if e.party == "s2" and e.source == "site"][-1]
    row = next(line for line in lines if line.split()[:2] == ["site", "s2"])
    assert row.split()[3:] == [
        "3",
        f"{last.epsilon_reported:.3f}",
        f"{last.epsilon_rdp:.3f}",
        f"{last.epsilon_prv:.3f}",
        f"{last.epsilon_pld:.3f}",
        "ok",
    ]

    sql(tmp_path / "site-s1.ledger.sqlite", "DELETE FROM spend WHERE seq = 2")
    text = "\n".join(show())
    assert "BROKEN" in text and "FAIL" in text
    wide = "\n".join(show(entries=True))
    assert "σ" in wide and "chain-deleted" not in text
