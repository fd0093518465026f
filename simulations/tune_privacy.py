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
budget stops. In ``select`` mode the ledgers therefore over-state the cost (they compose all K trials); the
selection itself is recorded beside each site ledger (``record_selection``, common/ledger/selections.py) for
``privatune audit`` to recompute. The bound's maths is ``common/private_selection.py``, which the audit uses too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privatune.common.ledger import SpendEntry
from privatune.common.private_selection import (  # the bound's maths, shared with privatune audit
    DISTRIBUTIONS,
    ORDERS,
    curve_epsilon,
    distribution_shape,
    dp_event_of,
    selection_epsilon,
    selection_of_curve,
)

PRIVACY_MODES = ("public", "select", "compose")
__all__ = [
    "DISTRIBUTIONS",
    "ORDERS",
    "PRIVACY_MODES",
    "composed_epsilon",
    "curve_epsilon",
    "distribution_shape",
    "dp_event_of",
    "draw_trial_count",
    "record_selection",
    "selection_epsilon",
    "selection_of_curve",
    "trial_spends",
]


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


def record_selection(
    ledger_dir: Path,
    study_id: str,
    run_ids: Sequence[str],
    *,
    distribution: str,
    mean: float,
    shape: float,
    delta: float,
    accountant: str,
) -> dict[str, dict[str, Any]]:
    """Write, beside each site ledger of the study, the record that its trials were released through private
    selection, with the bound for that site (its trials' spends only); once per study: a study resumed after its
    record was written finds it and leaves it. site id -> the record's file, row, epsilon and whether written now."""
    from privatune.common.ledger import (
        LEDGER_SUFFIX,
        SelectionLedger,
        SelectionRecord,
        SiteLedger,
        site_id_from_ledger_name,
    )

    ids = sorted({r for r in run_ids if r and r != "None"})
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(ledger_dir).glob(f"*{LEDGER_SUFFIX}")):
        site = site_id_from_ledger_name(path.name)
        if site is None:
            continue
        by_run: dict[str, list[SpendEntry]] = {}
        for rec in SiteLedger(path).entries():
            if rec.entry.run_id in ids:
                by_run.setdefault(rec.entry.run_id, []).append(rec.entry)
        here = sorted(by_run)
        eps = selection_epsilon([dp_event_of(by_run[r]) for r in here], mean, shape, delta)
        record = SelectionRecord(
            study_id, site, tuple(here), len(ids), distribution, mean, shape, delta, accountant, eps
        )
        selections = SelectionLedger.for_site_ledger(path)
        seq, written = selections.record(record)
        kept = record if written else selections.get(study_id)[1]  # type: ignore[index]
        out[site] = {
            "file": str(selections.path),
            "row": seq,
            "epsilon": kept.epsilon,
            "trial_run_ids": list(kept.trial_run_ids),
            "written_now": written,
        }
        if not written and kept.trial_run_ids != record.trial_run_ids:
            out[site]["note"] = "kept the study's earlier record: the trials that ran since are not in it"
    return out
