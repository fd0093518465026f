"""Independent epsilon recomputation: every epsilon the audit checks, from the recorded mechanisms alone.

Each accounted row gets its run epsilon with Opacus' RDP and PRV and with dp-accounting's PLD, its dataset (or worst
record's) epsilon with the accountant it names, and its value with the accountant independent of that one. Kept
apart from the checks so that how a number is recomputed reads apart from what a disagreement with it means; no
function here flags anything.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from privatune.common.accountants import PLD, PRV, RDP
from privatune.common.accounting import (
    ACCOUNTANTS,
    AccountingError,
    Mechanism,
    check_mechanism,
    epsilon_of,
    independent_of,
    normalise,
)
from privatune.common.audit.report import AuditEntry
from privatune.common.ledger.totals import (
    DatasetTotal,
    LedgerSpend,
    SiteTotal,
    dataset_totals,
    ledger_spend,
    site_total,
)
from privatune.common.record_budget import Spend, record_epsilons

_HistoryKey = tuple[tuple[Mechanism, ...], float, str]


class Recomputer:
    """epsilon_of with a cache: rounds of a run share histories with the server's view and with other sites."""

    def __init__(self) -> None:
        self._cache: dict[_HistoryKey, tuple[float | None, str | None]] = {}

    def __call__(self, history: Sequence[Mechanism], delta: float, accountant: str) -> tuple[float | None, str | None]:
        """(epsilon, None), or (None, why the accountant cannot compute it)."""
        try:
            key = (tuple(normalise(history)), float(delta), accountant)
        except (AccountingError, TypeError, ValueError) as exc:
            return None, str(exc)
        if key not in self._cache:
            try:
                self._cache[key] = (epsilon_of(list(key[0]), delta, accountant), None)
            except AccountingError as exc:
                self._cache[key] = (None, str(exc))
        return self._cache[key]

    def raising(self, history: Sequence[Mechanism], delta: float, accountant: str) -> float:
        """The cached epsilon, raising AccountingError where ``__call__`` returns the reason."""
        value, err = self(history, delta, accountant)
        if value is None:
            raise AccountingError(err or "cannot recompute")
        return value


def mechanism_of(row: dict[str, Any]) -> tuple[Mechanism | None, str | None]:
    """The row's mechanism, or why it cannot be accounted (a tampered or corrupt row)."""
    try:
        mech = check_mechanism((row["noise_multiplier"], row["sample_rate"], row["steps"]))
        delta = row["delta"]
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
            return None, f"delta must be in (0, 1), got {delta!r}"
        if row["accountant"] not in ACCOUNTANTS:
            return None, f"unknown accountant {row['accountant']!r}"
        return mech, None
    except AccountingError as exc:
        return None, str(exc)


def run_epsilons(eps: Recomputer, entry: AuditEntry, history: Sequence[Mechanism], delta: float) -> dict[str, str]:
    """Set the entry's run epsilon with each of RDP, PRV and PLD; return the PRV and PLD errors by name."""
    errors: dict[str, str] = {}
    entry.epsilon_rdp, _ = eps(history, delta, RDP)
    entry.epsilon_prv, prv_err = eps(history, delta, PRV)
    entry.epsilon_pld, pld_err = eps(history, delta, PLD)
    for name, err in ((PRV, prv_err), (PLD, pld_err)):
        if err is not None:
            errors[name] = err
    return errors


@dataclass
class SiteRecomputation:
    """What a site row's recomputation leaves for its checks beyond the entry's own epsilon fields."""

    errors: dict[str, str]  # accountant (or "dataset") -> why it could not recompute
    data_history: list[Mechanism] | None  # rows without a cohort: the dataset's history (independent value later)
    data_independent: float | None  # rows with a cohort: the worst record's all-runs epsilon, independent accountant
    what: str  # what the dataset epsilon covers, for messages


class SiteHistories:
    """The histories one site ledger's rows compose, in ledger order: per run and dataset, per dataset, per spend."""

    def __init__(self, eps: Recomputer, cohorts: dict[str, frozenset[bytes]]) -> None:
        self.eps = eps
        self.cohorts = cohorts
        self.run_hist: dict[tuple[str, str], list[Mechanism]] = defaultdict(list)
        self.data_hist: dict[str, list[Mechanism]] = defaultdict(list)
        self.spends: list[Spend] = []  # every accounted spend so far (those without a cohort count for every record)

    def add(self, entry: AuditEntry, mech: Mechanism, cohort: str | None, delta: float, acc: str) -> SiteRecomputation:
        """Compose the row's spend and set the entry's recomputed run and dataset epsilons."""
        self.spends.append(Spend(mech, cohort, entry.run_id))
        if cohort is None:
            run_key = (entry.run_id, str(entry.dataset_fingerprint))
            self.run_hist[run_key].append(mech)
            self.data_hist[run_key[1]].append(mech)
            errors = run_epsilons(self.eps, entry, self.run_hist[run_key], delta)
            entry.epsilon_dataset, data_err = self.eps(self.data_hist[run_key[1]], delta, acc)
            if data_err is not None:
                errors["dataset"] = data_err
            what = f"all spends on dataset {entry.dataset_fingerprint}"
            return SiteRecomputation(errors, self.data_hist[run_key[1]], None, what)
        worst: dict[str, tuple[float | None, float | None]] = {}
        errors = {}
        for name in (RDP, PRV, PLD):
            try:
                worst[name] = self._record_eps(self.cohorts[cohort], delta, name, entry.run_id)
            except AccountingError as exc:
                worst[name], errors[name] = (None, None), str(exc)
        entry.epsilon_rdp, entry.epsilon_prv, entry.epsilon_pld = (worst[n][0] for n in (RDP, PRV, PLD))
        entry.epsilon_dataset = worst[acc][1] if acc in worst else None
        if acc in errors:
            errors["dataset"] = errors[acc]
        ind = independent_of(acc)
        data_independent = worst[ind][1] if ind in worst else None
        what = f"the worst of its {len(self.cohorts[cohort])} records over every spend holding it"
        return SiteRecomputation(errors, None, data_independent, what)

    def _record_eps(self, members: frozenset[bytes], delta: float, accountant: str, run_id: str) -> tuple[float, float]:
        """(worst record's run epsilon, worst record's epsilon over all runs) among ``members``."""

        res = record_epsilons(
            sorted(members), self.cohorts, self.spends, delta, accountant, run_id=run_id, eps=self.eps.raising
        )
        return res.worst_run, res.worst


def independent_epsilons(
    eps: Recomputer,
    entry: AuditEntry,
    data_history: Sequence[Mechanism] | None,
    delta: float,
    dataset_independent: float | None = None,
) -> None:
    """Set the entry's epsilons with the accountant of another library than the one it names (PLD, or PRV for PLD).

    The run value is the one already recomputed; the dataset value is recomputed from ``data_history`` or, with
    per-record budgets, is the worst record's, which the caller computed.
    """
    ind = independent_of(str(entry.accountant))
    entry.independent_accountant = ind
    entry.epsilon_independent = entry.epsilon_pld if ind == PLD else entry.epsilon_prv
    if data_history is not None:
        entry.epsilon_dataset_independent, _ = eps(data_history, delta, ind)
    elif dataset_independent is not None:
        entry.epsilon_dataset_independent = dataset_independent


@dataclass
class LedgerTotals:
    """One site ledger's totals (common/ledger/totals.py) over its accounted rows, and those rows."""

    datasets: list[DatasetTotal]
    site: SiteTotal
    rows: list[dict[str, Any]]  # the accounted spend rows, in ledger order


def ledger_totals(
    eps: Recomputer, rows: Sequence[dict[str, Any]], cohorts: dict[str, frozenset[bytes]]
) -> LedgerTotals:
    """Each dataset's total and the site's, composed once from the rows the checks could account."""
    spends: list[LedgerSpend] = [ledger_spend(r) for r in rows]
    return LedgerTotals(
        dataset_totals(spends, cohorts, eps=eps.raising), site_total(spends, cohorts, eps=eps.raising), list(rows)
    )
