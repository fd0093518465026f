"""Privacy accounting over Opacus' accountants: composition across rounds, calibration, input checks."""

from __future__ import annotations

import math

import pytest
from torch.utils.data import DataLoader

from common.accounting import (
    ACCOUNTANTS,
    AccountingError,
    calibrate_noise,
    compose,
    default_delta,
    epsilon_of,
    normalise,
    sample_rate,
    steps_per_epoch,
)

DELTA = 1e-5
ROUND = (1.1, 0.05, 20)  # one round: 20 steps at q = 0.05


def test_empty_history_spends_nothing() -> None:
    for acc in ACCOUNTANTS:
        assert epsilon_of([], DELTA, acc) == 0.0
        assert epsilon_of([(1.0, 0.1, 0)], DELTA, acc) == 0.0


def test_no_noise_is_infinite() -> None:
    for acc in ACCOUNTANTS:
        assert epsilon_of([ROUND, (0.0, 0.1, 3)], DELTA, acc) == math.inf


def test_r_rounds_compose_like_one_run_of_r_times_the_steps() -> None:
    from opacus.accountants import RDPAccountant

    for rounds in (1, 3, 10):
        history: list = []
        for _ in range(rounds):
            history = compose(history, ROUND)
        one_run = RDPAccountant()
        for _ in range(rounds * ROUND[2]):  # what Opacus records when the same run takes every step
            one_run.step(noise_multiplier=ROUND[0], sample_rate=ROUND[1])
        assert history == one_run.history
        assert epsilon_of(history, DELTA, "rdp") == pytest.approx(one_run.get_epsilon(DELTA), abs=1e-9)
        # the split history (one entry per round, as a ledger stores it) gives the same number
        assert epsilon_of([ROUND] * rounds, DELTA, "rdp") == pytest.approx(one_run.get_epsilon(DELTA), abs=1e-9)


def test_prv_composes_like_one_run() -> None:
    from opacus.accountants import PRVAccountant

    one_run = PRVAccountant()
    one_run.history = [(ROUND[0], ROUND[1], 3 * ROUND[2])]
    assert epsilon_of([ROUND] * 3, DELTA, "prv") == pytest.approx(one_run.get_epsilon(DELTA), abs=1e-9)


def test_epsilon_grows_with_rounds_and_prv_is_tighter() -> None:
    rdp = [epsilon_of([ROUND] * r, DELTA, "rdp") for r in (1, 2, 4, 8)]
    prv = [epsilon_of([ROUND] * r, DELTA, "prv") for r in (1, 2, 4, 8)]
    assert all(a < b for a, b in zip(rdp, rdp[1:]))
    assert all(a < b for a, b in zip(prv, prv[1:]))
    assert all(p <= r * 1.01 for p, r in zip(prv, rdp))


def test_heterogeneous_history_is_order_free() -> None:
    a, b = (1.0, 0.1, 10), (2.0, 0.2, 5)
    for acc in ACCOUNTANTS:
        assert epsilon_of([a, b, a], DELTA, acc) == pytest.approx(epsilon_of([a, a, b], DELTA, acc), abs=1e-9)
    assert normalise([a, b, a, (3.0, 0.1, 0)]) == [(1.0, 0.1, 20), (2.0, 0.2, 5)]


def test_compose_merges_like_opacus() -> None:
    assert compose([], ROUND) == [ROUND]
    assert compose([ROUND], ROUND) == [(1.1, 0.05, 40)]
    other = (2.0, 0.05, 1)
    assert compose([ROUND], other) == [ROUND, other]
    assert compose([ROUND, other], ROUND) == [ROUND, other, ROUND]  # only the last entry merges
    history = [ROUND]
    compose(history, ROUND)
    assert history == [ROUND]  # not mutated


@pytest.mark.parametrize("acc", ACCOUNTANTS)
def test_calibrate_noise_reaches_target(acc: str) -> None:
    target, q, steps = 3.0, 0.02, 150
    sigma = calibrate_noise(target, DELTA, q, steps, acc)
    reached = epsilon_of([(sigma, q, steps)], DELTA, acc)
    assert reached <= target
    assert reached > target - 0.05  # tight, not wildly over-noised
    assert epsilon_of([(sigma * 0.9, q, steps)], DELTA, acc) > target


def test_calibrate_noise_for_more_steps_needs_more_noise() -> None:
    assert calibrate_noise(2.0, DELTA, 0.05, 200) > calibrate_noise(2.0, DELTA, 0.05, 20)


def test_steps_and_sample_rate_match_the_dataloader_opacus_uses() -> None:
    for n, batch in ((1000, 64), (64, 64), (65, 64), (10, 64), (1, 1)):
        loader = DataLoader(list(range(n)), batch_size=batch)
        assert steps_per_epoch(n, batch) == len(loader) == math.ceil(n / batch)
        assert sample_rate(n, batch) == 1 / len(loader)
    assert sample_rate(10, 64) == 1.0


def test_default_delta_stays_below_one_over_n() -> None:
    assert default_delta(1000) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    for n in (1, 10, 5_000, 10**7):
        assert default_delta(n) < 1 / n


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: calibrate_noise(0.0, DELTA, 0.1, 10), "target_epsilon"),
        (lambda: calibrate_noise(-1.0, DELTA, 0.1, 10), "target_epsilon"),
        (lambda: calibrate_noise(math.inf, DELTA, 0.1, 10), "target_epsilon"),
        (lambda: calibrate_noise(1.0, 0.0, 0.1, 10), "delta"),
        (lambda: calibrate_noise(1.0, 1.0, 0.1, 10), "delta"),
        (lambda: calibrate_noise(1.0, DELTA, 0.0, 10), "sample_rate"),
        (lambda: calibrate_noise(1.0, DELTA, 1.5, 10), "sample_rate"),
        (lambda: calibrate_noise(1.0, DELTA, 0.1, 0), "steps"),
        (lambda: calibrate_noise(1.0, DELTA, 0.1, 10, "gdp"), "accountant"),
        (lambda: epsilon_of([ROUND], 0.0), "delta"),
        (lambda: epsilon_of([ROUND], 1.5), "delta"),
        (lambda: epsilon_of([(1.0, 0.0, 5)], DELTA), "sample_rate"),
        (lambda: epsilon_of([(1.0, 1.01, 5)], DELTA), "sample_rate"),
        (lambda: epsilon_of([(-1.0, 0.1, 5)], DELTA), "noise_multiplier"),
        (lambda: epsilon_of([(1.0, 0.1, -5)], DELTA), "steps"),
        (lambda: epsilon_of([(1.0, 0.1, 2.5)], DELTA), "steps"),
        (lambda: epsilon_of([(1.0, 0.1)], DELTA), "triple"),
        (lambda: epsilon_of([ROUND], DELTA, "gdp"), "accountant"),
        (lambda: compose([], (1.0, 2.0, 1)), "sample_rate"),
        (lambda: steps_per_epoch(0, 8), "num_records"),
        (lambda: steps_per_epoch(8, 0), "batch_size"),
        (lambda: default_delta(0), "num_records"),
    ],
)
def test_bad_input_is_refused_clearly(call, match: str) -> None:
    with pytest.raises(AccountingError, match=match):
        call()


def test_unreachable_target_is_a_clear_error() -> None:
    with pytest.raises(AccountingError, match="cannot reach epsilon"):
        calibrate_noise(1e-9, DELTA, 1.0, 10_000)


def test_prv_refuses_a_grid_it_cannot_afford() -> None:
    """Tiny noise makes Opacus' PRV grid enormous (tens of seconds, gigabytes); we refuse instead."""
    with pytest.raises(AccountingError, match="use accountant 'rdp'"):
        epsilon_of([(0.05, 0.5, 100)], DELTA, "prv")
    assert epsilon_of([(0.05, 0.5, 100)], DELTA, "rdp") > 1000
