"""``audit_paths``: the audit's one entry point, running its passes in order over the ledgers found.

Find and open the ledgers and name each (:mod:`.inputs`), check each on its own (:mod:`.checks`), compare the
server's record with the sites' (:mod:`.cross_check`), then summarise (:mod:`.summary`). Kept apart so the order
of the passes is read in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from privatune.common.audit.checks import check_ledger
from privatune.common.audit.cross_check import cross_check
from privatune.common.audit.findings import Findings
from privatune.common.audit.inputs import check_tolerance, find_ledgers, ledger_names, open_ledger
from privatune.common.audit.report import AuditReport, LedgerFileInfo
from privatune.common.audit.selection import check_selections
from privatune.common.audit.summary import finish
from privatune.common.ledger import Inspection


def audit_paths(paths: Sequence[Path], tolerance: float = 1e-6) -> AuditReport:
    """Audit every ledger under ``paths`` (files, or folders searched recursively for ``*.ledger.sqlite``).

    Raises AuditInputError when a path does not exist or a folder holds no ledger (an audit of nothing must not
    pass); every finding about the ledgers themselves is a violation or a note in the report.
    """
    audit = Findings(check_tolerance(tolerance))
    opened: dict[Path, Inspection | Exception] = {}
    for path in find_ledgers(paths):
        try:
            opened[path] = open_ledger(path)  # reports damage; raises only when the file vanished
        except Exception as exc:
            opened[path] = exc
    # Named before any check, so that every message, note and table calls a ledger the same thing.
    audit.names = ledger_names({p: f if isinstance(f, Inspection) else None for p, f in opened.items()})
    for path, found in opened.items():
        try:
            if isinstance(found, Exception):
                raise found
            check_ledger(audit, path, found)
        except Exception as exc:
            audit.entries = [e for e in audit.entries if e.file != str(path)]
            audit.site_totals.pop(str(path), None)
            audit.flag(
                "unreadable", path, None, f"{audit.name(path)} could not be audited: {type(exc).__name__}: {exc}"
            )
            audit.files.append(LedgerFileInfo(str(path), "unknown", 0, False, audit.name(path)))
    cross_check(audit)
    check_selections(audit, opened)  # private-selection records beside the site ledgers (privatune tune)
    return finish(audit)
