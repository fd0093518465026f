"""What a tuning study costs in privacy, the three ways ``privatune tune --privacy`` offers.

- ``public``: the trials train on ``--tuning-data`` (public or proxy data): nothing is spent on the private data;
  only the final private run (of the best configuration) spends, its target epsilon.
- ``select`` (Papernot and Steinke 2022, "Hyperparameter tuning with Renyi differential privacy"): the number of
  trials K is random (Poisson, or truncated negative binomial, with the mean the user gives) and only the best trial
  is released. The total is the RDP bound of that mechanism (dp-accounting's repeat-and-select), applied to the
  pointwise largest RDP curve of any one trial at any site (each trial is then an instance of that worst mechanism).
- ``compose``: every trial is released; each site's ledger composes every trial's spends, and the total is the worst
  site's composition, as the site's own guard computes it.

The trials' spends are in the sites' ledgers in every mode (one ledger folder per study): that is what a site's
budget stops. In ``select`` mode the ledgers therefore over-state the cost (they compose all K trials).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privatune.common.ledger import SpendEntry

PRIVACY_MODES = ("public", "select", "compose")
DISTRIBUTIONS = ("poisson", "negative-binomial")
# The Renyi orders of the selection bound: dp-accounting's default set (its RdpAccountant's).
ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128.0, 256.0, 512.0, 1024.0]
)


def distribution_shape(distribution: str, shape: float) -> float:
    """dp-accounting's shape parameter: infinity for Poisson, eta in (0, inf) for the truncated negative binomial."""
    if distribution == "poisson":
        return math.inf
    if distribution != "negative-binomial":
        raise ValueError(f"--trials-distribution must be one of {', '.join(DISTRIBUTIONS)}, got '{distribution}'")
    if not (0 < shape < math.inf):
        raise ValueError(f"--nb-shape must be > 0 and finite (1 = geometric), got {shape}")
    return shape


def _nb_gamma(mean: float, eta: float) -> float:
    """gamma of the truncated negative binomial with shape eta and this mean (Papernot and Steinke, section 2):
    mean = eta (1 - gamma) / (gamma (1 - gamma^eta)), decreasing in gamma; found by bisection."""

    def mean_at(g: float) -> float:
        return eta * (1 - g) / (g * (1 - g**eta))

    lo, hi = 1e-12, 1 - 1e-12
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean_at(mid) > mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def draw_trial_count(mean: float, shape: float, seed: int) -> int:
    """K, the number of trials, drawn once per study (from its seed) and kept with it: Poisson(mean) (K = 0 is
    possible: then nothing runs and nothing is released), or the truncated negative binomial (K >= 1)."""
    if not mean >= 1:
        raise ValueError(f"--trials-mean must be >= 1, got {mean}")
    rng = np.random.default_rng(seed)
    if math.isinf(shape):
        return int(rng.poisson(mean))
    gamma = _nb_gamma(mean, shape)
    while True:
        k = int(rng.negative_binomial(shape, gamma))
        if k >= 1:
            return k


def dp_event_of(entries: Sequence[SpendEntry]) -> Any:
    """The dp-accounting event of a list of ledger spends: each a Poisson-subsampled Gaussian, ``steps`` times."""
    import dp_accounting

    events = []
    for e in entries:
        if e.noise_multiplier <= 0:
            raise ValueError(
                f"run {e.run_id} round {e.round}: a non-private spend (noise 0) has no finite epsilon; private "
                "selection needs DP trials"
            )
        gauss = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        one = gauss if e.sample_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(e.sample_rate, gauss)
        events.append(dp_accounting.SelfComposedDpEvent(one, int(e.steps)))
    return dp_accounting.ComposedDpEvent(events)


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


def trial_spends(ledger_dir: Path) -> dict[str, dict[str, list[SpendEntry]]]:
    """site id -> run id -> the spends of that run in the site's ledger (the study's shared ledger folder)."""
    from privatune.common.ledger import LEDGER_SUFFIX, SiteLedger, site_id_from_ledger_name

    out: dict[str, dict[str, list[SpendEntry]]] = {}
    for path in sorted(Path(ledger_dir).glob(f"*{LEDGER_SUFFIX}")):
        site = site_id_from_ledger_name(path.name)
        if site is None:
            continue
        for rec in SiteLedger(path).entries():
            out.setdefault(site, {}).setdefault(rec.entry.run_id, []).append(rec.entry)
    return out


def composed_epsilon(ledger_dir: Path, delta: float, accountant: str) -> dict[str, float]:
    """site id -> the epsilon its ledger composes over everything spent there (the worst record of its worst
    dataset), as the site's guard and ``privatune budget`` compute it."""
    from privatune.client.budget import dataset_budgets
    from privatune.common.ledger import LEDGER_SUFFIX, SiteLedger, site_id_from_ledger_name

    out: dict[str, float] = {}
    for path in sorted(Path(ledger_dir).glob(f"*{LEDGER_SUFFIX}")):
        site = site_id_from_ledger_name(path.name)
        if site is None:
            continue
        ledger = SiteLedger(path)
        budgets = dataset_budgets(
            ledger.entries(), ledger.cohorts(), delta=delta, accountant=accountant, max_epsilon=None
        )
        out[site] = max((b.spent for b in budgets), default=0.0)
    return out
