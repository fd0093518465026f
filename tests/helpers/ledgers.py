"""Test helpers for ledgers: files as older privatune versions wrote them ."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import privatune.common.ledger as ledger_mod
from privatune.common.ledger import SpendEntry
from privatune.common.ledger.storage import _insert_row


def write_v1_site_ledger(path: Path, entries: Iterable[SpendEntry]) -> Path:
    """A site ledger as privatune wrote them before version 2: unchained meta, no cohorts table, none of the
    columns added since (cohort_id, purpose, noise_source), row hashes over the version 1 fields."""
    conn = sqlite3.connect(path, isolation_level=None)
    site = ledger_mod.SITE_SCHEMA
    for stmt in ledger_mod.schema_ddl(site, "1"):
        conn.execute(stmt)
    conn.execute("INSERT INTO chain_heads VALUES ('spend', 0, ?)", (ledger_mod.GENESIS_HASH,))
    for key, value in (("schema", site), ("version", "1"), ("created_at", "2026-01-01T00:00:00+00:00")):
        conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
    for entry in entries:
        _insert_row(conn, path, site, "spend", asdict(entry), version="1")
    conn.close()
    return path
