"""The last pass: each row's problems, one summary per site or client and ledger, and the finished AuditReport.

Separate from the checks because it decides nothing new: it only groups what the checks found.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from privatune.common.audit.findings import Findings
from privatune.common.audit.report import SEEDED_FLAG, SITE, AuditEntry, AuditReport, PartySummary
from privatune.common.audit.values import num
from privatune.common.ledger import STATUS_BUDGET_EXHAUSTED, STATUS_DROPPED, STATUS_TRAINED
from privatune.common.protocol import NOISE_SOURCE_SEEDED


def _summaries(audit: Findings) -> list[PartySummary]:
    groups: dict[tuple[str, str, str], list[AuditEntry]] = defaultdict(list)
    for e in audit.entries:
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
                max_epsilon=num(last.max_epsilon) if last else None,
                violations=sum(v.file == file and (v.party in (None, party)) for v in audit.violations),
                seeded_rounds=sum(e.noise_source == NOISE_SOURCE_SEEDED for e in trained),
            )
        )
    return summaries


def finish(audit: Findings) -> AuditReport:
    """Name each row's violation kinds on it, summarise per party, note seeded noise, and build the report."""
    by_row: dict[tuple[str, str, int], list[str]] = defaultdict(list)
    for v in audit.violations:
        if v.seq is not None and v.table is not None:
            by_row[(v.file, v.table, v.seq)].append(v.kind)
    for e in audit.entries:
        e.problems = sorted(set(by_row.get((e.file, "spend" if e.source == SITE else "reports", e.seq), [])))
    summaries = _summaries(audit)
    for s in summaries:
        if s.source == SITE and s.seeded_rounds:
            audit.notes.append(
                f"{Path(s.file).name}: {s.seeded_rounds} of {s.rounds_trained} round(s) of site "
                f"{s.party} used seeded noise ({SEEDED_FLAG})"
            )
    return AuditReport(
        tolerance=audit.tolerance,
        files=audit.files,
        entries=audit.entries,
        violations=audit.violations,
        notes=list(dict.fromkeys(audit.notes)),
        summaries=summaries,
    )
