"""``privatune audit``: check site and server ledgers without trusting anyone's arithmetic.

For every ledger file given (or found under a folder: ``*.ledger.sqlite``, i.e. ``site-<id>.ledger.sqlite`` and
``server.ledger.sqlite``) the audit

1. verifies the file (``privatune.common.ledger.verify``): a file that is not a ledger or whose pages or structure are
   damaged is ``unreadable``; a malformed row (wrong type, invalid text, NULL) is ``chain-malformed``; an edited,
   deleted, inserted or moved row of any chained table is a violation naming the table and row. A bad ledger
   never stops the audit: the other files are audited, and only well-formed rows are accounted;
2. recomputes every epsilon from the recorded mechanisms alone, with both Opacus accountants (RDP and PRV) and,
   independently of Opacus, with Google dp-accounting's PLD:
   a site row that names a cohort (the exact set of keyed record ids it sampled from) gets the epsilon of the
   worst record of that cohort, composing every earlier spend whose cohort holds that record (this run's for the
   run epsilon, all runs' for the budget); a row from before cohorts gets, as before, its run's rows and every row
   on its dataset fingerprint up to it; a server report's epsilon comes from that client's trained reports in the
   run up to it;
3. flags a recorded epsilon below the recomputation (with the accountant the row names, beyond ``tolerance``), a
   recorded epsilon below the independent recomputation (PLD; Opacus' PRV for rows accounted with PLD) by more
   than the accountants' own error (``INDEPENDENT_REL_TOLERANCE``), a
   record (or, before cohorts, a dataset) above the site budget in force, and a cohort row that does not match its
   id or a spend naming a cohort the ledger lacks;
4. cross-checks the server's record against the sites': a round the server has as trained for a client but the
   client's ledger lacks (or the reverse), and any reported value that differs from the site's record.

A report is ``ok`` only without violations; notes (e.g. a client whose ledger was not among the paths, or a spend
the site recorded whose reply never reached the server) are informative and do not fail the audit.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from privatune.common.accounting import (
    ACCOUNTANTS,
    INDEPENDENT_REL_TOLERANCE,
    AccountingError,
    Mechanism,
    check_mechanism,
    epsilon_of,
    independent_of,
    normalise,
)
from privatune.common.jsonsafe import jsonable
from privatune.common.ledger import (
    LEDGER_GLOB,
    PURPOSE_TRAIN,
    SITE_SCHEMA,
    STATUS_BUDGET_EXHAUSTED,
    STATUS_DROPPED,
    STATUS_TRAINED,
    inspect_ledger,
    site_id_from_ledger_name,
)
from privatune.common.protocol import NOISE_SOURCE_SEEDED
from privatune.common.record_budget import CohortError, Spend, cohort_id_of, record_epsilons, unpack_ids

SITE = "site"
SERVER = "server"
VIOLATION_KINDS = (
    "unreadable",  # not a ledger, not readable, or its pages / structure are damaged (the file as a whole)
    "chain-malformed",  # the file, a table or a row is not a well-formed ledger (corrupt, wrong type, NULL...)
    "chain-edited",
    "chain-deleted",
    "chain-inserted",
    "chain-reordered",  # hash chain broken at a named row
    "invalid-entry",  # a row whose mechanism cannot be accounted (e.g. sample rate 0)
    "unverifiable",  # the recorded accountant cannot recompute this epsilon
    "epsilon-underreported",  # a recorded epsilon below the independent recomputation
    "budget-exceeded",  # the recomputed dataset epsilon is above the site budget in force
    "missing-at-site",  # the server has the client as trained in a round the client's ledger lacks
    "missing-at-server",  # the site recorded a spend in a run the server ledger knows nothing of for that round
    "report-mismatch",  # what the server recorded differs from the site's record
    "invalid-cohort",  # a cohort row whose ids do not match its id or size, or a spend naming a missing cohort
)
SEEDED_FLAG = "reproducible noise: no protection against whoever knows the seed"
_PLOT_CAP = 1e6
MARKDOWN_NAME = "audit.md"
PLOT_NAME = "epsilon_per_round.png"
JSON_NAME = "audit.json"
_MECH_FIELDS = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta", "accountant")


class AuditInputError(ValueError):
    """The paths given to the audit do not lead to any ledger (or do not exist)."""


@dataclass(frozen=True)
class Violation:
    kind: str  # one of VIOLATION_KINDS
    file: str
    seq: int | None  # the row (None: the file as a whole; 0: a chain's head record)
    message: str
    table: str | None = None  # spend (site), runs / reports (server)
    party: str | None = None  # the site / client concerned, when known


@dataclass
class AuditEntry:
    """One accounted row: a site's spend or a server's record of a client report, with recomputed epsilons."""

    source: str  # SITE or SERVER
    file: str
    seq: int
    run_id: str
    round: int
    party: str  # site_id (site rows) or client_id (server rows)
    status: str  # "trained" for site rows; the reported status for server rows
    node_id: str | None
    dataset_fingerprint: str | None
    params_fingerprint: str | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    max_grad_norm: float | None
    delta: float | None
    accountant: str | None
    epsilon_reported: float | None  # site: epsilon_run; server: what the client reported for the run
    epsilon_dataset_reported: float | None
    max_epsilon: float | None
    epsilon_rdp: float | None = None  # recomputed epsilon of the run after this round, RDP accountant
    epsilon_prv: float | None = None  # same with the PRV accountant (None when PRV cannot compute it)
    epsilon_dataset: float | None = None  # recomputed dataset epsilon (all runs), with the recorded accountant
    epsilon_pld: float | None = None  # run epsilon with dp-accounting's PLD (None when PLD cannot compute it)
    independent_accountant: str | None = None  # pld, or prv for rows accounted with pld
    epsilon_independent: float | None = None  # run epsilon with the independent accountant
    epsilon_dataset_independent: float | None = None  # dataset epsilon with the independent accountant (sites)
    aggregation: str | None = None
    recorded_at: str | None = None
    problems: list[str] = field(default_factory=list)  # violation kinds that name this row
    noise_source: str | None = None  # site rows: as recorded ("seeded" for ledgers older than the field)
    purpose: str = "train"  # site rows: "train" (DP-SGD) or "metrics" (a noised release of evaluation sums)

    @property
    def epsilon_recomputed(self) -> float | None:
        """The recomputed run epsilon with the accountant this row names."""
        return {"prv": self.epsilon_prv, "pld": self.epsilon_pld}.get(str(self.accountant), self.epsilon_rdp)

    @property
    def independent_ratio(self) -> float | None:
        """Recorded run epsilon over the independent recomputation (1.0 for equal values; < 1 under-reports)."""
        rep, ind = _num(self.epsilon_reported), self.epsilon_independent
        if rep is None or ind is None or math.isnan(rep) or not ind > 0:
            return None
        if math.isinf(ind):
            return 1.0 if math.isinf(rep) else 0.0
        return rep / ind


@dataclass(frozen=True)
class LedgerFileInfo:
    path: str
    kind: str  # SITE, SERVER or "unknown"
    rows: int
    chain_ok: bool


@dataclass
class PartySummary:
    source: str
    party: str
    file: str
    runs: list[str]
    rounds_trained: int
    budget_exhausted: int
    dropped: int
    accountant: str | None
    epsilon_run: float | None  # largest recomputed run epsilon (recorded accountant)
    epsilon_dataset: float | None  # largest recomputed dataset epsilon (sites only)
    max_epsilon: float | None  # the budget last in force (sites only)
    violations: int
    seeded_rounds: int = 0  # trained rounds whose noise came from a seed (reproducible: predictable by its holder)

    @property
    def budget_left(self) -> float | None:
        if self.max_epsilon is None or self.epsilon_dataset is None:
            return None
        return self.max_epsilon - self.epsilon_dataset


@dataclass
class AuditReport:
    tolerance: float
    files: list[LedgerFileInfo]
    entries: list[AuditEntry]
    violations: list[Violation]
    notes: list[str]
    summaries: list[PartySummary]

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plot: Path
    json: Path


# ----------------------------------------------------------------------------------------------------------------
# Finding ledgers


def find_ledgers(paths: Sequence[Path]) -> list[Path]:
    """Ledger files named directly, plus every ``*.ledger.sqlite`` under folders (recursively), de-duplicated."""
    if not paths:
        raise AuditInputError("no paths given: name ledger files or folders that contain *.ledger.sqlite files")
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            hits = sorted(p for p in path.rglob(LEDGER_GLOB) if p.is_file())
            if not hits:
                raise AuditInputError(f"no ledger files ({LEDGER_GLOB}) under {path}")
            for p in hits:
                found.setdefault(p.resolve(), None)
        elif path.is_file():
            found.setdefault(path.resolve(), None)
        else:
            raise AuditInputError(f"{path} does not exist")
    return list(found)


def _site_id_from_name(path: Path) -> str | None:
    return site_id_from_ledger_name(path.name)


# ----------------------------------------------------------------------------------------------------------------
# Recomputation


class _Recomputer:
    """epsilon_of with a cache: rounds of a run share histories with the server's view and with other sites."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[float | None, str | None]] = {}

    def __call__(self, history: Sequence[Mechanism], delta: float, accountant: str) -> tuple[float | None, str | None]:
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


def _mechanism_of(row: dict[str, Any]) -> tuple[Mechanism | None, str | None]:
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


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _below(reported: Any, recomputed: float | None, tolerance: float) -> bool:
    """A reported epsilon is too low when it is below the recomputation by more than the tolerance (or missing)."""
    if recomputed is None:
        return False
    value = _num(reported)
    if value is None or math.isnan(value):
        return True
    return value < recomputed - tolerance


def _below_independent(reported: Any, independent: float, tolerance: float) -> bool:
    """Below the independent value by more than the accountants' relative error (and the audit's tolerance)."""
    return _below(reported, independent * (1.0 - INDEPENDENT_REL_TOLERANCE), tolerance)


class _Auditor:
    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.eps = _Recomputer()
        self.files: list[LedgerFileInfo] = []
        self.entries: list[AuditEntry] = []
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        self.site_parties: set[str] = set()
        self.server_runs: set[str] = set()

    def flag(
        self, kind: str, file: Path, seq: int | None, message: str, table: str | None = None, party: str | None = None
    ) -> None:
        self.violations.append(Violation(kind=kind, file=str(file), seq=seq, message=message, table=table, party=party))

    # -- files --------------------------------------------------------------------------------------------------

    def load(self, path: Path) -> None:
        """Verify and account one ledger file; every problem with it becomes a violation, never an exception."""
        found = inspect_ledger(path)  # reports damage; raises only when the file vanished (caught by the caller)
        for p in found.problems:
            if p.table is None:  # not a ledger, or its pages / structure are damaged
                self.flag("unreadable", path, None, p.detail)
                continue
            where = {None: "as a whole", 0: "head"}.get(p.seq, f"row {p.seq}")
            self.flag(f"chain-{p.kind}", path, p.seq, f"{p.table} {where}: {p.detail}", table=p.table)
        if found.schema is None:
            self.files.append(LedgerFileInfo(str(path), "unknown", 0, False))
            return
        if found.version == "1":
            self.notes.append(
                f"{path.name} is a version 1 ledger: its chains are verified, but its meta table "
                "(schema, creation time) is not hash-chained"
            )
        # Only rows that decoded with their declared types are accounted; the others are named above.
        if found.schema == SITE_SCHEMA:
            rows = found.rows.get("spend", [])
            self._site(path, rows, self._cohorts(path, found.rows.get("cohorts", [])))
            kind = SITE
        else:
            rows = found.rows.get("reports", [])
            self._server(path, found.rows.get("runs", []), rows)
            kind = SERVER
        self.files.append(LedgerFileInfo(str(path), kind, len(rows), not found.problems))

    # -- site ledgers ------------------------------------------------------------------------------------------

    def _cohorts(self, path: Path, rows: list[dict[str, Any]]) -> dict[str, frozenset[bytes]]:
        """The cohorts whose ids match their cohort id and size; a mismatch is a violation."""
        out: dict[str, frozenset[bytes]] = {}
        keys = {row.get("key_check") for row in rows}
        if len(keys) > 1:
            self.flag(
                "invalid-cohort",
                path,
                None,
                f"the cohorts were made with {len(keys)} different site keys: "
                "records keyed by a replaced key restart at zero",
                "cohorts",
            )
        for row in rows:
            seq = row["seq"]
            try:
                ids = unpack_ids(row["ids"])
                if cohort_id_of(row["ids"]) != row["cohort_id"] or len(ids) != row["size"]:
                    raise CohortError(
                        f"its ids do not match its cohort id {row['cohort_id']!r} and size {row['size']!r}"
                    )
            except (CohortError, TypeError) as exc:
                self.flag("invalid-cohort", path, seq, f"cohort row {seq}: {exc}", "cohorts")
                continue
            out[row["cohort_id"]] = frozenset(ids)
        return out

    def _record_eps(
        self,
        members: frozenset[bytes],
        cohorts: dict[str, frozenset[bytes]],
        spends: list[Spend],
        delta: float,
        accountant: str,
        run_id: str,
    ) -> tuple[float, float]:
        """(worst record's run epsilon, worst record's epsilon over all runs) among ``members``."""

        def eps(history: Sequence[Mechanism], d: float, acc: str) -> float:
            value, err = self.eps(history, d, acc)
            if value is None:
                raise AccountingError(err or "cannot recompute")
            return value

        res = record_epsilons(sorted(members), cohorts, spends, delta, accountant, run_id=run_id, eps=eps)
        return res.worst_run, res.worst

    def _site(self, path: Path, rows: list[dict[str, Any]], cohorts: dict[str, frozenset[bytes]]) -> None:
        named = _site_id_from_name(path)
        if named:
            self.site_parties.add(named)
        run_hist: dict[tuple[str, str], list[Mechanism]] = defaultdict(list)
        data_hist: dict[str, list[Mechanism]] = defaultdict(list)
        spends: list[Spend] = []  # every accounted spend so far (those without a cohort count for every record)
        tol = self.tolerance
        for row in rows:
            seq, site = row["seq"], str(row["site_id"])
            self.site_parties.add(site)
            cohort = row.get("cohort_id")
            entry = AuditEntry(
                source=SITE,
                file=str(path),
                seq=seq,
                run_id=str(row["run_id"]),
                round=row["round"],
                party=site,
                status=STATUS_TRAINED,
                node_id=None,
                dataset_fingerprint=row["dataset_fingerprint"],
                params_fingerprint=row["params_fingerprint"],
                **{k: row[k] for k in _MECH_FIELDS},
                epsilon_reported=row["epsilon_run"],
                epsilon_dataset_reported=row["epsilon_dataset"],
                max_epsilon=row["max_epsilon"],
                recorded_at=row["recorded_at"],
                noise_source=row.get("noise_source") or NOISE_SOURCE_SEEDED,
                purpose=str(row.get("purpose") or "train"),
            )
            if (row.get("purpose") or PURPOSE_TRAIN) == PURPOSE_TRAIN:
                self.entries.append(entry)  # other purposes count in budgets but are no training round to match
            mech, why = _mechanism_of(row)
            if mech is None:
                self.flag("invalid-entry", path, seq, f"row {seq} cannot be accounted: {why}", "spend", site)
                continue
            if cohort is not None and cohort not in cohorts:
                self.flag(
                    "invalid-cohort",
                    path,
                    seq,
                    f"row {seq} names cohort {cohort!r}, which the ledger does "
                    "not hold (or holds altered): its records cannot be "
                    "accounted",
                    "spend",
                    site,
                )
                continue
            spends.append(Spend(mech, cohort, entry.run_id))
            delta, acc = float(row["delta"]), row["accountant"]
            prv_err = data_err = pld_err = None
            data_history: list[Mechanism] | None = None
            data_independent: float | None = None
            if cohort is None:
                run_key = (entry.run_id, str(entry.dataset_fingerprint))
                run_hist[run_key].append(mech)
                data_hist[str(entry.dataset_fingerprint)].append(mech)
                entry.epsilon_rdp, _ = self.eps(run_hist[run_key], delta, "rdp")
                entry.epsilon_prv, prv_err = self.eps(run_hist[run_key], delta, "prv")
                entry.epsilon_pld, pld_err = self.eps(run_hist[run_key], delta, "pld")
                entry.epsilon_dataset, data_err = self.eps(data_hist[run_key[1]], delta, acc)
                data_history = data_hist[run_key[1]]
                what = f"all spends on dataset {entry.dataset_fingerprint}"
            else:
                worst: dict[str, tuple[float | None, float | None]] = {}
                errors: dict[str, str] = {}
                for name in ("rdp", "prv", "pld"):
                    try:
                        worst[name] = self._record_eps(cohorts[cohort], cohorts, spends, delta, name, entry.run_id)
                    except AccountingError as exc:
                        worst[name], errors[name] = (None, None), str(exc)
                (entry.epsilon_rdp, _), (entry.epsilon_prv, _), (entry.epsilon_pld, _) = (
                    worst["rdp"],
                    worst["prv"],
                    worst["pld"],
                )
                entry.epsilon_dataset = worst[acc][1] if acc in worst else None
                prv_err, data_err, pld_err = errors.get("prv"), errors.get(acc), errors.get("pld")
                data_independent = worst[independent_of(acc)][1] if independent_of(acc) in worst else None
                what = f"the worst of its {len(cohorts[cohort])} records over every spend holding it"
            if prv_err and acc != "prv":
                self.notes.append(f"{path.name} row {seq}: no PRV value ({prv_err})")
            recomputed = entry.epsilon_recomputed
            if recomputed is None or entry.epsilon_dataset is None:
                self.flag(
                    "unverifiable",
                    path,
                    seq,
                    f"row {seq}: the {acc} accountant cannot recompute its "
                    f"epsilon: {(pld_err if acc == 'pld' else prv_err) or data_err}",
                    "spend",
                    site,
                )
                continue
            if _below(row["epsilon_run"], recomputed, tol):
                self.flag(
                    "epsilon-underreported",
                    path,
                    seq,
                    f"row {seq} (run {entry.run_id}, round {entry.round}, site {site}) records run epsilon "
                    f"{_fmt(row['epsilon_run'])} but its mechanisms give {_fmt(recomputed)} ({acc})",
                    "spend",
                    site,
                )
            if _below(row["epsilon_dataset"], entry.epsilon_dataset, tol):
                self.flag(
                    "epsilon-underreported",
                    path,
                    seq,
                    f"row {seq} (run {entry.run_id}, round {entry.round}, site {site}) records dataset "
                    f"epsilon {_fmt(row['epsilon_dataset'])} but {what} gives "
                    f"{_fmt(entry.epsilon_dataset)} ({acc})",
                    "spend",
                    site,
                )
            self._independent(
                path, entry, data_history, delta, row["epsilon_dataset"], "spend", dataset_independent=data_independent
            )
            budget = _num(row["max_epsilon"])
            if budget is not None and entry.epsilon_dataset > budget + tol:
                whom = f"dataset {entry.dataset_fingerprint}" if cohort is None else f"a record of cohort {cohort[:16]}"
                self.flag(
                    "budget-exceeded",
                    path,
                    seq,
                    f"row {seq} (run {entry.run_id}, round {entry.round}, site {site}) takes {whom} to epsilon "
                    f"{_fmt(entry.epsilon_dataset)} ({acc}), above the site budget max-epsilon {_fmt(budget)}",
                    "spend",
                    site,
                )

    # -- server ledgers ----------------------------------------------------------------------------------------

    def _server(self, path: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
        aggregation = {r["run_id"]: r["aggregation"] for r in runs}
        self.server_runs.update(str(r["run_id"]) for r in runs)
        self.server_runs.update(str(r["run_id"]) for r in rows)
        hist: dict[tuple[str, str], list[Mechanism]] = defaultdict(list)
        for row in rows:
            seq, client = row["seq"], str(row["client_id"])
            entry = AuditEntry(
                source=SERVER,
                file=str(path),
                seq=seq,
                run_id=str(row["run_id"]),
                round=row["round"],
                party=client,
                status=str(row["status"]),
                node_id=row["node_id"],
                dataset_fingerprint=row["dataset_fingerprint"],
                params_fingerprint=None,
                **{k: row[k] for k in _MECH_FIELDS},
                epsilon_reported=row["epsilon_reported"],
                epsilon_dataset_reported=row["epsilon_dataset_reported"],
                max_epsilon=None,
                aggregation=aggregation.get(row["run_id"]),
                recorded_at=row["recorded_at"],
                noise_source=row.get("noise_source"),
            )
            self.entries.append(entry)
            if entry.run_id not in aggregation:
                self.notes.append(
                    f"{path.name}: reports for run {entry.run_id} but no run record (configuration "
                    "and aggregation mode unknown)"
                )
                aggregation[entry.run_id] = None  # note once
            if entry.status != STATUS_TRAINED:
                continue
            mech, why = _mechanism_of(row)
            if mech is None:
                self.flag("invalid-entry", path, seq, f"report row {seq} cannot be accounted: {why}", "reports", client)
                continue
            key = (entry.run_id, client)
            hist[key].append(mech)
            delta, acc = float(row["delta"]), row["accountant"]
            entry.epsilon_rdp, _ = self.eps(hist[key], delta, "rdp")
            entry.epsilon_prv, prv_err = self.eps(hist[key], delta, "prv")
            entry.epsilon_pld, pld_err = self.eps(hist[key], delta, "pld")
            recomputed = entry.epsilon_recomputed
            if recomputed is None:
                self.flag(
                    "unverifiable",
                    path,
                    seq,
                    f"report row {seq}: the {acc} accountant cannot recompute its "
                    f"epsilon: {pld_err if acc == 'pld' else prv_err}",
                    "reports",
                    client,
                )
                continue
            if _below(row["epsilon_reported"], recomputed, self.tolerance):
                self.flag(
                    "epsilon-underreported",
                    path,
                    seq,
                    f"report row {seq} (run {entry.run_id}, round {entry.round}, client {client}) has epsilon "
                    f"{_fmt(row['epsilon_reported'])} but the mechanisms the server recorded for this client "
                    f"give {_fmt(recomputed)} ({acc})",
                    "reports",
                    client,
                )
            self._independent(path, entry, None, delta, None, "reports")

    # -- independent recomputation -----------------------------------------------------------------------------

    def _independent(
        self,
        path: Path,
        entry: AuditEntry,
        data_history: Sequence[Mechanism] | None,
        delta: float,
        dataset_reported: Any,
        table: str,
        dataset_independent: float | None = None,
    ) -> None:
        """Check the row's recorded epsilons against an accountant of another library than the one it names.

        The run epsilon (and, for site rows, the dataset epsilon) may sit below the independent value only by the
        accountants' own error; more is under-reporting, whichever library is wrong.
        """
        ind = independent_of(str(entry.accountant))
        entry.independent_accountant = ind
        entry.epsilon_independent = entry.epsilon_pld if ind == "pld" else entry.epsilon_prv
        checks = [("run", entry.epsilon_reported, entry.epsilon_independent)]
        if data_history is not None:
            entry.epsilon_dataset_independent, _ = self.eps(data_history, delta, ind)
        elif dataset_independent is not None:  # per-record budgets: the worst record's, computed by the caller
            entry.epsilon_dataset_independent = dataset_independent
        if data_history is not None or dataset_independent is not None:
            checks.append(("dataset", dataset_reported, entry.epsilon_dataset_independent))
        what = "report row" if table == "reports" else "row"
        for label, reported, independent in checks:
            if independent is None:
                self.notes.append(
                    f"{path.name} {what} {entry.seq}: no independent {ind} value for its {label} "
                    "epsilon (the epsilon is too large for that accountant)"
                )
                continue
            if self._flagged_under(path, entry.seq, table, label):
                continue  # the recorded accountant's recomputation already caught it: one violation is enough
            if _below_independent(reported, independent, self.tolerance):
                self.flag(
                    "epsilon-underreported",
                    path,
                    entry.seq,
                    f"{what} {entry.seq} (run {entry.run_id}, round {entry.round}, {entry.party}) records "
                    f"{label} epsilon {_fmt(reported)} ({entry.accountant}) but the independent {ind} "
                    f"recomputation gives {_fmt(independent)}, more than "
                    f"{100 * INDEPENDENT_REL_TOLERANCE:g} % above it",
                    table,
                    entry.party,
                )

    def _flagged_under(self, path: Path, seq: int, table: str, label: str) -> bool:
        words = ("has epsilon", "run epsilon") if label == "run" else ("dataset epsilon",)
        return any(
            v.kind == "epsilon-underreported"
            and v.file == str(path)
            and v.seq == seq
            and v.table == table
            and any(w in v.message for w in words)
            for v in self.violations
        )

    # -- cross-check -------------------------------------------------------------------------------------------

    def cross_check(self) -> None:
        site_rows: dict[tuple[str, str, int], list[AuditEntry]] = defaultdict(list)
        server_rows: dict[tuple[str, str, int], list[AuditEntry]] = defaultdict(list)
        for e in self.entries:
            if e.source == SITE and e.purpose != "train":
                continue  # a metrics release: in the site's budget, never in a training report to the server
            (site_rows if e.source == SITE else server_rows)[(e.run_id, e.party, e.round)].append(e)
        server_runs = self.server_runs
        absent: dict[str, int] = defaultdict(int)
        for key, reports in server_rows.items():
            run_id, client, rnd = key
            at_site = site_rows.get(key, [])
            for rep in reports:
                if rep.status == STATUS_TRAINED:
                    if client not in self.site_parties:
                        absent[client] += 1
                    elif not at_site:
                        self.flag(
                            "missing-at-site",
                            Path(rep.file),
                            rep.seq,
                            f"the server recorded client {client} as trained in run {run_id} round {rnd}, but "
                            f"no site ledger has that spend",
                            "reports",
                            client,
                        )
                    else:
                        self._compare(rep, at_site)
                elif at_site and rep.status == STATUS_BUDGET_EXHAUSTED:
                    self.flag(
                        "report-mismatch",
                        Path(rep.file),
                        rep.seq,
                        f"client {client} reported its budget exhausted in run {run_id} round {rnd}, yet its "
                        f"ledger records a spend for that round (row {at_site[0].seq} of {at_site[0].file})",
                        "reports",
                        client,
                    )
        for client, n in sorted(absent.items()):
            self.notes.append(
                f"no site ledger for client {client} among the audited paths: its {n} trained "
                "round(s) recorded by the server were not cross-checked"
            )
        for key, spends in site_rows.items():
            run_id, site, rnd = key
            if run_id not in server_runs:
                continue  # a run of another federation, or the server ledger was not given
            statuses = {rep.status for rep in server_rows.get(key, [])}
            if len(spends) > 1:
                self.notes.append(
                    f"site {site} recorded run {run_id} round {rnd} {len(spends)} times (rows "
                    f"{', '.join(str(s.seq) for s in spends)}): a retried round, each spend counted"
                )
            if STATUS_TRAINED in statuses or STATUS_BUDGET_EXHAUSTED in statuses:
                continue  # compared (or flagged) above
            if STATUS_DROPPED in statuses:
                self.notes.append(
                    f"site {site} recorded a spend in run {run_id} round {rnd} whose reply the server "
                    "recorded as dropped: the spend counts against the site's budget"
                )
                continue
            for spend in spends:
                self.flag(
                    "missing-at-server",
                    Path(spend.file),
                    spend.seq,
                    f"site {site} recorded a spend in run {run_id} round {rnd} (row {spend.seq}) that the "
                    "server ledger does not record for this client",
                    "spend",
                    site,
                )

    def _compare(self, rep: AuditEntry, spends: list[AuditEntry]) -> None:
        def diffs(spend: AuditEntry) -> list[str]:
            out = []
            for name in _MECH_FIELDS:
                a, b = getattr(rep, name), getattr(spend, name)
                same = (
                    (a == b)
                    if not (_num(a) is not None and _num(b) is not None)
                    else math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
                )
                if not same:
                    out.append(f"{name} server {a!r} vs site {b!r}")
            if rep.noise_source and rep.noise_source != spend.noise_source:
                out.append(f"noise_source server {rep.noise_source!r} vs site {spend.noise_source!r}")
            if rep.dataset_fingerprint and rep.dataset_fingerprint != spend.dataset_fingerprint:
                out.append(
                    f"dataset_fingerprint server {rep.dataset_fingerprint!r} vs site {spend.dataset_fingerprint!r}"
                )
            for mine, theirs, label in (
                (rep.epsilon_reported, spend.epsilon_reported, "epsilon (run)"),
                (rep.epsilon_dataset_reported, spend.epsilon_dataset_reported, "epsilon (dataset)"),
            ):
                if label == "epsilon (dataset)" and mine is None:
                    continue
                x, y = _num(mine), _num(theirs)
                if x is None or y is None or not (x == y or abs(x - y) <= self.tolerance):
                    out.append(f"{label} server {_fmt(mine)} vs site {_fmt(theirs)}")
            return out

        found = [diffs(s) for s in spends]
        if any(not d for d in found):
            return
        spend = spends[-1]
        self.flag(
            "report-mismatch",
            Path(rep.file),
            rep.seq,
            f"run {rep.run_id} round {rep.round} client {rep.party}: the server's record differs from the "
            f"site's (row {spend.seq} of {Path(spend.file).name}): {'; '.join(found[-1])}",
            "reports",
            rep.party,
        )

    # -- summary -----------------------------------------------------------------------------------------------

    def finish(self) -> AuditReport:
        by_row: dict[tuple[str, str, int], list[str]] = defaultdict(list)
        for v in self.violations:
            if v.seq is not None and v.table is not None:
                by_row[(v.file, v.table, v.seq)].append(v.kind)
        for e in self.entries:
            e.problems = sorted(set(by_row.get((e.file, "spend" if e.source == SITE else "reports", e.seq), [])))
        groups: dict[tuple[str, str, str], list[AuditEntry]] = defaultdict(list)
        for e in self.entries:
            groups[(e.source, e.file, e.party)].append(e)
        summaries = []
        for (source, file, party), rows in sorted(groups.items()):
            trained = [e for e in rows if e.status == STATUS_TRAINED]
            run_eps = [e.epsilon_recomputed for e in trained if e.epsilon_recomputed is not None]
            data_eps = [e.epsilon_dataset for e in trained if e.epsilon_dataset is not None]
            last = trained[-1] if trained else None
            summaries.append(
                PartySummary(
                    source=source,
                    party=party,
                    file=file,
                    runs=sorted({e.run_id for e in rows}),
                    rounds_trained=sum(e.purpose == "train" for e in trained),
                    budget_exhausted=sum(e.status == STATUS_BUDGET_EXHAUSTED for e in rows),
                    dropped=sum(e.status == STATUS_DROPPED for e in rows),
                    accountant=last.accountant if last else None,
                    epsilon_run=max(run_eps) if run_eps else None,
                    epsilon_dataset=max(data_eps) if data_eps else None,
                    max_epsilon=_num(last.max_epsilon) if last else None,
                    violations=sum(v.file == file and (v.party in (None, party)) for v in self.violations),
                    seeded_rounds=sum(e.noise_source == NOISE_SOURCE_SEEDED for e in trained),
                )
            )
        for s in summaries:
            if s.source == SITE and s.seeded_rounds:
                self.notes.append(
                    f"{Path(s.file).name}: {s.seeded_rounds} of {s.rounds_trained} round(s) of site "
                    f"{s.party} used seeded noise ({SEEDED_FLAG})"
                )
        return AuditReport(
            tolerance=self.tolerance,
            files=self.files,
            entries=self.entries,
            violations=self.violations,
            notes=list(dict.fromkeys(self.notes)),
            summaries=summaries,
        )


def audit_paths(paths: Sequence[Path], tolerance: float = 1e-6) -> AuditReport:
    """Audit every ledger under ``paths`` (files, or folders searched recursively for ``*.ledger.sqlite``).

    Raises AuditInputError when a path does not exist or a folder holds no ledger (an audit of nothing must not
    pass); every finding about the ledgers themselves is a violation or a note in the report.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise AuditInputError(f"tolerance must be a number >= 0, got {tolerance!r}")
    auditor = _Auditor(float(tolerance))
    for path in find_ledgers(paths):
        try:
            auditor.load(path)
        except Exception as exc:
            auditor.entries = [e for e in auditor.entries if e.file != str(path)]
            auditor.flag("unreadable", path, None, f"{path.name} could not be audited: {type(exc).__name__}: {exc}")
            auditor.files.append(LedgerFileInfo(str(path), "unknown", 0, False))
    auditor.cross_check()
    return auditor.finish()


# ----------------------------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}g}"


def report_to_json(report: AuditReport) -> dict[str, Any]:
    """The whole report as plain JSON types; entries carry the mechanism fields and the recomputed epsilons."""
    entries = []
    for e in report.entries:
        d = asdict(e)
        d["epsilon_recomputed"] = e.epsilon_recomputed
        d["independent_ratio"] = e.independent_ratio
        entries.append(d)
    summaries = []
    for s in report.summaries:
        d = asdict(s)
        d["budget_left"] = s.budget_left
        summaries.append(d)
    return jsonable(
        {
            "ok": report.ok,
            "tolerance": report.tolerance,
            "independent_rel_tolerance": INDEPENDENT_REL_TOLERANCE,
            "counts": {
                "files": len(report.files),
                "entries": len(report.entries),
                "violations": len(report.violations),
                "notes": len(report.notes),
            },
            "files": [asdict(f) for f in report.files],
            "violations": [asdict(v) for v in report.violations],
            "notes": list(report.notes),
            "summaries": summaries,
            "entries": entries,
        }
    )


def render_table(report: AuditReport, entries: bool = False) -> Any:
    """What ``privatune audit`` prints: by default a compact view that fits an 80-column terminal, with ``entries``
    every accounted row with its mechanism, reported and recomputed epsilons, and what is wrong with it.

    The compact view is two small tables: the ledgers (kind, rows, chain intact or broken) and one row per site or
    client and ledger: its run(s), trained rounds, the last epsilon (reported, recomputed with RDP, PRV and PLD),
    the site budget and a status. The JSON and Markdown reports always carry every field of every row.
    """
    from rich import box
    from rich.console import Group

    verdict = "[bold green]PASS[/]" if report.ok else f"[bold red]FAIL[/]: {len(report.violations)} violation(s)"
    caption = f"{verdict} · {len(report.files)} ledger(s) · tolerance {report.tolerance:g}"
    if entries:
        table = Table(title="Privacy ledger audit", caption=caption)
        for name, justify in (
            ("Src", "left"),
            ("Ledger", "left"),
            ("Seq", "right"),
            ("Run", "left"),
            ("Rnd", "right"),
            ("Site/client", "left"),
            ("Status", "left"),
            ("σ", "right"),
            ("q", "right"),
            ("Steps", "right"),
            ("C", "right"),
            ("δ", "right"),
            ("Acc", "left"),
            ("ε reported", "right"),
            ("ε RDP", "right"),
            ("ε PRV", "right"),
            ("ε PLD", "right"),
            ("rep/ind", "right"),
            ("ε dataset", "right"),
            ("Budget", "right"),
            ("Check", "left"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for e in report.entries:
            check = "[green]ok[/]" if not e.problems else "[red]" + ", ".join(e.problems) + "[/]"
            table.add_row(
                e.source,
                Path(e.file).name,
                str(e.seq),
                e.run_id,
                str(e.round),
                e.party,
                e.status,
                _fmt(e.noise_multiplier),
                _fmt(e.sample_rate),
                _fmt(e.steps),
                _fmt(e.max_grad_norm),
                _fmt(e.delta, 3),
                _fmt(e.accountant),
                _fmt(e.epsilon_reported),
                _fmt(e.epsilon_rdp),
                _fmt(e.epsilon_prv),
                _fmt(e.epsilon_pld),
                _fmt(e.independent_ratio),
                _fmt(e.epsilon_dataset),
                _fmt(e.max_epsilon),
                check,
            )
        return table

    ledgers = Table(
        title="Privacy ledger audit", box=box.SIMPLE_HEAD, title_justify="left", collapse_padding=True, pad_edge=False
    )
    for name, justify in (("Ledger", "left"), ("Kind", "left"), ("Rows", "right"), ("Chain", "left")):
        ledgers.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for f in report.files:
        ledgers.add_row(Path(f.path).name, f.kind, str(f.rows), "intact" if f.chain_ok else "[bold red]BROKEN[/]")

    last: dict[tuple[str, str, str], AuditEntry] = {}
    for e in report.entries:
        if e.status == STATUS_TRAINED:
            last[(e.source, e.file, e.party)] = e  # entries are in ledger order: the last one wins
    clients = Table(
        box=box.SIMPLE_HEAD,
        caption=caption + " · --entries: every row",
        caption_justify="left",
        collapse_padding=True,
        pad_edge=False,
    )
    for name, justify in (
        ("Src", "left"),
        ("Party", "left"),
        ("Run", "left"),
        ("Rnds", "right"),
        ("ε rep.", "right"),
        ("ε RDP", "right"),
        ("ε PRV", "right"),
        ("ε PLD", "right"),
        ("Budget", "right"),
        ("Status", "left"),
    ):
        # Numbers never wrap; a long run id is cut with an ellipsis before anything else gives way.
        wraps = name in ("Party", "Status")
        clients.add_column(
            name,
            justify=justify,
            no_wrap=not wraps,  # type: ignore[arg-type]
            overflow="ellipsis" if name == "Run" else "fold",
            min_width=8 if name == "Party" else len(name),  # "client-9" stays on one line
            max_width=10 if name == "Run" else None,
        )

    def eps(x: Any) -> str:  # fixed decimals keep the columns aligned; violations are in Status
        return f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else _fmt(x)

    for s in report.summaries:
        e = last.get((s.source, s.file, s.party))
        run = s.runs[0] if len(s.runs) == 1 else f"{len(s.runs)} runs"
        status = []
        if s.violations:
            status.append(f"[bold red]FAIL {s.violations}[/]")
        if s.budget_exhausted:
            status.append(f"[yellow]{s.budget_exhausted} exhausted[/]")
        if s.dropped:
            status.append(f"[yellow]{s.dropped} dropped[/]")
        budget = "—" if s.max_epsilon is None else f"{_fmt(s.max_epsilon)}"
        clients.add_row(
            s.source,
            s.party,
            run,
            str(s.rounds_trained),
            eps(e.epsilon_reported if e else None),
            eps(e.epsilon_rdp if e else None),
            eps(e.epsilon_prv if e else None),
            eps(e.epsilon_pld if e else None),
            budget,
            " ".join(status) or "[green]ok[/]",
        )
    seeded = [
        f"{s.party} ({s.seeded_rounds} of {s.rounds_trained})"
        for s in report.summaries
        if s.source == SITE and s.seeded_rounds
    ]
    if not seeded:
        return Group(ledgers, clients)
    from rich.text import Text

    flag = Text.from_markup(f"[bold yellow]seeded noise[/] at site {', '.join(seeded)} round(s): {SEEDED_FLAG}")
    return Group(ledgers, clients, flag)


def render_violations(report: AuditReport) -> Table:
    """The violations, one per row, each naming the file and row."""
    table = Table(title="Violations" if report.violations else "Violations: none")
    for name in ("Kind", "Ledger", "Row", "Message"):
        table.add_column(name)
    for v in report.violations:
        row = "—" if v.seq is None else ("head" if v.seq == 0 else f"{v.table or ''} {v.seq}".strip())
        table.add_row(f"[red]{v.kind}[/]", Path(v.file).name, row, v.message)
    return table


def _plot(report: AuditReport, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    site = [e for e in report.entries if e.source == SITE and e.epsilon_recomputed is not None]
    rows = site or [e for e in report.entries if e.source == SERVER and e.epsilon_recomputed is not None]
    runs = sorted({e.run_id for e in rows})
    panels = 2 if site else 1
    fig = Figure(figsize=(7 * panels, 4.5))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    series: dict[tuple[str, str], list[AuditEntry]] = defaultdict(list)
    for e in rows:
        series[(e.party, e.run_id)].append(e)
    for (party, run_id), pts in sorted(series.items()):
        label = party if len(runs) == 1 else f"{party} · {run_id}"
        pts = sorted(pts, key=lambda e: (e.round, e.seq))
        # an infinite epsilon (no noise) is drawn at the top of the axis rather than dropped
        axes[0].plot(
            [e.round for e in pts], [min(e.epsilon_recomputed, _PLOT_CAP) for e in pts], marker="o", label=label
        )
        if site:
            data = [(e.round, min(e.epsilon_dataset, _PLOT_CAP)) for e in pts if e.epsilon_dataset is not None]
            axes[1].plot([x for x, _ in data], [y for _, y in data], marker="o", label=label)
    axes[0].set_title("epsilon of the run after each round (recomputed)")
    if site:
        axes[1].set_title("epsilon of the dataset, all runs (recomputed)")
        budgets = sorted({float(e.max_epsilon) for e in site if _num(e.max_epsilon) is not None})
        for b in budgets:
            axes[1].axhline(b, linestyle="--", color="red", linewidth=1)
            axes[1].annotate(
                f"max-epsilon {b:g}",
                (0.01, b),
                xycoords=("axes fraction", "data"),
                color="red",
                fontsize=8,
                va="bottom",
            )
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("epsilon")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no trained rounds", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(report: AuditReport, out_dir: Path) -> ReportFiles:
    """Write ``audit.md`` (verdict, ledgers, violations, notes, summaries, entries), ``epsilon_per_round.png``
    and ``audit.json`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(markdown=out / MARKDOWN_NAME, plot=out / PLOT_NAME, json=out / JSON_NAME)
    _plot(report, files.plot)
    files.json.write_text(json.dumps(report_to_json(report), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    lines = ["# Privacy ledger audit", ""]
    verdict = "**PASS**: no violations" if report.ok else f"**FAIL**: {len(report.violations)} violation(s)"
    lines += [
        f"{verdict}. {len(report.files)} ledger(s), {len(report.entries)} row(s), tolerance "
        f"{report.tolerance:g}. Every epsilon below was recomputed from the recorded mechanisms with Opacus' "
        "RDP and PRV accountants and, independently of Opacus, with dp-accounting's PLD (rows accounted with "
        f"PLD are checked against Opacus' PRV); a recorded epsilon more than "
        f"{100 * INDEPENDENT_REL_TOLERANCE:g} % below the independent value is a violation.",
        "",
    ]
    lines += ["## Ledgers", "", "| File | Kind | Rows | Chain |", "|---|---|---:|---|"]
    lines += [
        f"| {_md_escape(f.path)} | {f.kind} | {f.rows} | {'intact' if f.chain_ok else 'BROKEN'} |" for f in report.files
    ]
    lines += ["", "## Violations", ""]
    if report.violations:
        lines += ["| Kind | File | Row | Message |", "|---|---|---|---|"]
        for v in report.violations:
            row = "—" if v.seq is None else ("head" if v.seq == 0 else f"{v.table or ''} {v.seq}".strip())
            lines.append(f"| {v.kind} | {_md_escape(Path(v.file).name)} | {row} | {_md_escape(v.message)} |")
    else:
        lines.append("None.")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {_md_escape(n)}" for n in report.notes]
    lines += [
        "",
        "## Per site and client",
        "",
        "| Source | Party | File | Runs | Trained | Budget exhausted | Dropped | Acc | ε run (max) | "
        "ε dataset | max-epsilon | Left | Violations |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in report.summaries:
        lines.append(
            f"| {s.source} | {_md_escape(s.party)} | {_md_escape(Path(s.file).name)} | "
            f"{_md_escape(', '.join(s.runs))} | {s.rounds_trained} | {s.budget_exhausted} | {s.dropped} | "
            f"{_fmt(s.accountant)} | {_fmt(s.epsilon_run)} | {_fmt(s.epsilon_dataset)} | "
            f"{_fmt(s.max_epsilon)} | {_fmt(s.budget_left)} | {s.violations} |"
        )
    lines += [
        "",
        "## Noise sources",
        "",
        "Where each site's DP noise came from, as its ledger records it (`site-csprng`: a CSPRNG only the site "
        f"knows; `seeded`: {SEEDED_FLAG}).",
        "",
        "| Source | Party | File | Noise | Flag |",
        "|---|---|---|---|---|",
    ]
    for s in report.summaries:
        mine = [
            e
            for e in report.entries
            if (e.source, e.file, e.party) == (s.source, s.file, s.party) and e.status == STATUS_TRAINED
        ]
        kinds = ", ".join(sorted({e.noise_source or "not reported" for e in mine})) or "—"
        flag = SEEDED_FLAG if s.seeded_rounds else ""
        lines.append(f"| {s.source} | {_md_escape(s.party)} | {_md_escape(Path(s.file).name)} | {kinds} | {flag} |")
    lines += [
        "",
        f"![epsilon per round per client]({PLOT_NAME})",
        "",
        "## Rows",
        "",
        "| Src | File | Seq | Run | Round | Party | Status | σ | q | Steps | C | δ | Acc | ε reported | "
        "ε RDP | ε PRV | ε PLD | Independent | ε reported / independent | ε dataset | max-epsilon | Check |",
        "|---|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for e in report.entries:
        lines.append(
            f"| {e.source} | {_md_escape(Path(e.file).name)} | {e.seq} | {_md_escape(e.run_id)} | {e.round} | "
            f"{_md_escape(e.party)} | {e.status} | {_fmt(e.noise_multiplier)} | {_fmt(e.sample_rate)} | "
            f"{_fmt(e.steps)} | {_fmt(e.max_grad_norm)} | {_fmt(e.delta, 3)} | {_fmt(e.accountant)} | "
            f"{_fmt(e.epsilon_reported)} | {_fmt(e.epsilon_rdp)} | {_fmt(e.epsilon_prv)} | {_fmt(e.epsilon_pld)} | "
            f"{_fmt(e.independent_accountant)} | {_fmt(e.independent_ratio)} | "
            f"{_fmt(e.epsilon_dataset)} | {_fmt(e.max_epsilon)} | {', '.join(e.problems) or 'ok'} |"
        )
    files.markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files
