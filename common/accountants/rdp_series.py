"""The sampled Gaussian mechanism's RDP at one order: Opacus 1.6's series, its floats bit for bit, several times faster.

Why: Opacus' ``_compute_log_a_for_frac_alpha`` evaluates its series one term at a time in Python (a scalar
``special.binom`` and two scalar ``special.log_ndtr`` calls a term, thousands of terms for the orders near 1).
It was most of a site's noise calibration in the default simulation's first round (2.2 of 2.4 s a client).

What is the same: each term is computed with the same operations in the same order, on numpy arrays of terms instead
of one float at a time (element-wise IEEE arithmetic and scipy's ufuncs give the same float for an element as for a
scalar; the logarithms stay Python's ``math.log``). The terms are then summed one by one in Opacus' order with
Opacus' ``_log_add`` / ``_log_sub`` arithmetic (inlined), and the series stops at the same term. So the result is
Opacus' float, not an approximation of it: tests/test_rdp_series.py compares the two on thousands of
(sample rate, noise, order) triples, and the memo's tests compare whole epsilons with Opacus. opacus is pinned in
pyproject.toml; a new Opacus release must be checked again by those tests.

Pure maths (numpy, scipy); no Opacus import but its integer-order series, which is already fast.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

#: Terms evaluated per numpy pass: most orders stop within 30-60 terms; orders near 1 run to thousands.
CHUNK = 64
NEG_INF = -math.inf


def _log_sub(x: float, y: float) -> float:
    """Opacus' ``_log_sub``: ``log(exp(x) - exp(y))``."""
    if x < y:
        raise ValueError("The result of subtraction must be non-negative.")
    if y == NEG_INF:
        return x
    if x == y:
        return NEG_INF
    try:
        return math.log(math.expm1(x - y)) + y
    except OverflowError:
        return x


def _accumulate(coefs: list[float], s0s: list[float], s1s: list[float], a0: float, a1: float) -> tuple[float, float]:
    """Opacus' running sums in log space, term by term in its order (``_log_add`` inlined: Python's two-argument
    ``min``/``max`` are ``y if y < x else x`` / ``y if y > x else x``)."""
    log1p, exp = math.log1p, math.exp
    for c, s0, s1 in zip(coefs, s0s, s1s, strict=True):
        if c > 0:
            lo, hi = (s0 if s0 < a0 else a0), (s0 if s0 > a0 else a0)
            a0 = hi if lo == NEG_INF else log1p(exp(lo - hi)) + hi
            lo, hi = (s1 if s1 < a1 else a1), (s1 if s1 > a1 else a1)
            a1 = hi if lo == NEG_INF else log1p(exp(lo - hi)) + hi
        else:
            a0 = _log_sub(a0, s0)
            a1 = _log_sub(a1, s1)
    return a0, a1


def _log_add(x: float, y: float) -> float:
    lo, hi = (y if y < x else x), (y if y > x else x)
    return hi if lo == NEG_INF else math.log1p(math.exp(lo - hi)) + hi


def log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """``log(A_alpha)`` for a fractional order (Mironov et al. 2019, section 3.3), as Opacus computes it."""
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1q = math.log(q), math.log(1 - q)
    scale = math.sqrt(2) * sigma
    two_var = 2 * (sigma**2)
    log_half, log_two = math.log(0.5), math.log(2)
    a0, a1 = NEG_INF, NEG_INF
    start = 0
    while True:
        i = np.arange(start, start + CHUNK, dtype=np.float64)
        coef = special.binom(alpha, i)
        try:
            log_coef = np.array([math.log(c) for c in np.abs(coef).tolist()])
        except ValueError:  # a zero coefficient past Opacus' stopping term: let Opacus' loop decide what it does
            from opacus.accountants.analysis.rdp import _compute_log_a_for_frac_alpha

            return float(_compute_log_a_for_frac_alpha(q, sigma, alpha))
        j = alpha - i
        log_t0 = log_coef + i * log_q + j * log_1q
        log_t1 = log_coef + j * log_q + i * log_1q
        # Opacus: log(0.5) + _log_erfc(x), _log_erfc(x) = log(2) + log_ndtr(-x * 2**0.5)
        log_e0 = log_half + (log_two + special.log_ndtr(-((i - z0) / scale) * 2**0.5))
        log_e1 = log_half + (log_two + special.log_ndtr(-((z0 - j) / scale) * 2**0.5))
        log_s0 = log_t0 + (i * i - i) / two_var + log_e0
        log_s1 = log_t1 + (j * j - j) / two_var + log_e1
        biggest = np.where(log_s1 > log_s0, log_s1, log_s0)  # Python's max(log_s0, log_s1)
        stops = np.flatnonzero(biggest < -30)
        end = int(stops[0]) + 1 if stops.size else CHUNK
        a0, a1 = _accumulate(coef[:end].tolist(), log_s0[:end].tolist(), log_s1[:end].tolist(), a0, a1)
        if stops.size:
            return _log_add(a0, a1)
        start += CHUNK


def compute_rdp_one_step(q: float, sigma: float, alpha: float) -> float:
    """Opacus' ``_compute_rdp(q, sigma, alpha)``: one step's RDP at ``alpha`` (same special cases, same floats)."""
    from opacus.accountants.analysis.rdp import _compute_log_a_for_int_alpha

    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if np.isinf(alpha):
        return math.inf
    if float(alpha).is_integer():
        return float(_compute_log_a_for_int_alpha(q, sigma, int(alpha)) / (alpha - 1))
    return log_a_frac(q, sigma, alpha) / (alpha - 1)
