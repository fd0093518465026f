"""The audit in progress: what the passes have found so far, shared by the ledger checks, cross-check and summary.

One object the passes append to (violations, notes, accounted rows), so that each pass is a plain function of it
and none of them holds another's state; ``summary.finish`` turns it into the AuditReport.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from privatune.common.audit.recompute import LedgerTotals, Recomputer
from privatune.common.audit.report import AuditEntry, LedgerFileInfo, Violation


@dataclass
class Findings:
    tolerance: float
    eps: Recomputer = field(default_factory=Recomputer)
    files: list[LedgerFileInfo] = field(default_factory=list)
    entries: list[AuditEntry] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    site_parties: set[str] = field(default_factory=set)  # sites with a ledger among the paths (by name or row)
    server_runs: set[str] = field(default_factory=set)  # runs a server ledger among the paths knows
    names: dict[str, str] = field(default_factory=dict)  # ledger path -> its name in the outputs (inputs.ledger_names)
    site_totals: dict[str, LedgerTotals] = field(default_factory=dict)  # site ledger path -> its totals

    def name(self, file: Path | str) -> str:
        """What the outputs call the ledger at ``file`` (its file name when it was never named)."""
        return self.names.get(str(file), Path(file).name)

    def flag(
        self, kind: str, file: Path, seq: int | None, message: str, table: str | None = None, party: str | None = None
    ) -> None:
        """Record a violation (``kind`` one of VIOLATION_KINDS) naming the file and, when known, the row."""
        self.violations.append(Violation(kind=kind, file=str(file), seq=seq, message=message, table=table, party=party))
