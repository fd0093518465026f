"""The checks of each ledger on its own: its chains, its cohorts, and every row's epsilons and budget.

Each problem becomes a violation (or a note) in the Findings, never an exception and never a print: a bad
ledger does not stop the audit. The epsilons the rows are checked against come from :mod:`.recompute`; the
server-against-site comparison is :mod:`.cross_check`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from privatune.common.accountants import PLD, PRV
from privatune.common.accounting import INDEPENDENT_REL_TOLERANCE, Mechanism
from privatune.common.audit.findings import Findings
from privatune.common.audit.inputs import site_id_from_name
from privatune.common.audit.recompute import (
    SiteHistories,
    independent_epsilons,
    ledger_totals,
    mechanism_of,
    run_epsilons,
)
from privatune.common.audit.report import MECHANISM_FIELDS, SERVER, SITE, AuditEntry, LedgerFileInfo
from privatune.common.audit.values import fmt, num
from privatune.common.ledger import PURPOSE_TRAIN, SELECTION_SCHEMA, SITE_SCHEMA, STATUS_TRAINED, Inspection
from privatune.common.protocol import NOISE_SOURCE_SEEDED
from privatune.common.record_budget import CohortError, cohort_id_of, unpack_ids


def below(reported: Any, recomputed: float | None, tolerance: float) -> bool:
    """A reported epsilon is too low when it is below the recomputation by more than the tolerance (or missing)."""
    if recomputed is None:
        return False
    value = num(reported)
    if value is None or math.isnan(value):
        return True
    return value < recomputed - tolerance


def _below_independent(reported: Any, independent: float, tolerance: float) -> bool:
    """Below the independent value by more than the accountants' relative error (and the audit's tolerance)."""
    return below(reported, independent * (1.0 - INDEPENDENT_REL_TOLERANCE), tolerance)


def check_ledger(audit: Findings, path: Path, found: Inspection) -> None:
    """Account one ledger file as its verification ``found`` it; every problem with it becomes a violation."""
    if found.schema == SELECTION_SCHEMA:
        return  # private-selection records: audited with the site ledger beside them (selection.py)
    for p in found.problems:
        if p.table is None:  # not a ledger, or its pages / structure are damaged
            audit.flag("unreadable", path, None, p.detail)
            continue
        where = {None: "as a whole", 0: "head"}.get(p.seq, f"row {p.seq}")
        audit.flag(f"chain-{p.kind}", path, p.seq, f"{p.table} {where}: {p.detail}", table=p.table)
    if found.schema is None:
        audit.files.append(LedgerFileInfo(str(path), "unknown", 0, False, audit.name(path)))
        return
    if found.version == "1":
        audit.notes.append(
            f"{audit.name(path)} is a version 1 ledger: its chains are verified, but its meta table "
            "(schema, creation time) is not hash-chained"
        )
    # Only rows that decoded with their declared types are accounted; the others are named above.
    if found.schema == SITE_SCHEMA:
        rows = found.rows.get("spend", [])
        check_site_rows(audit, path, rows, check_cohorts(audit, path, found.rows.get("cohorts", [])))
        kind = SITE
    else:
        rows = found.rows.get("reports", [])
        check_server_rows(audit, path, found.rows.get("runs", []), rows)
        kind = SERVER
    audit.files.append(LedgerFileInfo(str(path), kind, len(rows), not found.problems, audit.name(path)))


def check_cohorts(audit: Findings, path: Path, rows: list[dict[str, Any]]) -> dict[str, frozenset[bytes]]:
    """The cohorts whose ids match their cohort id and size; a mismatch is a violation."""
    out: dict[str, frozenset[bytes]] = {}
    keys = {row.get("key_check") for row in rows}
    if len(keys) > 1:
        audit.flag(
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
                raise CohortError(f"its ids do not match its cohort id {row['cohort_id']!r} and size {row['size']!r}")
        except (CohortError, TypeError) as exc:
            audit.flag("invalid-cohort", path, seq, f"cohort row {seq}: {exc}", "cohorts")
            continue
        out[row["cohort_id"]] = frozenset(ids)
    return out


def _entry(source: str, path: Path, row: dict[str, Any], party: str, **rest: Any) -> AuditEntry:
    """An accounted row as recorded: what site spends and server reports share, plus ``rest`` (their own columns)."""
    return AuditEntry(
        source=source,
        file=str(path),
        seq=row["seq"],
        run_id=str(row["run_id"]),
        round=row["round"],
        party=str(row[party]),
        dataset_fingerprint=row["dataset_fingerprint"],
        **{k: row[k] for k in MECHANISM_FIELDS},
        recorded_at=row["recorded_at"],
        **rest,
    )


def _site_entry(path: Path, row: dict[str, Any]) -> AuditEntry:
    return _entry(
        SITE,
        path,
        row,
        "site_id",
        status=STATUS_TRAINED,
        node_id=None,
        params_fingerprint=row["params_fingerprint"],
        epsilon_reported=row["epsilon_run"],
        epsilon_dataset_reported=row["epsilon_dataset"],
        max_epsilon=row["max_epsilon"],
        noise_source=row.get("noise_source") or NOISE_SOURCE_SEEDED,
        purpose=str(row.get("purpose") or "train"),
    )


def check_site_rows(
    audit: Findings, path: Path, rows: list[dict[str, Any]], cohorts: dict[str, frozenset[bytes]]
) -> None:
    """Recompute and check every spend of a site ledger, in ledger order (each composes on the ones before), then
    compose the ledger's totals per dataset and for the site from the rows it could account."""
    named = site_id_from_name(path)
    if named:
        audit.site_parties.add(named)
    histories = SiteHistories(audit.eps, cohorts)
    tol = audit.tolerance
    accounted: list[dict[str, Any]] = []
    for row in rows:
        _check_site_row(audit, path, row, cohorts, histories, tol, accounted)
    audit.site_totals[str(path)] = ledger_totals(audit.eps, accounted, cohorts)


def _check_site_row(
    audit: Findings,
    path: Path,
    row: dict[str, Any],
    cohorts: dict[str, frozenset[bytes]],
    histories: SiteHistories,
    tol: float,
    accounted: list[dict[str, Any]],
) -> None:
    """Recompute and check one spend; a row whose mechanism and cohort can be accounted joins ``accounted``."""
    seq, site = row["seq"], str(row["site_id"])
    audit.site_parties.add(site)
    cohort = row.get("cohort_id")
    entry = _site_entry(path, row)
    if (row.get("purpose") or PURPOSE_TRAIN) == PURPOSE_TRAIN:
        audit.entries.append(entry)  # other purposes count in budgets but are no training round to match
    mech, why = mechanism_of(row)
    if mech is None:
        audit.flag("invalid-entry", path, seq, f"row {seq} cannot be accounted: {why}", "spend", site)
        return
    if cohort is not None and cohort not in cohorts:
        audit.flag(
            "invalid-cohort",
            path,
            seq,
            f"row {seq} names cohort {cohort!r}, which the ledger does "
            "not hold (or holds altered): its records cannot be "
            "accounted",
            "spend",
            site,
        )
        return
    delta, acc = float(row["delta"]), row["accountant"]
    accounted.append(row)
    done = histories.add(entry, mech, cohort, delta, acc)
    prv_err, pld_err = done.errors.get(PRV), done.errors.get(PLD)
    if prv_err and acc != PRV:
        audit.notes.append(f"{audit.name(path)} row {seq}: no PRV value ({prv_err})")
    recomputed = entry.epsilon_recomputed
    if recomputed is None or entry.epsilon_dataset is None:
        audit.flag(
            "unverifiable",
            path,
            seq,
            f"row {seq}: the {acc} accountant cannot recompute its "
            f"epsilon: {(pld_err if acc == PLD else prv_err) or done.errors.get('dataset')}",
            "spend",
            site,
        )
        return
    if below(row["epsilon_run"], recomputed, tol):
        audit.flag(
            "epsilon-underreported",
            path,
            seq,
            f"row {seq} (run {entry.run_id}, round {entry.round}, site {site}) records run epsilon "
            f"{fmt(row['epsilon_run'])} but its mechanisms give {fmt(recomputed)} ({acc})",
            "spend",
            site,
        )
    if below(row["epsilon_dataset"], entry.epsilon_dataset, tol):
        audit.flag(
            "epsilon-underreported",
            path,
            seq,
            f"row {seq} (run {entry.run_id}, round {entry.round}, site {site}) records dataset "
            f"epsilon {fmt(row['epsilon_dataset'])} but {done.what} gives "
            f"{fmt(entry.epsilon_dataset)} ({acc})",
            "spend",
            site,
        )
    check_independent(
        audit, path, entry, done.data_history, delta, row["epsilon_dataset"], "spend", done.data_independent
    )
    budget = num(row["max_epsilon"])
    if budget is not None and entry.epsilon_dataset > budget + tol:
        whom = f"dataset {entry.dataset_fingerprint}" if cohort is None else f"a record of cohort {cohort[:16]}"
        audit.flag(
            "budget-exceeded",
            path,
            seq,
            f"row {seq} (run {entry.run_id}, round {entry.round}, site {site}) takes {whom} to epsilon "
            f"{fmt(entry.epsilon_dataset)} ({acc}), above the site budget max-epsilon {fmt(budget)}",
            "spend",
            site,
        )


def _server_entry(path: Path, row: dict[str, Any], aggregation: str | None) -> AuditEntry:
    return _entry(
        SERVER,
        path,
        row,
        "client_id",
        status=str(row["status"]),
        node_id=row["node_id"],
        params_fingerprint=None,
        epsilon_reported=row["epsilon_reported"],
        epsilon_dataset_reported=row["epsilon_dataset_reported"],
        max_epsilon=None,
        aggregation=aggregation,
        noise_source=row.get("noise_source"),
    )


def check_server_rows(audit: Findings, path: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Recompute and check every client report of a server ledger from the mechanisms the server recorded."""
    aggregation = {r["run_id"]: r["aggregation"] for r in runs}
    audit.server_runs.update(str(r["run_id"]) for r in runs)
    audit.server_runs.update(str(r["run_id"]) for r in rows)
    hist: dict[tuple[str, str], list[Mechanism]] = {}
    for row in rows:
        seq, client = row["seq"], str(row["client_id"])
        entry = _server_entry(path, row, aggregation.get(row["run_id"]))
        audit.entries.append(entry)
        if entry.run_id not in aggregation:
            audit.notes.append(
                f"{audit.name(path)}: reports for run {entry.run_id} but no run record (configuration "
                "and aggregation mode unknown)"
            )
            aggregation[entry.run_id] = None  # note once
        if entry.status != STATUS_TRAINED:
            continue
        mech, why = mechanism_of(row)
        if mech is None:
            audit.flag("invalid-entry", path, seq, f"report row {seq} cannot be accounted: {why}", "reports", client)
            continue
        history = hist.setdefault((entry.run_id, client), [])
        history.append(mech)
        delta, acc = float(row["delta"]), row["accountant"]
        errors = run_epsilons(audit.eps, entry, history, delta)
        recomputed = entry.epsilon_recomputed
        if recomputed is None:
            audit.flag(
                "unverifiable",
                path,
                seq,
                f"report row {seq}: the {acc} accountant cannot recompute its "
                f"epsilon: {errors.get(PLD) if acc == PLD else errors.get(PRV)}",
                "reports",
                client,
            )
            continue
        if below(row["epsilon_reported"], recomputed, audit.tolerance):
            audit.flag(
                "epsilon-underreported",
                path,
                seq,
                f"report row {seq} (run {entry.run_id}, round {entry.round}, client {client}) has epsilon "
                f"{fmt(row['epsilon_reported'])} but the mechanisms the server recorded for this client "
                f"give {fmt(recomputed)} ({acc})",
                "reports",
                client,
            )
        check_independent(audit, path, entry, None, delta, None, "reports")


def check_independent(
    audit: Findings,
    path: Path,
    entry: AuditEntry,
    data_history: list[Mechanism] | None,
    delta: float,
    dataset_reported: Any,
    table: str,
    dataset_independent: float | None = None,
) -> None:
    """Check the row's recorded epsilons against an accountant of another library than the one it names.

    The run epsilon (and, for site rows, the dataset epsilon) may sit below the independent value only by the
    accountants' own error; more is under-reporting, whichever library is wrong.
    """
    independent_epsilons(audit.eps, entry, data_history, delta, dataset_independent)
    ind = entry.independent_accountant
    checks = [("run", entry.epsilon_reported, entry.epsilon_independent)]
    if data_history is not None or dataset_independent is not None:
        checks.append(("dataset", dataset_reported, entry.epsilon_dataset_independent))
    what = "report row" if table == "reports" else "row"
    for label, reported, independent in checks:
        if independent is None:
            audit.notes.append(
                f"{audit.name(path)} {what} {entry.seq}: no independent {ind} value for its {label} "
                "epsilon (the epsilon is too large for that accountant)"
            )
            continue
        if _flagged_under(audit, path, entry.seq, table, label):
            continue  # the recorded accountant's recomputation already caught it: one violation is enough
        if _below_independent(reported, independent, audit.tolerance):
            audit.flag(
                "epsilon-underreported",
                path,
                entry.seq,
                f"{what} {entry.seq} (run {entry.run_id}, round {entry.round}, {entry.party}) records "
                f"{label} epsilon {fmt(reported)} ({entry.accountant}) but the independent {ind} "
                f"recomputation gives {fmt(independent)}, more than "
                f"{100 * INDEPENDENT_REL_TOLERANCE:g} % above it",
                table,
                entry.party,
            )


def _flagged_under(audit: Findings, path: Path, seq: int, table: str, label: str) -> bool:
    words = ("has epsilon", "run epsilon") if label == "run" else ("dataset epsilon",)
    return any(
        v.kind == "epsilon-underreported"
        and v.file == str(path)
        and v.seq == seq
        and v.table == table
        and any(w in v.message for w in words)
        for v in audit.violations
    )
