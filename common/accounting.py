"""Privacy accounting for DP-SGD: validated, accountant-independent front of :mod:`privatune.common.accountants`.

Both sides use these functions: the client to calibrate its noise and decide whether it may train (and what to
record in its ledger), the auditor to recompute every recorded epsilon. The maths lives in the accountants
(Opacus' PRV and RDP, dp-accounting's PLD); this module validates input, normalises histories, calibrates noise
with any of them and turns their failure modes into clear errors.

A mechanism is Opacus' accountant history format: ``(noise_multiplier, sample_rate, steps)``, i.e. ``steps``
applications of the Poisson-subsampled Gaussian mechanism with that noise multiplier and sampling rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from privatune.common.accountants import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    PRV_MAX_GRID,
    AccountingError,
    Mechanism,
    get_accountant,
    independent_of,
)

# Targets a calibration accepts. Below 0.01 the noise needed drowns any signal and the accountants' own error
# (PRV: 0.01 in epsilon) is the whole budget; above 100 the guarantee (e^100) means nothing and the tight
# accountants' grids become unaffordable. Checked up front, so 1e308 or 1e-300 fail at once instead of hanging.
TARGET_EPSILON_MIN, TARGET_EPSILON_MAX = 0.01, 100.0
# The calibration searches sigma in this range; Opacus' get_noise_multiplier gives up at 1e6 too.
SIGMA_MIN, SIGMA_MAX = 1e-2, 1e6
# The calibration stops once the epsilon reached is this close below the target (Opacus' 0.01, relative below 1)
# or sigma is known to this relative precision.
CALIBRATION_EPS_TOLERANCE = 0.01
CALIBRATION_SIGMA_PRECISION = 1e-4
# An independent recomputation may differ from the accountant a client used by the accountants' own errors:
# PRV's 0.01 in epsilon, the PLD's pessimistic discretisation (<= 1 % at 1e-3 even at 25,000 steps). A recorded
# epsilon below the independent value by more than this fraction is under-reported.
INDEPENDENT_REL_TOLERANCE = 0.02

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "INDEPENDENT_REL_TOLERANCE",
    "PRV_MAX_GRID",
    "TARGET_EPSILON_MAX",
    "TARGET_EPSILON_MIN",
    "AccountingError",
    "Mechanism",
    "calibrate_noise",
    "check_mechanism",
    "compose",
    "default_delta",
    "epsilon_of",
    "independent_of",
    "normalise",
    "sample_rate",
    "steps_per_epoch",
]


def _check_accountant(accountant: str) -> str:
    get_accountant(accountant)
    return accountant


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0:
        raise AccountingError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _check_sample_rate(sample_rate: float, where: str = "sample_rate") -> float:
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, (int, float))
        or not 0.0 < float(sample_rate) <= 1.0
    ):
        raise AccountingError(f"{where} must be a number in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AccountingError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_mechanism(mechanism: Sequence[Any], where: str = "mechanism") -> Mechanism:
    """Validate one ``(noise_multiplier, sample_rate, steps)`` triple (of any types: it may come from JSON or a
    ledger) and return it with exact Python types."""
    try:
        noise, rate, steps = mechanism
    except (TypeError, ValueError):
        raise AccountingError(
            f"{where} must be a (noise_multiplier, sample_rate, steps) triple, got {mechanism!r}"
        ) from None
    if (
        isinstance(noise, bool)
        or not isinstance(noise, (int, float))
        or not (math.isfinite(float(noise)) and float(noise) >= 0.0)
    ):
        raise AccountingError(f"{where}: noise_multiplier must be a finite number >= 0, got {noise!r}")
    rate = _check_sample_rate(rate, f"{where}: sample_rate")
    steps = _check_count(steps, f"{where}: steps", 0)
    return (float(noise), rate, steps)


def normalise(history: Sequence[Sequence[Any]]) -> list[Mechanism]:
    """Merge every mechanism with equal (noise, rate) into one entry and drop zero-step entries.

    Composition is commutative, so this changes no epsilon in theory; in practice it makes "R rounds of k steps"
    and "one run of R*k steps" the very same accountant input (bit-identical results) and keeps the PRV
    accountant's work proportional to the number of distinct mechanisms, not rounds.
    """
    merged: dict[tuple[float, float], int] = {}
    for i, mech in enumerate(history):
        noise, rate, steps = check_mechanism(mech, f"history[{i}]")
        if steps:
            merged[(noise, rate)] = merged.get((noise, rate), 0) + steps
    return [(noise, rate, steps) for (noise, rate), steps in merged.items()]


def compose(history: Sequence[Sequence[Any]], new: Sequence[Any]) -> list[Mechanism]:
    """Append ``new`` to a copy of ``history``, merging it into the last entry when (noise, rate) are equal.

    This is what Opacus' accountants do step by step, so a history built round by round looks like the one an
    accountant would hold after running all the rounds in one go.
    """
    out = [check_mechanism(m, f"history[{i}]") for i, m in enumerate(history)]
    noise, rate, steps = check_mechanism(new, "new mechanism")
    if out and out[-1][0] == noise and out[-1][1] == rate:
        out[-1] = (noise, rate, out[-1][2] + steps)
    else:
        out.append((noise, rate, steps))
    return out


def epsilon_of(history: Sequence[Sequence[Any]], delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon (at ``delta``) of the composition of every mechanism in ``history``, an upper bound.

    0.0 for an empty history (nothing spent); ``inf`` when any mechanism that took steps had no noise. The PRV value
    is Opacus' upper bound (``eps_error`` 0.01), the one Opacus reports during training.
    """
    acc = get_accountant(accountant)
    delta = _check_delta(delta)
    mechanisms = normalise(history)
    if not mechanisms:
        return 0.0
    if any(noise == 0.0 for noise, _, _ in mechanisms):
        return math.inf
    return acc.epsilon(mechanisms, delta)


def _check_target(target_epsilon: float) -> float:
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, (int, float))
        or not TARGET_EPSILON_MIN <= float(target_epsilon) <= TARGET_EPSILON_MAX
    ):
        raise AccountingError(
            f"target_epsilon must be a number in [{TARGET_EPSILON_MIN:g}, {TARGET_EPSILON_MAX:g}], got "
            f"{target_epsilon!r}: below {TARGET_EPSILON_MIN:g} no model learns and the accountants' own error is "
            f"the whole budget, above {TARGET_EPSILON_MAX:g} there is no meaningful privacy (use dp=false)"
        )
    return float(target_epsilon)


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Smallest noise multiplier (within the calibration tolerances) whose ``steps`` steps reach <= target.

    The result never overshoots under the chosen accountant:
    ``epsilon_of([(sigma, sample_rate, steps)], delta, accountant) <= target_epsilon``, because only a sigma whose
    epsilon was computed at or below the target is ever returned. A bracket in [SIGMA_MIN, SIGMA_MAX] (from RDP's
    sigma for the tight accountants), then interpolation in log(sigma) safeguarded like a bisection; a sigma the
    accountant cannot afford to evaluate (a huge epsilon) counts as too little noise.
    """
    target = _check_target(target_epsilon)
    acc = get_accountant(accountant)
    delta = _check_delta(delta)
    sample_rate = _check_sample_rate(sample_rate)
    steps = _check_count(steps, "steps", 1)

    def eps_at(sigma: float) -> float:
        try:
            return acc.epsilon([(sigma, sample_rate, steps)], delta)
        except AccountingError:
            return math.inf  # unaffordable means far above any allowed target

    tolerance = CALIBRATION_EPS_TOLERANCE * min(1.0, target)
    hi = 1.0
    if acc.name != "rdp":
        # RDP is fast and (for these mechanisms) above the tight accountants, so its sigma is a bracket that saves
        # most of the slow evaluations; it is checked like any other candidate, never trusted.
        # RDP cannot certify the smallest targets (its orders stop at 63): then start from 1 like RDP itself.
        try:
            hi = max(SIGMA_MIN, min(SIGMA_MAX, calibrate_noise(target, delta, sample_rate, steps, "rdp")))
        except AccountingError:
            hi = 1.0
    e_hi = eps_at(hi)
    while e_hi > target:
        if hi >= SIGMA_MAX:
            raise AccountingError(
                f"cannot reach epsilon {target:g} at delta {delta:g} with {steps} steps at sample rate "
                f"{sample_rate:g} ({accountant}: even noise multiplier {SIGMA_MAX:g} gives {e_hi:g}): raise the "
                "target epsilon or take fewer steps"
            )
        hi = min(hi * 2.0, SIGMA_MAX)
        e_hi = eps_at(hi)
    lo = hi / 2.0 if acc.name == "rdp" else hi * 0.9  # tight accountants need 6-8 % less noise than RDP
    while lo >= SIGMA_MIN:  # walk down until lo is too little noise
        e_lo = eps_at(lo)
        if e_lo > target:
            break
        hi, e_hi, lo = lo, e_lo, lo / 2.0
    else:
        return hi  # even SIGMA_MIN reaches the target: more noise than needed, never an overshoot
    aim = target - tolerance / 2.0  # interpolate towards the middle of the accepted band [target - tol, target]
    while target - e_hi > tolerance and hi / lo - 1.0 > CALIBRATION_SIGMA_PRECISION:
        # log(epsilon) is nearly linear in log(sigma): interpolate (a few evaluations instead of a dozen), kept
        # inside the bracket's middle 80 % so that a poor guess still shrinks it like a bisection.
        frac = 0.5
        if math.isfinite(e_lo) and e_hi > 0 and aim > 0 and e_lo > e_hi:
            frac = (math.log(e_lo) - math.log(aim)) / (math.log(e_lo) - math.log(e_hi))
            frac = min(0.9, max(0.1, frac))
        mid = math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo)))
        e_mid = eps_at(mid)
        if e_mid <= target:
            hi, e_hi = mid, e_mid
        else:
            lo, e_lo = mid, e_mid
    return hi


def steps_per_epoch(num_records: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: ``ceil(n / batch)``, which is ``len(DataLoader)`` and what Opacus uses."""
    _check_count(num_records, "num_records", 1)
    _check_count(batch_size, "batch_size", 1)
    return -(-num_records // batch_size)


def sample_rate(num_records: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus' ``make_private`` uses: ``1 / len(data_loader)``."""
    return 1.0 / steps_per_epoch(num_records, batch_size)


def default_delta(num_records: int) -> float:
    """A delta safely below ``1/n`` (a delta near 1/n allows leaking one whole record): ``min(1e-5, 0.1/n)``."""
    _check_count(num_records, "num_records", 1)
    return min(1e-5, 0.1 / num_records)
