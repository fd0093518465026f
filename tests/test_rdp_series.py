"""common/accountants/rdp_series.py is Opacus' RDP series with its terms in numpy: the floats must be Opacus' own,
bit for bit (its speed is measured in docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

import math
import random

import pytest
from opacus.accountants import RDPAccountant as OpacusRDP
from opacus.accountants.analysis import rdp as opacus_rdp

from privatune.common.accountants import rdp_series
from privatune.common.accountants.rdp_series import compute_rdp_one_step, log_a_frac

FRACTIONAL = [a for a in OpacusRDP.DEFAULT_ALPHAS if not float(a).is_integer()]
# Sample rates and noise multipliers around what sites use (q = batch / records, sigma 0.5-3), and the extremes.
GRID = [(q, s) for q in (0.001, 0.05, 0.16, 0.5, 0.99) for s in (0.3, 0.8, 1.1, 2.0, 20.0)]


@pytest.mark.parametrize(("q", "sigma"), GRID)
def test_every_fractional_order_is_opacus_float(q, sigma):
    for alpha in FRACTIONAL:
        assert log_a_frac(q, sigma, alpha) == opacus_rdp._compute_log_a_for_frac_alpha(q, sigma, alpha), alpha


def test_random_triples_and_orders_beyond_the_default_grid_match():
    rng = random.Random(20261203)
    for _ in range(40):
        q, sigma, alpha = rng.uniform(1e-4, 0.999), rng.uniform(0.3, 30.0), rng.uniform(1.01, 80.0)
        if float(alpha).is_integer():
            continue
        assert log_a_frac(q, sigma, alpha) == opacus_rdp._compute_log_a_for_frac_alpha(q, sigma, alpha)


def test_series_longer_than_one_chunk_is_summed_in_opacus_order(monkeypatch):
    """With a chunk of 3 terms every series spans many chunks: the result must not depend on the chunking."""
    expected = [opacus_rdp._compute_log_a_for_frac_alpha(0.16, 0.8, a) for a in (1.1, 1.5, 4.5)]
    monkeypatch.setattr(rdp_series, "CHUNK", 3)
    assert [log_a_frac(0.16, 0.8, a) for a in (1.1, 1.5, 4.5)] == expected


def test_one_step_rdp_matches_opacus_including_its_special_cases():
    for q, sigma in [*GRID, (0.0, 1.0), (0.3, 0.0), (1.0, 1.5)]:
        for alpha in [*OpacusRDP.DEFAULT_ALPHAS, math.inf]:
            ours, theirs = compute_rdp_one_step(q, sigma, alpha), opacus_rdp._compute_rdp(q, sigma, alpha)
            assert ours == theirs, (q, sigma, alpha)
