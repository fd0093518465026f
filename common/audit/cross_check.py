"""The server's record against the sites': every trained round on both sides, with the same values.

Separate from the per-ledger checks because it needs every ledger loaded first and compares accounted rows, not
files: a round the server has as trained but the site lacks (or the reverse) and any reported value that differs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from privatune.common.audit.findings import Findings
from privatune.common.audit.report import MECHANISM_FIELDS, SITE, AuditEntry
from privatune.common.audit.values import fmt, num
from privatune.common.ledger import STATUS_BUDGET_EXHAUSTED, STATUS_DROPPED, STATUS_TRAINED

_Key = tuple[str, str, int]  # (run id, party, round)


def cross_check(audit: Findings) -> None:
    """Match the server's reports with the sites' spends, round by round; flag what is missing or differs."""
    site_rows: dict[_Key, list[AuditEntry]] = defaultdict(list)
    server_rows: dict[_Key, list[AuditEntry]] = defaultdict(list)
    for e in audit.entries:
        if e.source == SITE and e.purpose != "train":
            continue  # a metrics release: in the site's budget, never in a training report to the server
        (site_rows if e.source == SITE else server_rows)[(e.run_id, e.party, e.round)].append(e)
    _server_against_sites(audit, site_rows, server_rows)
    _sites_against_server(audit, site_rows, server_rows)


def _server_against_sites(
    audit: Findings, site_rows: dict[_Key, list[AuditEntry]], server_rows: dict[_Key, list[AuditEntry]]
) -> None:
    """Every report the server has as trained (or budget exhausted) against that client's ledger."""
    absent: dict[str, int] = defaultdict(int)
    for key, reports in server_rows.items():
        run_id, client, rnd = key
        at_site = site_rows.get(key, [])
        for rep in reports:
            if rep.status == STATUS_TRAINED:
                if client not in audit.site_parties:
                    absent[client] += 1
                elif not at_site:
                    audit.flag(
                        "missing-at-site",
                        Path(rep.file),
                        rep.seq,
                        f"the server recorded client {client} as trained in run {run_id} round {rnd}, but "
                        f"no site ledger has that spend",
                        "reports",
                        client,
                    )
                else:
                    _compare(audit, rep, at_site)
            elif at_site and rep.status == STATUS_BUDGET_EXHAUSTED:
                audit.flag(
                    "report-mismatch",
                    Path(rep.file),
                    rep.seq,
                    f"client {client} reported its budget exhausted in run {run_id} round {rnd}, yet its "
                    f"ledger records a spend for that round (row {at_site[0].seq} of {at_site[0].file})",
                    "reports",
                    client,
                )
    for client, n in sorted(absent.items()):
        audit.notes.append(
            f"no site ledger for client {client} among the audited paths: its {n} trained "
            "round(s) recorded by the server were not cross-checked"
        )


def _sites_against_server(
    audit: Findings, site_rows: dict[_Key, list[AuditEntry]], server_rows: dict[_Key, list[AuditEntry]]
) -> None:
    """Every spend a site recorded in a run the server ledger knows, against what the server recorded."""
    for key, spends in site_rows.items():
        run_id, site, rnd = key
        if run_id not in audit.server_runs:
            continue  # a run of another federation, or the server ledger was not given
        statuses = {rep.status for rep in server_rows.get(key, [])}
        if len(spends) > 1:
            audit.notes.append(
                f"site {site} recorded run {run_id} round {rnd} {len(spends)} times (rows "
                f"{', '.join(str(s.seq) for s in spends)}): a retried round, each spend counted"
            )
        if STATUS_TRAINED in statuses or STATUS_BUDGET_EXHAUSTED in statuses:
            continue  # compared (or flagged) above
        if STATUS_DROPPED in statuses:
            audit.notes.append(
                f"site {site} recorded a spend in run {run_id} round {rnd} whose reply the server "
                "recorded as dropped: the spend counts against the site's budget"
            )
            continue
        for spend in spends:
            audit.flag(
                "missing-at-server",
                Path(spend.file),
                spend.seq,
                f"site {site} recorded a spend in run {run_id} round {rnd} (row {spend.seq}) that the "
                "server ledger does not record for this client",
                "spend",
                site,
            )


def _differences(rep: AuditEntry, spend: AuditEntry, tolerance: float) -> list[str]:
    """What the server's report says differently from one site spend (empty: they agree)."""
    out = []
    for name in MECHANISM_FIELDS:
        a, b = getattr(rep, name), getattr(spend, name)
        x, y = num(a), num(b)
        same = (a == b) if x is None or y is None else math.isclose(x, y, rel_tol=1e-9, abs_tol=0.0)
        if not same:
            out.append(f"{name} server {a!r} vs site {b!r}")
    if rep.noise_source and rep.noise_source != spend.noise_source:
        out.append(f"noise_source server {rep.noise_source!r} vs site {spend.noise_source!r}")
    if rep.dataset_fingerprint and rep.dataset_fingerprint != spend.dataset_fingerprint:
        out.append(f"dataset_fingerprint server {rep.dataset_fingerprint!r} vs site {spend.dataset_fingerprint!r}")
    for mine, theirs, label in (
        (rep.epsilon_reported, spend.epsilon_reported, "epsilon (run)"),
        (rep.epsilon_dataset_reported, spend.epsilon_dataset_reported, "epsilon (dataset)"),
    ):
        if label == "epsilon (dataset)" and mine is None:
            continue
        x, y = num(mine), num(theirs)
        if x is None or y is None or not (x == y or abs(x - y) <= tolerance):
            out.append(f"{label} server {fmt(mine)} vs site {fmt(theirs)}")
    return out


def _compare(audit: Findings, rep: AuditEntry, spends: list[AuditEntry]) -> None:
    """Flag the report when it agrees with none of the site's spends for that round (a retry may have several)."""
    found = [_differences(rep, s, audit.tolerance) for s in spends]
    if any(not d for d in found):
        return
    spend = spends[-1]
    audit.flag(
        "report-mismatch",
        Path(rep.file),
        rep.seq,
        f"run {rep.run_id} round {rep.round} client {rep.party}: the server's record differs from the "
        f"site's (row {spend.seq} of {Path(spend.file).name}): {'; '.join(found[-1])}",
        "reports",
        rep.party,
    )
