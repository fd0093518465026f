"""The memoised accounting (common/accountants/memo.py) returns Opacus' own floats, bit for bit: the default
simulation's epsilons must not move by a digit for being computed faster."""

from __future__ import annotations

import time
import warnings

import pytest

from privatune.common.accountants import PRVAccountant, RDPAccountant
from privatune.common.accountants.memo import _one_step_rdp, _safe_domain, prv_domain, rdp_epsilon
from privatune.common.accountants.prv import PRV_EPS_ERROR, prv_grid_size
from privatune.common.accounting import calibrate_noise

# (noise, sample rate, steps) histories like a site's: one round, rounds merged, two mechanisms, sample rate 1.
HISTORIES = [
    [(1.1, 0.15, 35)],
    [(1.1, 0.15, 35), (2.0, 0.05, 100)],
    [(3.0, 1.0, 4)],
]


def _opacus(kind: str, history, delta: float) -> float:
    from opacus.accountants import PRVAccountant as OpacusPRV
    from opacus.accountants import RDPAccountant as OpacusRDP

    acc = OpacusPRV() if kind == "prv" else OpacusRDP()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@pytest.mark.parametrize("history", HISTORIES)
def test_epsilons_are_opacus_own_to_the_last_bit(history):
    delta = 1e-5
    for _ in range(2):  # the second time from the memo
        assert PRVAccountant().epsilon(history, delta) == _opacus("prv", history, delta)
        assert RDPAccountant().epsilon(history, delta) == _opacus("rdp", history, delta)
        assert rdp_epsilon(history, delta) == _opacus("rdp", history, delta)


@pytest.mark.parametrize("history", HISTORIES)
def test_the_grid_is_opacus_grid(history):
    from opacus.accountants import PRVAccountant as OpacusPRV
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    delta_error = 1e-5 / 1000
    theirs = OpacusPRV()._get_domain(
        prvs=[PoissonSubsampledGaussianPRV(rate, noise) for noise, rate, _ in history],
        num_self_compositions=[steps for _, _, steps in history],
        eps_error=PRV_EPS_ERROR,
        delta_error=delta_error,
    )
    ours = prv_domain(history, PRV_EPS_ERROR, delta_error)
    assert (ours.t_min, ours.t_max, ours.size, ours.shifts) == (theirs.t_min, theirs.t_max, theirs.size, theirs.shifts)
    assert prv_grid_size(history, 1e-5) == theirs.size


def test_the_grid_is_computed_once_for_the_size_check_and_the_epsilon():
    _safe_domain.cache_clear()
    _one_step_rdp.cache_clear()
    history = [(1.234, 0.0913, 120)]
    PRVAccountant().epsilon(history, 1e-5)
    assert _safe_domain.cache_info().misses == 1 and _safe_domain.cache_info().hits == 1
    # compute_safe_domain_size asks for the one-step RDP of the mechanism twice (the composition, then alone)
    assert _one_step_rdp.cache_info().misses == 1 and _one_step_rdp.cache_info().hits == 1


def test_a_later_round_reuses_the_calibrated_mechanism():
    """Round r composes r rounds of the calibrated (noise, rate): its one-step RDP is already known."""
    rate, steps = 64 / 433, 35
    sigma = calibrate_noise(8.0, 1e-5, rate, steps * 5)
    PRVAccountant().epsilon([(sigma, rate, steps)], 1e-5)
    start = time.perf_counter()
    before = _one_step_rdp.cache_info().misses
    eps = PRVAccountant().epsilon([(sigma, rate, 2 * steps)], 1e-5)
    assert _one_step_rdp.cache_info().misses == before
    assert eps == _opacus("prv", [(sigma, rate, 2 * steps)], 1e-5)
    assert time.perf_counter() - start < 5.0  # no RDP series left to sum: the PRV convolution alone
