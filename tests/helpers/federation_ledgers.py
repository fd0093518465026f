"""Ledgers a well-behaved federation writes, written directly (no training): fixtures for audit tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from privatune.common.ledger import (
    SERVER_LEDGER_NAME,
    ServerLedger,
    SiteLedger,
    SpendEntry,
    site_ledger_filename,
    utc_now,
)
from privatune.common.mechanism import DPMechanism

DELTA = 1e-5
MECH = (3.0, 1.0, 2)  # sigma, q, steps per round; q = 1 (one batch per epoch) keeps both accountants fast
SGD = (1.2, 0.04, 25)  # a typical mini-batch DP-SGD round
FP = "ds-{site}"


def federate(
    folder: Path,
    *,
    sites=("s1", "s2"),
    rounds: int = 3,
    run_id: str = "run-1",
    mech=MECH,
    accountant: str = "rdp",
    max_epsilon: float | None = 50.0,
    skip_site: set | None = None,
    skip_server: set | None = None,
    server: bool = True,
    aggregation: str = "plain",
) -> None:
    """Write what a well-behaved federation writes: each site appends its spend before replying, the server
    records each reply. ``skip_site`` / ``skip_server`` hold (site, round) pairs one side fails to record."""
    skip_site, skip_server = skip_site or set(), skip_server or set()
    srv = ServerLedger(folder / SERVER_LEDGER_NAME) if server else None
    dp_mech = DPMechanism(*mech, max_grad_norm=1.0, delta=DELTA, accountant=accountant)
    if srv:
        srv.record_run(run_id, {"num-server-rounds": rounds, "accountant": accountant}, aggregation)
    for rnd in range(1, rounds + 1):
        for node, site in enumerate(sites, start=1):
            ledger = SiteLedger(folder / site_ledger_filename(site))
            fp = FP.format(site=site)
            eps_run, eps_data = ledger.projected(run_id, fp, dp_mech)
            if (site, rnd) not in skip_site:
                now = utc_now()
                ledger.append(
                    SpendEntry.from_mechanism(
                        dp_mech,
                        run_id=run_id,
                        round=rnd,
                        site_id=site,
                        dataset_fingerprint=fp,
                        params_fingerprint="head-v1",
                        epsilon_run=eps_run,
                        epsilon_dataset=eps_data,
                        max_epsilon=max_epsilon,
                        started_at=now,
                        recorded_at=utc_now(),
                    )
                )
            if srv and (site, rnd) not in skip_server:
                srv.record_report(
                    run_id,
                    rnd,
                    site,
                    1000 + node,
                    status="trained",
                    mechanism=dp_mech,
                    epsilon_reported=eps_run,
                    epsilon_dataset_reported=eps_data,
                    dataset_fingerprint=fp,
                )


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in statements:
        conn.execute(stmt)
    conn.close()
