"""Privacy accounting: composition across rounds, calibration, input checks, and each accountant checked against
an independent one (dp-accounting's PLD for Opacus', Opacus' PRV for PLD)."""

from __future__ import annotations

import itertools
import math

import pytest
from torch.utils.data import DataLoader

from privatune.common.accountants import DEFAULT_ACCOUNTANT, get_accountant, independent_of
from privatune.common.accounting import (
    ACCOUNTANTS,
    TARGET_EPSILON_MAX,
    TARGET_EPSILON_MIN,
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
    assert all(a < b for a, b in itertools.pairwise(rdp))
    assert all(a < b for a, b in itertools.pairwise(prv))
    assert all(p <= r * 1.01 for p, r in zip(prv, rdp, strict=True))


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
    for acc in ("rdp", "pld"):  # PRV is exercised in the tests around; these two are fast
        assert calibrate_noise(2.0, DELTA, 0.05, 200, acc) > calibrate_noise(2.0, DELTA, 0.05, 20, acc)


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
    # 10^8 full-batch steps: even sigma 1e6 leaves epsilon above 0.01
    with pytest.raises(AccountingError, match="cannot reach epsilon"):
        calibrate_noise(TARGET_EPSILON_MIN, DELTA, 1.0, 10**8, "rdp")


@pytest.mark.parametrize("target", [1e308, 1e-300, 1e-9, 1e3, math.nan])
@pytest.mark.parametrize("acc", ACCOUNTANTS)
def test_absurd_targets_fail_at_once_naming_the_range(target: float, acc: str) -> None:
    """Opacus' own search never ends for a huge target with PRV; ours refuses up front."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(AccountingError, match=r"target_epsilon must be a number in \[0.01, 100\]"):
        calibrate_noise(target, DELTA, 0.1, 100, acc)
    assert time.perf_counter() - t0 < 0.1


def test_extreme_targets_inside_the_range_calibrate_without_overshooting() -> None:
    for target in (TARGET_EPSILON_MIN, TARGET_EPSILON_MAX):
        sigma = calibrate_noise(target, DELTA, 1.0, 10, "pld")
        assert epsilon_of([(sigma, 1.0, 10)], DELTA, "pld") <= target


def test_prv_refuses_a_grid_it_cannot_afford() -> None:
    """Tiny noise makes Opacus' PRV grid enormous (tens of seconds, gigabytes); we refuse instead."""
    with pytest.raises(AccountingError, match="use accountant 'rdp'"):
        epsilon_of([(0.05, 0.5, 100)], DELTA, "prv")
    assert epsilon_of([(0.05, 0.5, 100)], DELTA, "rdp") > 1000


# ------------------------------------------------------------------------------------ accountants vs independent

# The mechanisms of every mode, at epsilons from about 1 to 10 (sigma, q, steps, as a client records them):
MODE_MECHANISMS = {
    "head, large q, many steps": [(0.9, 1 / 12, 125)],
    "head, q 1/3": [(1.9, 1 / 3, 75)],
    "partial, B 32 on 10k records": [(1.0, 0.01, 1500)],
    "full, B 128": [(2.0, 0.25, 100)],
    "small n (q = 1)": [(3.0, 1.0, 10)],
    "q = 1, many epochs": [(5.0, 1.0, 25)],
    "five rounds composed": [(1.2, 0.04, 25)] * 5,
    "mixed rounds (noise changed)": [(1.2, 0.04, 25), (2.0, 0.1, 10), (1.2, 0.04, 25)],
}


def test_registry_names_default_and_independent_pairs() -> None:
    assert DEFAULT_ACCOUNTANT == "prv" and set(ACCOUNTANTS) == {"prv", "rdp", "pld"}
    assert {get_accountant(a).library for a in ACCOUNTANTS} == {"opacus", "dp-accounting"}
    assert independent_of("prv") == independent_of("rdp") == "pld" and independent_of("pld") == "prv"
    for a in ACCOUNTANTS:
        assert get_accountant(a).library != get_accountant(independent_of(a)).library
    with pytest.raises(AccountingError, match="unknown accountant 'gdp'"):
        independent_of("gdp")


@pytest.mark.parametrize("mode", list(MODE_MECHANISMS))
def test_reported_epsilon_is_within_5_percent_of_an_independent_pld(mode: str) -> None:
    history = MODE_MECHANISMS[mode]
    pld = epsilon_of(history, DELTA, "pld")
    prv = epsilon_of(history, DELTA, "prv")
    rdp = epsilon_of(history, DELTA, "rdp")
    assert 0.5 < pld < 20
    assert pld / 1.05 <= prv <= pld * 1.05, (mode, prv, pld)
    # PLD run by hand, straight from dp-accounting (no code of ours), agrees with our PLD accountant
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    fine = acc.get_epsilon(DELTA)
    assert fine <= pld <= fine * 1.01  # ours is the pessimistic 1e-3 grid: above, and within 1 %
    # RDP is an upper bound, and a loose one: 3-25 % above PLD for these mechanisms
    assert pld * 1.03 <= rdp <= pld * 1.25, (mode, rdp / pld)


def test_pld_accounted_epsilon_is_within_5_percent_of_opacus_prv() -> None:
    for history in (MODE_MECHANISMS["head, large q, many steps"], MODE_MECHANISMS["five rounds composed"]):
        assert (
            epsilon_of(history, DELTA, "prv") / 1.05
            <= epsilon_of(history, DELTA, "pld")
            <= epsilon_of(history, DELTA, "prv") * 1.05
        )


def test_prv_calibration_needs_less_noise_than_rdp_and_is_not_over_the_pld() -> None:
    target, q, steps = 4.0, 0.25, 40
    rdp, prv = (calibrate_noise(target, DELTA, q, steps, a) for a in ("rdp", "prv"))
    assert prv < rdp * 0.97  # measured: 5-8 % less noise at the same epsilon
    assert epsilon_of([(prv, q, steps)], DELTA, "prv") <= target
    assert epsilon_of([(prv, q, steps)], DELTA, "pld") <= target * 1.01
    assert epsilon_of([(rdp, q, steps)], DELTA, "pld") < target * 0.95  # RDP over-noises


def test_pld_refuses_an_epsilon_beyond_meaning() -> None:
    with pytest.raises(AccountingError, match="use accountant 'rdp'"):
        epsilon_of([(0.05, 0.5, 100)], DELTA, "pld")
