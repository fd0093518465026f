"""The statistics of a one-training-run privacy audit (Steinke, Nasr and Jagielski, 2023).

The experiment: ``m`` canaries, each put into the training set independently with probability 1/2 (the bits
``S``); after one training run an auditor scores every canary (higher = "looks like a member"), guesses "in" for
the ``k+`` highest scores, "out" for the ``k-`` lowest and abstains on the rest. Of the ``r = k+ + k-`` guesses,
``v`` are correct. A mechanism that is (eps, delta)-DP with respect to adding or removing one canary cannot make
many correct guesses; their Theorem 3.1 bounds how many:

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, q) >= u],  q = e^eps / (1 + e^eps),

where ``W`` is the number of correct guesses. The right-hand side (capped at 1) is the p-value of the observed
``v`` under the hypothesis "the training run is (eps, delta)-DP". We reject every eps whose p-value is at most
``1 - confidence`` and report

    eps_lb = inf { eps >= 0 : p_value(eps) > 1 - confidence },

so every eps below ``eps_lb`` is rejected: with probability at least ``confidence`` (over the canary coin flips
and the training randomness) the run is not (eps, delta)-DP for any eps < eps_lb. Taking the *first* eps whose
p-value exceeds the level (rather than the last) keeps the bound valid even where the delta term makes the
p-value non-monotone in eps. A lower bound above the epsilon the accountant claims proves a bug.

Everything here is pure numpy/scipy: no model, no training. The run itself lives in
:mod:`privatune.simulations.canary_audit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "CanaryAuditResult",
    "audit_from_scores",
    "count_correct",
    "draw_inclusion",
    "epsilon_lower_bound",
    "fit_noise_scale",
    "guesses_for_claim",
    "make_guesses",
    "p_value",
    "perfect_guess_bound",
    "subsampled_gaussian_llr",
]

# Above this eps, q = e^eps/(1+e^eps) is 1.0 in double precision: every guess is "allowed" to be right.
_EPS_CAP = 40.0
_COARSE_STEP = 0.25
_GRID_STEP = 0.01
_BISECT_TOL = 1e-7


@dataclass(frozen=True)
class CanaryAuditResult:
    """What one audit observed and concluded."""

    m: int  # canaries
    included: int  # how many of them were in the training set
    k_plus: int
    k_minus: int
    guesses: int  # r = k_plus + k_minus
    correct: int  # v
    delta: float
    confidence: float
    epsilon_lower_bound: float

    @property
    def accuracy(self) -> float:
        """Fraction of the non-abstaining guesses that were right (nan when there were none)."""
        return self.correct / self.guesses if self.guesses else math.nan


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(
            f"need 0 <= correct (v={v}) <= guesses (r={r}) <= canaries (m={m}): a guess is made about a canary, "
            "and a correct guess is a guess"
        )


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 <= float(delta) < 1.0:
        raise ValueError(f"delta must be a number in [0, 1), got {delta!r}")
    return float(delta)


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    return float(confidence)


def _p_values(m: int, r: int, v: int, eps: np.ndarray, delta: float) -> np.ndarray:
    """The Theorem 3.1 bound on P[W >= v] for each eps in ``eps`` (1-D), capped at 1."""
    eps = np.asarray(eps, dtype=np.float64).reshape(-1)
    if v == 0:
        return np.ones_like(eps)  # zero correct guesses is no evidence at all
    q = 1.0 / (1.0 + np.exp(-eps))  # accuracy of eps-DP randomised response
    tail = stats.binom.sf(v - 1, r, q)  # f(v) = P[Bin(r, q) >= v]
    if delta == 0.0:
        return np.minimum(tail, 1.0)
    # (f(v - i) - f(v)) = P[v - i <= Bin(r, q) < v] = sum of the pmf over v-1 down to v-i.
    below = np.arange(v - 1, -1, -1)  # v-1, v-2, ..., 0
    pmf = stats.binom.pmf(below[None, :], r, q[:, None])
    window = np.cumsum(pmf, axis=1) / np.arange(1, v + 1)[None, :]
    return np.minimum(tail + 2.0 * m * delta * window.max(axis=1), 1.0)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability bound of ``>= v`` correct guesses out of ``r`` (``m`` canaries) for an (eps, delta)-DP run.

    The formula is in the module docstring (Steinke, Nasr, Jagielski 2023, Theorem 3.1).
    """
    _check_counts(m, r, v)
    delta = _check_delta(delta)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(_p_values(m, r, v, np.array([float(eps)]), delta)[0])


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The empirical epsilon lower bound: the first eps whose p-value exceeds ``1 - confidence`` (0 if eps = 0 does).

    A grid scan (step 0.25, then 0.01 inside the interval found) finds the first grid point above the level;
    bisection refines the crossing in the step before it to 1e-7. The p-value is non-decreasing in eps wherever we
    have looked (exactly so for delta = 0); the scan assumes it only within one coarse step.
    """
    _check_counts(m, r, v)
    delta = _check_delta(delta)
    level = 1.0 - _check_confidence(confidence)
    if _p_values(m, r, v, np.zeros(1), delta)[0] > level:
        return 0.0
    lo, hi = 0.0, _EPS_CAP  # invariant: p(lo) <= level; at _EPS_CAP, q == 1.0 and the p-value is 1
    for step in (_COARSE_STEP, _GRID_STEP):  # first grid point above the level, coarse then fine
        grid = np.arange(lo, hi + step / 2, step)
        above = _p_values(m, r, v, grid, delta) > level
        if not above.any():  # unreachable for v <= r (see _EPS_CAP)
            return float(grid[-1])
        first = int(np.argmax(above))
        lo, hi = float(grid[first - 1]), float(grid[first])  # p(lo) <= level < p(hi)
    while hi - lo > _BISECT_TOL:
        mid = 0.5 * (lo + hi)
        if _p_values(m, r, v, np.array([mid]), delta)[0] > level:
            hi = mid
        else:
            lo = mid
    return lo


def draw_inclusion(m: int, rng: np.random.Generator) -> np.ndarray:
    """The canaries' coin flips: a boolean [m], each True with probability 1/2, independently."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"the number of canaries must be an integer >= 1, got {m!r}")
    return rng.random(int(m)) < 0.5


def make_guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("was in") for the ``k_plus`` highest scores, -1 ("was out") for the ``k_minus`` lowest, 0 elsewhere.

    Ties are broken by canary index (a stable sort), never by anything that depends on the inclusion bits, so the
    guesses are a function of the trained model alone -- what the theorem requires.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))[:5].tolist()
        raise ValueError(f"scores must be finite; canaries {bad} are not (a diverged model?)")
    for name, k in (("k_plus", k_plus), ("k_minus", k_minus)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {k!r}")
    if k_plus + k_minus > s.size:
        raise ValueError(f"k_plus + k_minus = {k_plus + k_minus} guesses but only {s.size} canaries")
    order = np.argsort(s, kind="stable")  # ascending
    guesses = np.zeros(s.size, dtype=np.int8)
    if k_minus:
        guesses[order[:k_minus]] = -1
    if k_plus:
        guesses[order[s.size - k_plus :]] = 1
    return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(r, v): the number of non-abstaining guesses and how many of them were right."""
    g = np.asarray(guesses)
    inc = np.asarray(included)
    if g.shape != inc.shape or g.ndim != 1:
        raise ValueError(f"guesses {g.shape} and inclusion bits {inc.shape} must be 1-D arrays of the same length")
    if inc.dtype != bool:
        raise ValueError(f"inclusion bits must be booleans, got dtype {inc.dtype}")
    if not np.isin(g, (-1, 0, 1)).all():
        raise ValueError("guesses must be -1 (out), 0 (abstain) or +1 (in)")
    truth = np.where(inc, 1, -1)
    r = int(np.count_nonzero(g))
    v = int(np.count_nonzero(g == truth))
    return r, v


def audit_from_scores(
    scores: np.ndarray,
    included: np.ndarray,
    k_plus: int,
    k_minus: int,
    delta: float,
    confidence: float = 0.95,
) -> CanaryAuditResult:
    """Guess from the scores, count the correct guesses and turn them into an epsilon lower bound.

    ``k_plus`` and ``k_minus`` must be fixed before the scores are seen: choosing them to maximise the bound would
    be a multiple test the confidence does not cover.
    """
    inc = np.asarray(included)
    guesses = make_guesses(scores, k_plus, k_minus)
    r, v = count_correct(guesses, inc)
    m = int(inc.size)
    return CanaryAuditResult(
        m=m,
        included=int(inc.sum()),
        k_plus=int(k_plus),
        k_minus=int(k_minus),
        guesses=r,
        correct=v,
        delta=float(delta),
        confidence=float(confidence),
        epsilon_lower_bound=epsilon_lower_bound(m, r, v, delta, confidence),
    )


# ------------------------------------------------------------------------------- white-box (gradient) canaries


def perfect_guess_bound(m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The most an audit with ``m`` canaries and ``r`` guesses can show: the lower bound when all ``r`` are right.

    A bound at this cap says "the attack guessed perfectly"; the true epsilon may be anything above it, so a
    claim above the cap cannot be refuted with this many canaries, however broken the mechanism.
    """
    return epsilon_lower_bound(m, r, r, delta, confidence)


def subsampled_gaussian_llr(x: np.ndarray, sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Log-likelihood ratio, per canary, of one DP-SGD step's observation ``x`` (clip-norm units).

    "In": the canary's clipped gradient (1 on its coordinate) was in the step with probability ``sample_rate``,
    plus Gaussian noise of std ``noise_multiplier``; "out": the noise alone. Summed over steps this is the
    Neyman-Pearson score for a Dirac canary under the *claimed* mechanism; with ``sample_rate`` 1 it is an
    increasing affine function of ``x``, so it ranks canaries as the plain sum of their updates does.
    """
    q, s = float(sample_rate), float(noise_multiplier)
    if not 0.0 < q <= 1.0 or not s > 0.0:
        raise ValueError(f"need 0 < sample_rate <= 1 and noise_multiplier > 0, got q={q}, sigma={s}")
    z = (np.asarray(x, dtype=np.float64) - 0.5) / (s * s)
    if q == 1.0:
        return z
    return np.logaddexp(math.log1p(-q), math.log(q) + z)


def fit_noise_scale(x: np.ndarray, floor: float = 1e-3) -> float:
    """Robust standard deviation of one step's canary observations (1.4826 x median absolute deviation).

    The Dirac canaries' coordinates carry noise alone except for the few canaries sampled in the step, so the
    median absolute deviation measures the noise the mechanism actually added, whatever it claims. ``floor``
    keeps a likelihood ratio finite when the noise was removed (a replayed seed).
    """
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError("need a non-empty, finite array of observations to fit the noise scale")
    return max(1.4826 * float(np.median(np.abs(v - np.median(v)))), float(floor))


GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2)


def guesses_for_claim(m: int, claim: float, delta: float, confidence: float = 0.95, headroom: float = 1.2) -> int:
    """How many "in" guesses an audit of ``claim`` should make with ``m`` canaries, fixed before any score is seen.

    Few guesses are the most precise, but their perfect-guessing cap may sit below the claim, and then no bug can
    be proven. Takes the smallest fraction of ``m`` in :data:`GUESS_FRACTIONS` whose cap is at least
    ``headroom x claim``, else the one with the highest cap. Depends on ``m``, the claim and delta alone.
    """
    best, best_cap = 1, -1.0
    for fraction in GUESS_FRACTIONS:
        r = max(int(m * fraction), 1)
        cap = perfect_guess_bound(m, r, delta, confidence)
        if cap >= headroom * claim:
            return r
        if cap > best_cap:
            best, best_cap = r, cap
    return best
