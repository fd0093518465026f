"""The audit of private-selection records (``privatune tune --privacy select``): each record beside a site ledger
(``site-<id>.selections.sqlite``, common/ledger/selections.py) is recomputed from that site ledger's own spends.

For each record: its file's chains are verified like any ledger's; every trial run id it names must have spends in
the site ledger; and its epsilon must equal the repeat-and-select bound (``common/private_selection.py``, the
computation the study used) on the worst RDP curve among those trials' recorded mechanisms, with the record's
distribution, mean, shape and delta. Anything else is a ``selection-mismatch`` naming the ledger, the study and the
row. The site ledger's own rows are audited as always (every trial composed): the record never lowers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from privatune.common.audit.findings import Findings
from privatune.common.audit.report import LedgerFileInfo
from privatune.common.ledger import (
    LEDGER_SUFFIX,
    SELECTION_SCHEMA,
    SELECTION_SUFFIX,
    SITE_SCHEMA,
    Inspection,
    LedgerError,
    SelectionRecord,
    inspect_ledger,
    selection_ledger_path,
)
from privatune.common.private_selection import dp_event_of_mechanisms, selection_epsilon

MISMATCH = "selection-mismatch"
TABLE = "selections"
_REL_TOLERANCE = 1e-9  # the recomputation is the same deterministic computation: only float noise may differ


def site_ledger_of(selection_file: Path) -> Path:
    """The site ledger a selections file sits beside (``selection_ledger_path`` read backwards)."""
    stem = selection_file.name[: -len(SELECTION_SUFFIX)]
    return selection_file.with_name("ledger.sqlite" if stem == "ledger" else stem + LEDGER_SUFFIX)


def check_selections(audit: Findings, opened: Mapping[Path, Inspection | Exception]) -> None:
    """Find the selections file of every site ledger audited (and any given directly) and recompute its records."""
    pairs: dict[Path, Path] = {}
    for path, found in opened.items():
        if isinstance(found, Inspection) and found.schema == SITE_SCHEMA:
            beside = selection_ledger_path(path)
            if beside.is_file():
                pairs[beside.resolve()] = path
        elif isinstance(found, Inspection) and found.schema == SELECTION_SCHEMA:
            pairs[path] = site_ledger_of(path)
    for selections, site in sorted(pairs.items()):
        given = opened.get(selections)
        check_file(audit, selections, given if isinstance(given, Inspection) else inspect_ledger(selections), site)


def check_file(audit: Findings, path: Path, found: Inspection, site: Path) -> None:
    """One selections file against the site ledger ``site`` beside it."""
    site_name = audit.name(site)
    audit.names[str(path)] = f"{site_name} selections"
    for p in found.problems:
        if p.table is None:
            audit.flag("unreadable", path, None, p.detail)
        else:
            where = {None: "as a whole", 0: "head"}.get(p.seq, f"row {p.seq}")
            audit.flag(f"chain-{p.kind}", path, p.seq, f"{p.table} {where}: {p.detail}", table=p.table)
    rows = found.rows.get(TABLE, [])
    audit.files.append(LedgerFileInfo(str(path), "selections", len(rows), not found.problems, audit.name(path)))
    if found.schema != SELECTION_SCHEMA:
        return
    spent = _spends_by_run(site)
    for row in rows:
        check_record(audit, path, site_name, row, spent)


def _spends_by_run(site: Path) -> dict[str, list[tuple[float, float, int]]] | None:
    """run id -> its (noise multiplier, sample rate, steps) spends in the site ledger; None: no readable one."""
    try:
        found = inspect_ledger(site) if site.is_file() else None
    except LedgerError:
        found = None
    if found is None or found.schema != SITE_SCHEMA:
        return None
    out: dict[str, list[tuple[float, float, int]]] = {}
    for r in found.rows.get("spend", []):
        out.setdefault(str(r["run_id"]), []).append(
            (float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"]))
        )
    return out


def check_record(
    audit: Findings, path: Path, site_name: str, row: dict[str, Any], spent: dict[str, list[Any]] | None
) -> None:
    """One record: its fields, its trials' spends, and its epsilon against the recomputation."""
    seq = row["seq"]
    where = f"{site_name}: study {row.get('study_id')!r} (selections row {seq})"

    def flag(message: str) -> None:
        audit.flag(MISMATCH, path, seq, f"{where}: {message}", table=TABLE, party=str(row.get("site_id")))

    if spent is None:
        flag(f"no readable site ledger beside it ({site_ledger_of(path).name}) to recompute it from")
        return
    try:
        rec = SelectionRecord.from_row(row)
    except LedgerError as exc:
        flag(f"not a valid record: {exc}")
        return
    missing = [r for r in rec.trial_run_ids if r not in spent]
    if missing:
        flag(f"trial run id(s) {', '.join(missing)} have no spends in {site_name}'s ledger")
    if not rec.trial_run_ids and rec.epsilon > 0:
        flag("names no trial run ids but claims a positive epsilon")
    try:
        events = [dp_event_of_mechanisms(spent[r], f"run {r}") for r in rec.trial_run_ids if r in spent]
        again = selection_epsilon(events, rec.mean, rec.shape, rec.delta)
    except ValueError as exc:
        flag(f"cannot be recomputed: {exc}")
        return
    if abs(again - rec.epsilon) > max(audit.tolerance, _REL_TOLERANCE * max(1.0, abs(again))):
        flag(
            f"records epsilon {rec.epsilon:.6g}, but the repeat-and-select bound on its {len(events)} trial(s)' "
            f"spends ({rec.distribution}, mean {rec.mean:g}, shape {rec.shape:g}, delta {rec.delta:g}) is {again:.6g}"
        )
        return
    if not missing:
        audit.notes.append(
            f"{where}: private selection over {len(events)} trial(s) of {rec.study_trials} ({rec.distribution}, "
            f"mean {rec.mean:g}) recomputed: epsilon {again:.4g} at delta {rec.delta:g}; the site's ledger still "
            "composes every trial"
        )
