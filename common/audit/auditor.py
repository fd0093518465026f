"""``audit_paths``: the audit's one entry point, running its passes in order over the ledgers found.

Find the ledgers (:mod:`.inputs`), check each on its own (:mod:`.checks`), compare the server's record with the
sites' (:mod:`.cross_check`), then summarise (:mod:`.summary`). Kept apart so the order of the passes is read in
one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from privatune.common.audit.checks import check_ledger
from privatune.common.audit.cross_check import cross_check
from privatune.common.audit.findings import Findings
from privatune.common.audit.inputs import check_tolerance, find_ledgers
from privatune.common.audit.report import AuditReport, LedgerFileInfo
from privatune.common.audit.summary import finish


def audit_paths(paths: Sequence[Path], tolerance: float = 1e-6) -> AuditReport:
    """Audit every ledger under ``paths`` (files, or folders searched recursively for ``*.ledger.sqlite``).

    Raises AuditInputError when a path does not exist or a folder holds no ledger (an audit of nothing must not
    pass); every finding about the ledgers themselves is a violation or a note in the report.
    """
    audit = Findings(check_tolerance(tolerance))
    for path in find_ledgers(paths):
        try:
            check_ledger(audit, path)
        except Exception as exc:
            audit.entries = [e for e in audit.entries if e.file != str(path)]
            audit.flag("unreadable", path, None, f"{path.name} could not be audited: {type(exc).__name__}: {exc}")
            audit.files.append(LedgerFileInfo(str(path), "unknown", 0, False))
    cross_check(audit)
    return finish(audit)
