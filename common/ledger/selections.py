"""A site's private-selection records: "the trials of study S that ran here were released through private
selection (Papernot and Steinke 2022), and this is the epsilon of that for this site".

Kept in a hash-chained file of its own beside the site ledger (``site-<id>.selections.sqlite``, schema
``privatune.site-selections``), written with the same code as the ledger (its chains, head records, fsynced
appends, owner-only creation, ``verify_chain``), rather than as a row kind of the site ledger, because:

- the spend table's invariant is that every row is a mechanism applied to the data, and the site's budget guard,
  ``privatune budget`` and the audit compose every row; a selection record is a claim about rows already there, not
  a spend, and must never be composed;
- a new table in the site ledger would change the version-2 layout every existing site ledger has: the verifier
  checks that layout exactly, so either each of those ledgers would fail verification or a missing table would have
  to be tolerated (and then dropping it would go unnoticed anyway), or every site would need a version 3 migration.

The site ledger is untouched, so its guard keeps composing every trial's spends (conservative: a site's budget
counts the whole study as if every trial were released). Removing the selections file removes the claim, never a
spend. One record per study id (a unique index): ``record`` is idempotent, so a resumed study cannot write twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privatune.common.accounting import ACCOUNTANTS
from privatune.common.ledger.errors import LedgerError
from privatune.common.ledger.names import selection_ledger_path
from privatune.common.ledger.records import _bad, _int, _real, _text, _timestamp, utc_now
from privatune.common.ledger.schema import SELECTION_SCHEMA
from privatune.common.ledger.storage import _ChainedLedger
from privatune.common.private_selection import DISTRIBUTIONS

SELECTIONS_TABLE = "selections"


@dataclass(frozen=True)
class SelectionRecord:
    """One study's private selection at one site. ``trial_run_ids``: the study's trials that spent at this site;
    ``study_trials``: how many of the study's trials spent anywhere (a site may sit some out); ``shape``: infinity
    for Poisson, the negative binomial's eta otherwise; ``accountant``: the one the site's budget composes with (the
    selection bound itself is always dp-accounting's RDP one); ``epsilon``: the bound at ``delta`` for this site."""

    study_id: str
    site_id: str
    trial_run_ids: tuple[str, ...]
    study_trials: int
    distribution: str
    mean: float
    shape: float
    delta: float
    accountant: str
    epsilon: float
    recorded_at: str = ""

    def __post_init__(self) -> None:
        w = f"SelectionRecord(study {self.study_id!r})"
        _text(w, "study_id", self.study_id)
        _text(w, "site_id", self.site_id)
        ids = tuple(sorted(dict.fromkeys(_text(w, "a trial run id", str(r)) for r in self.trial_run_ids)))
        object.__setattr__(self, "trial_run_ids", ids)
        _int(w, "study_trials", self.study_trials, len(ids))
        if self.distribution not in DISTRIBUTIONS:
            raise _bad(w, "distribution", self.distribution, f"one of {DISTRIBUTIONS}")
        object.__setattr__(self, "mean", _real(w, "mean", self.mean, low=1.0))
        object.__setattr__(self, "shape", _real(w, "shape", self.shape, low=0.0, low_open=True, allow_inf=True))
        if (self.distribution == "poisson") != math.isinf(self.shape):
            raise _bad(w, "shape", self.shape, "infinite for poisson and finite for negative-binomial")
        object.__setattr__(self, "delta", _real(w, "delta", self.delta, low=0.0, high=1.0, low_open=True))
        if self.accountant not in ACCOUNTANTS:
            raise _bad(w, "accountant", self.accountant, f"one of {ACCOUNTANTS}")
        object.__setattr__(self, "epsilon", _real(w, "epsilon", self.epsilon, low=0.0))
        object.__setattr__(self, "recorded_at", self.recorded_at or utc_now())
        _timestamp(w, "recorded_at", self.recorded_at)

    def row(self) -> dict[str, Any]:
        """The stored columns (run ids as a JSON list)."""
        values = {k: v for k, v in vars(self).items() if k != "trial_run_ids"}
        return {**values, "trial_run_ids": json.dumps(list(self.trial_run_ids))}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SelectionRecord:
        """A stored row as a record; LedgerError when it does not hold one."""
        try:
            ids = json.loads(row["trial_run_ids"])
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"selections row {row.get('seq')}: trial_run_ids is not a JSON list: {exc}") from None
        if not isinstance(ids, list):
            raise LedgerError(f"selections row {row.get('seq')}: trial_run_ids is not a JSON list")
        names = [n for n in cls.__dataclass_fields__ if n != "trial_run_ids"]
        return cls(trial_run_ids=tuple(str(i) for i in ids), **{n: row[n] for n in names})


class SelectionLedger(_ChainedLedger):
    """The hash-chained private-selection records beside one site ledger (``for_site_ledger`` finds the file)."""

    SCHEMA = SELECTION_SCHEMA

    @classmethod
    def for_site_ledger(cls, site_ledger: Path) -> SelectionLedger:
        return cls(selection_ledger_path(Path(site_ledger)))

    def get(self, study_id: str) -> tuple[int, SelectionRecord] | None:
        """The stored record of ``study_id`` and its seq, if any."""
        rows = self._select(SELECTIONS_TABLE, "WHERE study_id=?", (study_id,))
        return (rows[0]["seq"], SelectionRecord.from_row(rows[0])) if rows else None

    def record(self, rec: SelectionRecord) -> tuple[int, bool]:
        """Append ``rec`` unless its study already has a record: (the study's row seq, whether it was written now).
        Never a second row for a study: a resumed study finds its record and leaves it."""
        if not isinstance(rec, SelectionRecord):
            raise LedgerError(f"record takes a SelectionRecord, got {type(rec).__name__}")
        found = self.get(rec.study_id)
        if found is not None:
            return found[0], False
        return self._append(SELECTIONS_TABLE, rec.row()), True

    def records(self) -> list[tuple[int, SelectionRecord]]:
        return [(r["seq"], SelectionRecord.from_row(r)) for r in self._select(SELECTIONS_TABLE)]
