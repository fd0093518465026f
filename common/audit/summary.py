"""The last pass: each row's problems, one summary per site or client and ledger, the totals per (site, dataset)
and per site, and the finished AuditReport.

Separate from the checks because it decides nothing new: it only groups what the checks found (the totals were
composed once, by the checks, with ``common/ledger/totals.py``).
"""

from __future__ import annotations

from collections import defaultdict

from privatune.common.audit.findings import Findings
from privatune.common.audit.report import (
    SEEDED_FLAG,
    SITE,
    AuditEntry,
    AuditReport,
    DatasetSummary,
    PartySummary,
    SiteSummary,
)
from privatune.common.audit.values import num
from privatune.common.ledger import PURPOSE_TRAIN, STATUS_BUDGET_EXHAUSTED, STATUS_DROPPED, STATUS_TRAINED
from privatune.common.protocol import NOISE_SOURCE_SEEDED


def _summaries(audit: Findings) -> list[PartySummary]:
    groups: dict[tuple[str, str, str], list[AuditEntry]] = defaultdict(list)
    for e in audit.entries:
        groups[(e.source, e.file, e.party)].append(e)
    summaries = []
    for (source, file, party), rows in sorted(groups.items()):
        trained = [e for e in rows if e.status == STATUS_TRAINED]
        run_eps = [e.epsilon_recomputed for e in trained if e.epsilon_recomputed is not None]
        last = trained[-1] if trained else None
        totals = audit.site_totals.get(file) if source == SITE else None
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
                epsilon_total=totals.site.epsilon if totals else None,
                max_epsilon=num(last.max_epsilon) if last else None,
                violations=sum(v.file == file and (v.party in (None, party)) for v in audit.violations),
                seeded_rounds=sum(e.noise_source == NOISE_SOURCE_SEEDED for e in trained),
                datasets=len(totals.datasets) if totals else 0,
            )
        )
    return summaries


def _totals(audit: Findings) -> tuple[list[DatasetSummary], list[SiteSummary]]:
    """The totals per (site ledger, dataset) and per site ledger, in the order the ledgers were named."""
    datasets: list[DatasetSummary] = []
    sites: list[SiteSummary] = []
    for file, t in audit.site_totals.items():
        name = audit.name(file)
        for d in t.datasets:
            rows = [r for r in t.rows if r["dataset_fingerprint"] == d.dataset_fingerprint]
            datasets.append(
                DatasetSummary(
                    site=name,
                    file=file,
                    dataset_fingerprint=d.dataset_fingerprint,
                    runs=list(d.runs),
                    spends=d.spends,
                    rounds_trained=sum((r.get("purpose") or PURPOSE_TRAIN) == PURPOSE_TRAIN for r in rows),
                    records=d.records,
                    shared_records=d.shared_records,
                    accountant=d.accountant,
                    delta=d.delta,
                    epsilon=d.epsilon,
                    max_epsilon=num(rows[-1]["max_epsilon"]),
                    error=d.error,
                )
            )
        sites.append(
            SiteSummary(
                site=name,
                file=file,
                datasets=list(t.site.datasets),
                spends=t.site.spends,
                records=t.site.records,
                accountant=t.site.accountant,
                delta=t.site.delta,
                epsilon=t.site.epsilon,
                max_epsilon=num(t.rows[-1]["max_epsilon"]) if t.rows else None,
                error=t.site.error,
            )
        )
    return datasets, sites


def finish(audit: Findings) -> AuditReport:
    """Name each row's violation kinds on it, summarise per party, note seeded noise, and build the report."""
    by_row: dict[tuple[str, str, int], list[str]] = defaultdict(list)
    for v in audit.violations:
        if v.seq is not None and v.table is not None:
            by_row[(v.file, v.table, v.seq)].append(v.kind)
    for e in audit.entries:
        e.problems = sorted(set(by_row.get((e.file, "spend" if e.source == SITE else "reports", e.seq), [])))
    summaries = _summaries(audit)
    datasets, sites = _totals(audit)
    for d in datasets:
        if d.error:
            audit.notes.append(f"{d.site}: no total for dataset {d.dataset_fingerprint} ({d.error})")
    for s in summaries:
        if s.source == SITE and s.seeded_rounds:
            name = audit.name(s.file)
            where = "" if name == s.party else f" (ledger {name})"
            audit.notes.append(
                f"site {s.party}{where}: {s.seeded_rounds} of {s.rounds_trained} round(s) used seeded noise "
                f"({SEEDED_FLAG})"
            )
    return AuditReport(
        tolerance=audit.tolerance,
        files=audit.files,
        entries=audit.entries,
        violations=audit.violations,
        notes=list(dict.fromkeys(audit.notes)),
        summaries=summaries,
        datasets=datasets,
        sites=sites,
    )
