"""The ledger's layout and its hashing: the chained tables of each kind of ledger (``_SCHEMAS``), their columns,
the exact CREATE statements, the fields a row's hash covers and the hash itself.

The one place the writer (storage, migrate) and the verifier agree on what a file holds: a new chained table or
column is an entry here, and neither side needs other code for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

GENESIS_HASH = "0" * 64
SITE_SCHEMA = "privatune.site-ledger"
SERVER_SCHEMA = "privatune.server-ledger"
SELECTION_SCHEMA = "privatune.site-selections"  # beside a site ledger: common/ledger/selections.py says why
SCHEMA_VERSION = "2"  # 2: the meta table is chained too; rollback-journal mode

# ----------------------------------------------------------------------------------------------------------------
# Table layouts: (column, SQL type). Every chained table also has seq, prev_hash and hash.

_SPEND_COLUMNS = (
    ("run_id", "TEXT NOT NULL"),
    ("round", "INTEGER NOT NULL"),
    ("site_id", "TEXT NOT NULL"),
    ("dataset_fingerprint", "TEXT NOT NULL"),
    ("params_fingerprint", "TEXT NOT NULL"),
    ("noise_multiplier", "REAL NOT NULL"),
    ("sample_rate", "REAL NOT NULL"),
    ("steps", "INTEGER NOT NULL"),
    ("max_grad_norm", "REAL NOT NULL"),
    ("delta", "REAL NOT NULL"),
    ("accountant", "TEXT NOT NULL"),
    ("epsilon_run", "REAL NOT NULL"),
    ("epsilon_dataset", "REAL NOT NULL"),
    ("max_epsilon", "REAL"),
    ("started_at", "TEXT NOT NULL"),
    ("recorded_at", "TEXT NOT NULL"),
    ("cohort_id", "TEXT"),
    ("purpose", "TEXT"),
    ("noise_source", "TEXT"),
    ("augment_views", "INTEGER"),  # issue 16: augmentation multiplicity K (recorded; no effect on epsilon)
)
#: Each distinct set of records a spend sampled from, stored once: ``ids`` is the base64 of the sorted 16-byte
#: keyed record ids (common/record_budget.py), ``cohort_id`` the sha256 of those bytes, ``key_check`` a keyed
#: value of the site key that made the ids (so a replaced key is noticed instead of restarting every budget).
_COHORT_COLUMNS = (
    ("cohort_id", "TEXT NOT NULL"),
    ("size", "INTEGER NOT NULL"),
    ("ids", "TEXT NOT NULL"),
    ("key_check", "TEXT NOT NULL"),
    ("recorded_at", "TEXT NOT NULL"),
)
#: Columns and tables added after version 1 files were written. An added column is hashed only when it holds a
#: value, so rows written before it existed keep their hashes; an added table missing from an old file reads as
#: empty (its chain head is missing too) and is created when the file is next opened for writing.
_ADDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "spend": ("cohort_id", "purpose", "noise_source", "augment_views"),
    "reports": ("noise_source",),
}
_ADDED_TABLES: tuple[str, ...] = ("cohorts",)
_RUN_COLUMNS = (
    ("run_id", "TEXT NOT NULL"),
    ("config", "TEXT NOT NULL"),
    ("aggregation", "TEXT NOT NULL"),
    ("recorded_at", "TEXT NOT NULL"),
)
_REPORT_COLUMNS = (
    ("run_id", "TEXT NOT NULL"),
    ("round", "INTEGER NOT NULL"),
    ("client_id", "TEXT NOT NULL"),
    ("node_id", "TEXT NOT NULL"),
    ("status", "TEXT NOT NULL"),
    ("reason", "TEXT NOT NULL"),
    ("dataset_fingerprint", "TEXT"),
    ("noise_multiplier", "REAL"),
    ("sample_rate", "REAL"),
    ("steps", "INTEGER"),
    ("max_grad_norm", "REAL"),
    ("delta", "REAL"),
    ("accountant", "TEXT"),
    ("epsilon_reported", "REAL"),
    ("epsilon_dataset_reported", "REAL"),
    ("recorded_at", "TEXT NOT NULL"),
    ("noise_source", "TEXT"),
)
#: A site's trials of a tuning study released through private selection (common/ledger/selections.py): the
#: trials' run ids (a JSON list), the distribution of the number of trials and the epsilon claimed for this site.
_SELECTION_COLUMNS = (
    ("study_id", "TEXT NOT NULL"),
    ("site_id", "TEXT NOT NULL"),
    ("trial_run_ids", "TEXT NOT NULL"),
    ("study_trials", "INTEGER NOT NULL"),
    ("distribution", "TEXT NOT NULL"),
    ("mean", "REAL NOT NULL"),
    ("shape", "REAL NOT NULL"),
    ("delta", "REAL NOT NULL"),
    ("accountant", "TEXT NOT NULL"),
    ("epsilon", "REAL NOT NULL"),
    ("recorded_at", "TEXT NOT NULL"),
)
_META_COLUMNS = (
    ("key", "TEXT NOT NULL"),
    ("value", "TEXT NOT NULL"),
)
META_TABLE = "meta"
HEADS_TABLE = "chain_heads"
# The chained tables of each kind of ledger. Every table listed here is created, hash-chained, given a head record
# and verified by the same generic code: a new table needs only its entry here (and a new SCHEMA_VERSION).
_SCHEMAS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    SITE_SCHEMA: {META_TABLE: _META_COLUMNS, "spend": _SPEND_COLUMNS, "cohorts": _COHORT_COLUMNS},
    SERVER_SCHEMA: {META_TABLE: _META_COLUMNS, "runs": _RUN_COLUMNS, "reports": _REPORT_COLUMNS},
    SELECTION_SCHEMA: {META_TABLE: _META_COLUMNS, "selections": _SELECTION_COLUMNS},
}
_INDEXES = {
    SITE_SCHEMA: (
        "CREATE UNIQUE INDEX meta_key ON meta(key)",
        "CREATE INDEX spend_dataset ON spend(dataset_fingerprint)",
        "CREATE INDEX spend_run ON spend(run_id)",
        "CREATE INDEX cohorts_id ON cohorts(cohort_id)",
    ),
    SERVER_SCHEMA: ("CREATE UNIQUE INDEX meta_key ON meta(key)", "CREATE INDEX reports_run ON reports(run_id)"),
    SELECTION_SCHEMA: (
        "CREATE UNIQUE INDEX meta_key ON meta(key)",
        "CREATE UNIQUE INDEX selections_study ON selections(study_id)",  # one record per study: idempotent
    ),
}
META_REQUIRED = ("schema", "version", "created_at")
MIGRATING = "migrating"  # the version a version 1 file is given while it is migrated: writers stop on it


def _real_columns(columns: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(name for name, sql in columns if sql.startswith("REAL"))


def hashed_fields(table: str, names: Sequence[str], row: dict[str, Any]) -> dict[str, Any]:
    """The fields of a row that its hash covers: every declared column, except a column added after version 1
    (``_ADDED_COLUMNS``) that holds no value, so rows copied from a version 1 file keep their hashes. The one place
    the writer and the verifier agree on it."""
    added = _ADDED_COLUMNS.get(table, ())
    return {n: row.get(n) for n in names if not (n in added and row.get(n) is None)}


def chained_tables(schema: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """The declared chained tables of a ledger kind (table -> its data columns), in creation order."""
    return dict(_SCHEMAS[schema])


def chained_tables_of(schema: str, version: str = SCHEMA_VERSION) -> dict[str, tuple[tuple[str, str], ...]]:
    """The chained tables of a ledger kind as a file of ``version`` has them (version 1: meta was not chained)."""
    tables = dict(_SCHEMAS[schema])
    if version == "1":
        tables.pop(META_TABLE)
        for table in _ADDED_TABLES:
            tables.pop(table, None)
        for table, added in _ADDED_COLUMNS.items():
            if table in tables:
                tables[table] = tuple(c for c in tables[table] if c[0] not in added)
    return tables


def schema_ddl(schema: str, version: str = SCHEMA_VERSION) -> list[str]:
    """The exact CREATE statements of a ledger kind: used to create a ledger and to check one's structure
    (``version`` "1": the layout older files have, which is only ever verified, never written)."""
    if version == "1":
        stmts = [
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS chain_heads (chain TEXT PRIMARY KEY, count INTEGER NOT NULL, "
            "head_hash TEXT NOT NULL)",
        ]
        for table, columns in chained_tables_of(schema, "1").items():
            cols = ", ".join(f"{name} {sql}" for name, sql in columns)
            stmts.append(
                f"CREATE TABLE IF NOT EXISTS {table} (seq INTEGER PRIMARY KEY, {cols}, "
                "prev_hash TEXT NOT NULL, hash TEXT NOT NULL)"
            )
        return stmts + [
            s.replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ")
            for s in _INDEXES[schema]
            if " ON meta(" not in s and not any(f" ON {t}(" in s for t in _ADDED_TABLES)
        ]
    stmts = [f"CREATE TABLE {HEADS_TABLE} (chain TEXT PRIMARY KEY, count INTEGER NOT NULL, head_hash TEXT NOT NULL)"]
    for table, columns in _SCHEMAS[schema].items():
        cols = ", ".join(f"{name} {sql}" for name, sql in columns)
        stmts.append(
            f"CREATE TABLE {table} (seq INTEGER PRIMARY KEY, {cols}, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)"
        )
    return stmts + list(_INDEXES[schema])


# ----------------------------------------------------------------------------------------------------------------
# Canonical hashing


def _canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, floats as Python's shortest round-trip repr (inf as ``Infinity``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def _hash_prefix(table: str, values: dict[str, Any], real_columns: Sequence[str], prev_hash: str) -> Any:
    """sha256 state over the canonical JSON of a row up to its seq. ``seq`` sorts last among the keys, so the
    verifier can try other positions for a row cheaply (``.copy()`` then the seq suffix)."""
    payload = {
        name: float(v) if name in real_columns and isinstance(v, int) and not isinstance(v, bool) else v
        for name, v in values.items()
    }
    text = _canonical_json({"chain": table, "fields": payload, "prev_hash": prev_hash})
    return hashlib.sha256(text[:-1].encode("ascii"))


def _finish(prefix: Any, seq: int) -> str:
    state = prefix.copy()
    state.update(f',"seq":{int(seq)}}}'.encode("ascii"))
    return state.hexdigest()


def row_hash(table: str, seq: int, values: dict[str, Any], real_columns: Sequence[str], prev_hash: str) -> str:
    """The chain hash of one row: sha256 of the canonical JSON of ``{chain, fields, prev_hash, seq}``. REAL
    columns are hashed as floats so ``1`` and ``1.0`` (what SQLite returns for an integer stored in a REAL column)
    hash alike."""
    return _finish(_hash_prefix(table, values, real_columns, prev_hash), seq)
