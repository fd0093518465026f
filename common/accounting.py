"""Privacy accounting for DP-SGD: thin, validated wrappers over Opacus' accountants.

Both sides use these functions: the client to decide whether it may train (and what to record in its ledger),
the auditor to recompute every recorded epsilon independently. The maths is Opacus' own (``RDPAccountant``,
``PRVAccountant``, ``get_noise_multiplier``); this module only validates input, normalises histories and turns
Opacus' failure modes into clear errors.

A mechanism is Opacus' accountant history format: ``(noise_multiplier, sample_rate, steps)``, i.e. ``steps``
applications of the Poisson-subsampled Gaussian mechanism with that noise multiplier and sampling rate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence


Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
ACCOUNTANTS = ("rdp", "prv")

# The PRV accountant discretises the privacy-loss distribution on a grid whose size grows with epsilon and with
# sqrt(steps); past this many points it needs seconds to minutes and gigabytes (it is meant for sane epsilons).
PRV_MAX_GRID = 8_000_000
# Opacus' PRVAccountant.get_epsilon defaults, repeated so the feasibility check sizes the same grid.
_PRV_EPS_ERROR = 0.01


class AccountingError(ValueError):
    """Bad input to, or an infeasible request of, the privacy accountant."""


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}")
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


def check_mechanism(mechanism: Sequence, where: str = "mechanism") -> Mechanism:
    """Validate one ``(noise_multiplier, sample_rate, steps)`` triple and return it with exact Python types."""
    try:
        noise, rate, steps = mechanism
    except (TypeError, ValueError):
        raise AccountingError(
            f"{where} must be a (noise_multiplier, sample_rate, steps) triple, got {mechanism!r}"
        ) from None
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (
        math.isfinite(float(noise)) and float(noise) >= 0.0
    ):
        raise AccountingError(f"{where}: noise_multiplier must be a finite number >= 0, got {noise!r}")
    rate = _check_sample_rate(rate, f"{where}: sample_rate")
    steps = _check_count(steps, f"{where}: steps", 0)
    return (float(noise), rate, steps)


def normalise(history: Sequence[Sequence]) -> list[Mechanism]:
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


def compose(history: Sequence[Sequence], new: Sequence) -> list[Mechanism]:
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


def _prv_grid_size(history: list[Mechanism], delta: float) -> int:
    """Number of grid points Opacus' PRV accountant would allocate for this history (see PRV_MAX_GRID)."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    acc = PRVAccountant()
    domain = acc._get_domain(  # same call get_epsilon makes; opacus is pinned to 1.6.0
        prvs=[PoissonSubsampledGaussianPRV(rate, noise) for noise, rate, _ in history],
        num_self_compositions=[steps for _, _, steps in history],
        eps_error=_PRV_EPS_ERROR,
        delta_error=delta / 1000,
    )
    return int(domain.size)


def epsilon_of(history: Sequence[Sequence], delta: float, accountant: str = "rdp") -> float:
    """Epsilon (at ``delta``) of the composition of every mechanism in ``history``.

    0.0 for an empty history (nothing spent); ``inf`` when any mechanism that took steps had no noise. The PRV value
    is Opacus' upper bound (``eps_error`` 0.01), the one Opacus reports during training.
    """
    _check_accountant(accountant)
    delta = _check_delta(delta)
    mechanisms = normalise(history)
    if not mechanisms:
        return 0.0
    if any(noise == 0.0 for noise, _, _ in mechanisms):
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant  # lazy: importing opacus loads torch

    with warnings.catch_warnings():
        # Opacus warns when the optimal RDP order sits at the edge of its grid and numpy warns about log(0) inside
        # the PRV for sample_rate 1; neither changes the (valid, upper-bound) result.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if accountant == "rdp":
            acc = RDPAccountant()
            acc.history = list(mechanisms)
            return float(acc.get_epsilon(delta=delta))
        size = _prv_grid_size(mechanisms, delta)
        if size > PRV_MAX_GRID:
            raise AccountingError(
                f"the PRV accountant would need a grid of {size:,} points for {mechanisms} at delta={delta:g} "
                f"(limit {PRV_MAX_GRID:,}): the epsilon is far too large for PRV accounting; use accountant 'rdp'"
            )
        acc = PRVAccountant()
        acc.history = list(mechanisms)
        try:
            return float(acc.get_epsilon(delta=delta))
        except (MemoryError, OverflowError) as exc:  # pragma: no cover - guarded by the grid check above
            raise AccountingError(f"the PRV accountant failed for {mechanisms}: {exc!r}; use 'rdp'") from exc


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier (within Opacus' 0.01 epsilon tolerance) whose ``steps`` steps reach <= target.

    The result never overshoots: ``epsilon_of([(sigma, sample_rate, steps)], delta, accountant) <= target_epsilon``.
    """
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, (int, float))
        or not (float(target_epsilon) > 0.0 and math.isfinite(float(target_epsilon)))
    ):
        raise AccountingError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    _check_accountant(accountant)
    delta = _check_delta(delta)
    sample_rate = _check_sample_rate(sample_rate)
    steps = _check_count(steps, "steps", 1)
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=float(target_epsilon),
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
        except ValueError as exc:
            raise AccountingError(
                f"cannot reach epsilon {target_epsilon:g} at delta {delta:g} with {steps} steps at sample rate "
                f"{sample_rate:g} ({exc}): raise the target epsilon or take fewer steps"
            ) from exc


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
