"""What a site ledger adds up to: the privacy total of each dataset it holds and of the site, from its spend rows.

One pure function over the rows (no SQLite, no printing), so that ``privatune audit`` (its console table, its
Markdown report and its JSON), ``privatune budget`` and ``privatune site check`` state the same numbers.

The maths is the site guard's (:func:`privatune.common.record_budget.record_epsilons`), never a sum:

- **a dataset's total** is the epsilon of its worst record: among the records its spends touched (the union of
  their cohorts), the largest composition of *every* spend whose cohort holds the record. Records are known by
  keyed ids, so a record that two datasets share carries the spends of both (the ids say it is the same record);
  records of different datasets are otherwise different records, and one dataset's spends never enter another's
  total. A spend written before cohorts (``cohort_id`` None) touched records nobody can name: it counts for every
  record of the site, as the guard counts it, and a dataset with only such spends totals the composition of the
  spends on its fingerprint, as the budget of that time did;
- **the site's total** is the epsilon of the worst record at the site: the largest of its datasets' totals, and
  at least the composition of all its spends before cohorts (their fingerprints did not follow records, so one
  record may be in all of them). It is what a per-record DP guarantee for "any record at this site" can state.

Each total is composed at one delta with one accountant: by default those of the latest spend it covers (what the
site guard last composed with); a caller may ask for others (a budget projection at the site's delta).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from privatune.common.accounting import AccountingError, Mechanism, check_mechanism, epsilon_of
from privatune.common.ledger.records import SpendEntry
from privatune.common.record_budget import EpsilonFn, Spend, record_epsilons


@dataclass(frozen=True)
class LedgerSpend:
    """One spend row as the totals see it (from a SpendEntry or a row read from the ledger file)."""

    dataset_fingerprint: str
    run_id: str
    mechanism: Mechanism
    cohort: str | None  # None: a spend from before cohorts (counts for every record of the site)
    delta: float
    accountant: str


def ledger_spend(row: SpendEntry | Mapping[str, Any]) -> LedgerSpend:
    """The spend of a SpendEntry or of a ``spend`` row as read (``SiteLedger.entries()`` or the audit's rows)."""
    values: Mapping[str, Any] = vars(row) if isinstance(row, SpendEntry) else row
    return LedgerSpend(
        dataset_fingerprint=str(values["dataset_fingerprint"]),
        run_id=str(values["run_id"]),
        mechanism=check_mechanism((values["noise_multiplier"], values["sample_rate"], values["steps"])),
        cohort=values.get("cohort_id"),
        delta=float(values["delta"]),
        accountant=str(values["accountant"]),
    )


@dataclass(frozen=True)
class DatasetTotal:
    """The privacy total of one dataset at a site (see the module docstring for what it composes)."""

    dataset_fingerprint: str
    spends: int  # spend rows on this dataset (training and metric releases)
    runs: tuple[str, ...]  # the runs that spent on it, in ledger order
    delta: float
    accountant: str
    epsilon: float | None  # the worst record's epsilon; None when the accountant cannot compute it (``error``)
    records: int | None  # distinct keyed records its spends touched (None: none of its spends names a cohort)
    shared_records: int = 0  # of those, records that spends on another dataset touched too
    error: str | None = None


@dataclass(frozen=True)
class SiteTotal:
    """The privacy total of a site: its worst record over all its datasets."""

    datasets: tuple[str, ...]  # the dataset fingerprints, in ledger order
    spends: int
    delta: float | None  # None: the ledger holds no spend
    accountant: str | None
    epsilon: float | None  # 0.0 for a ledger without spends
    records: int | None  # distinct keyed records any spend touched (None: no spend names a cohort)
    error: str | None = None


def _default_eps(history: Sequence[Mechanism], delta: float, accountant: str) -> float:
    return epsilon_of(history, delta, accountant)


def _worst(
    spends: Sequence[LedgerSpend],
    cohorts: Mapping[str, frozenset[bytes]],
    members: set[bytes],
    legacy: list[Mechanism],
    delta: float,
    accountant: str,
    eps: EpsilonFn,
) -> float:
    """The worst of ``members`` over every spend holding it, and at least the composition of ``legacy``."""
    worst = eps(legacy, delta, accountant) if legacy else 0.0
    if members:
        history = [Spend(s.mechanism, s.cohort, s.run_id) for s in spends]
        res = record_epsilons(sorted(members), cohorts, history, delta, accountant, eps=eps)
        worst = max(worst, res.worst)
    return worst


def _members(spends: Iterable[LedgerSpend], cohorts: Mapping[str, frozenset[bytes]]) -> set[bytes]:
    out: set[bytes] = set()
    for s in spends:
        if s.cohort is not None:
            if s.cohort not in cohorts:
                raise AccountingError(f"a spend names cohort {s.cohort[:16]}..., which the ledger does not hold")
            out |= cohorts[s.cohort]
    return out


def compose_dataset(
    spends: Sequence[LedgerSpend],
    cohorts: Mapping[str, frozenset[bytes]],
    dataset_fingerprint: str,
    *,
    delta: float | None = None,
    accountant: str | None = None,
    eps: EpsilonFn = _default_eps,
) -> DatasetTotal:
    """The total of one dataset of a site ledger: ``spends`` are all the ledger's spends (in ledger order),
    ``cohorts`` its cohorts; ``delta`` and ``accountant`` default to those of the dataset's latest spend."""
    own = [s for s in spends if s.dataset_fingerprint == dataset_fingerprint]
    if not own:
        raise ValueError(f"no spend on dataset {dataset_fingerprint!r} in this ledger")
    delta = own[-1].delta if delta is None else delta
    accountant = own[-1].accountant if accountant is None else accountant
    runs = tuple(dict.fromkeys(s.run_id for s in own))
    named = any(s.cohort is not None for s in own)
    try:
        mine = _members(own, cohorts)
        others = _members((s for s in spends if s.dataset_fingerprint != dataset_fingerprint), cohorts)
        legacy = [s.mechanism for s in own if s.cohort is None]
        value = _worst(spends, cohorts, mine, legacy, delta, accountant, eps)
    except AccountingError as exc:
        return DatasetTotal(dataset_fingerprint, len(own), runs, delta, accountant, None, None, 0, str(exc))
    return DatasetTotal(
        dataset_fingerprint,
        len(own),
        runs,
        delta,
        accountant,
        value,
        len(mine) if named else None,
        len(mine & others),
    )


def dataset_totals(
    spends: Sequence[LedgerSpend],
    cohorts: Mapping[str, frozenset[bytes]],
    *,
    delta: float | None = None,
    accountant: str | None = None,
    eps: EpsilonFn = _default_eps,
) -> list[DatasetTotal]:
    """Every dataset's total, in the order the ledger first spent on each."""
    order = dict.fromkeys(s.dataset_fingerprint for s in spends)
    return [compose_dataset(spends, cohorts, fp, delta=delta, accountant=accountant, eps=eps) for fp in order]


def site_total(
    spends: Sequence[LedgerSpend],
    cohorts: Mapping[str, frozenset[bytes]],
    *,
    delta: float | None = None,
    accountant: str | None = None,
    eps: EpsilonFn = _default_eps,
) -> SiteTotal:
    """The site's total: its worst record over all its spends; ``delta`` and ``accountant`` default to those of
    the ledger's latest spend."""
    datasets = tuple(dict.fromkeys(s.dataset_fingerprint for s in spends))
    if not spends:
        return SiteTotal((), 0, delta, accountant, 0.0, None)
    delta = spends[-1].delta if delta is None else delta
    accountant = spends[-1].accountant if accountant is None else accountant
    named = any(s.cohort is not None for s in spends)
    try:
        members = _members(spends, cohorts)
        legacy = [s.mechanism for s in spends if s.cohort is None]
        value = _worst(spends, cohorts, members, legacy, delta, accountant, eps)
    except AccountingError as exc:
        return SiteTotal(datasets, len(spends), delta, accountant, None, None, str(exc))
    return SiteTotal(datasets, len(spends), delta, accountant, value, len(members) if named else None)
