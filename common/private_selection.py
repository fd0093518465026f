"""The private-selection bound (Papernot and Steinke 2022, "Hyperparameter tuning with Renyi differential
privacy"): the epsilon of running a random number of trials and releasing only the best one.

Pure maths on recorded mechanisms, in ``common/`` because both the study that claims the bound
(``simulations/tune_privacy.py``) and ``privatune audit`` (``common/audit/selection.py``), which recomputes it from a
site ledger's spends, use it: one computation, not two copies that could drift apart. The bound is Google
dp-accounting's repeat-and-select RDP bound (what ``RepeatAndSelectDpEvent`` composes to under its RdpAccountant),
applied to the pointwise largest RDP curve of any one trial: each trial is then an instance of that worst mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from privatune.common.accounting import Mechanism

DISTRIBUTIONS = ("poisson", "negative-binomial")
# The Renyi orders of the selection bound: dp-accounting's default set (its RdpAccountant's).
ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128.0, 256.0, 512.0, 1024.0]
)


class _Spend(Protocol):
    """What a spend needs for the bound (a ledger SpendEntry has it)."""

    @property
    def run_id(self) -> str: ...
    @property
    def noise_multiplier(self) -> float: ...
    @property
    def sample_rate(self) -> float: ...
    @property
    def steps(self) -> int: ...


def distribution_shape(distribution: str, shape: float) -> float:
    """dp-accounting's shape parameter: infinity for Poisson, eta in (0, inf) for the truncated negative binomial."""
    if distribution == "poisson":
        return math.inf
    if distribution != "negative-binomial":
        raise ValueError(f"--trials-distribution must be one of {', '.join(DISTRIBUTIONS)}, got '{distribution}'")
    if not (0 < shape < math.inf):
        raise ValueError(f"--nb-shape must be > 0 and finite (1 = geometric), got {shape}")
    return shape


def dp_event_of_mechanisms(mechanisms: Sequence[Mechanism], where: str = "a trial") -> Any:
    """The dp-accounting event of (noise multiplier, sample rate, steps) spends: each a Poisson-subsampled
    Gaussian, ``steps`` times, composed in order."""
    import dp_accounting

    events = []
    for sigma, q, steps in mechanisms:
        if sigma <= 0:
            raise ValueError(
                f"{where}: a non-private spend (noise 0) has no finite epsilon; private selection needs DP trials"
            )
        gauss = dp_accounting.GaussianDpEvent(sigma)
        one = gauss if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gauss)
        events.append(dp_accounting.SelfComposedDpEvent(one, int(steps)))
    return dp_accounting.ComposedDpEvent(events)


def dp_event_of(entries: Sequence[_Spend]) -> Any:
    """The dp-accounting event of a list of ledger spends (SpendEntry)."""
    where = f"run {entries[0].run_id}" if entries else "a trial"
    return dp_event_of_mechanisms([(e.noise_multiplier, e.sample_rate, e.steps) for e in entries], where)


def _rdp_of(event: Any) -> np.ndarray:
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(list(ORDERS))
    acc.compose(event)
    return np.asarray(acc._rdp, dtype=float)  # the RDP curve itself (no public getter in dp-accounting 0.6)


def selection_epsilon(trial_events: Sequence[Any], mean: float, shape: float, delta: float) -> float:
    """Epsilon (at ``delta``) of running a random number of trials (mean ``mean``, shape ``shape``) and releasing
    only the best: the repeat-and-select RDP bound on the largest single-trial RDP curve among ``trial_events``."""
    if not trial_events:
        return 0.0
    return selection_of_curve(np.max(np.stack([_rdp_of(ev) for ev in trial_events]), axis=0), mean, shape, delta)


def selection_of_curve(curve: np.ndarray, mean: float, shape: float, delta: float) -> float:
    """The repeat-and-select epsilon (at ``delta``) of trials each bounded by the RDP curve ``curve`` (at ORDERS)."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    selected = rdp._compute_rdp_repeat_and_select(list(ORDERS), list(curve), mean, shape)
    return curve_epsilon(np.asarray(selected, dtype=float), delta)


def curve_epsilon(curve: np.ndarray, delta: float) -> float:
    """Epsilon (at ``delta``) of an RDP curve at ORDERS (dp-accounting's conversion)."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    eps, _ = rdp.compute_epsilon(list(ORDERS), list(curve), delta)
    return float(eps)
