"""Verify a ledger file: report every problem as a ChainProblem, never raise on a damaged file.

``inspect_ledger`` is a short driver over passes that each read on their own, in this order:

1. identity: the file opens as SQLite and its meta table names a known schema and a readable version (nothing
   further is checked otherwise);
2. integrity: SQLite's own ``integrity_check`` (pages, b-trees, rowid order, indexes against their tables);
3. layout: ``sqlite_master`` holds exactly the tables and indexes privatune creates for that schema, with the same
   definitions;
4. heads: each declared chain has one well-formed head record (row count and last hash), and no other;
5. rows, per table: the rows decode with the declared columns and types (text that is valid UTF-8, no NULL where
   the schema forbids it, no duplicate seq);
6. chain, per table (``chain.ChainCheck``): every row against its own hash (edited, or moved), rows stored out of
   order (reordered), the walk by position (deleted, inserted, rewritten with a recomputed hash), and the head
   record (rows beyond its count, a last hash that is not the last row's);
7. meta: the meta table holds each required key exactly once, with a well-formed creation time.

Every declared table in ``schema._SCHEMAS`` (meta included) goes through the same passes: a new chained table
needs no code here. A malformed row is reported as such and left out of the chain walk, so one bad row is named
once, not as a cascade.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from privatune.common.ledger.chain import ChainCheck
from privatune.common.ledger.connection import _connect, read_meta
from privatune.common.ledger.errors import ChainProblem, LedgerError
from privatune.common.ledger.findings import Findings
from privatune.common.ledger.schema import (
    _SCHEMAS,
    HEADS_TABLE,
    META_REQUIRED,
    META_TABLE,
    SCHEMA_VERSION,
    chained_tables_of,
    schema_ddl,
)

READABLE_VERSIONS = ("1", SCHEMA_VERSION)  # version 1: verified and audited (its meta table is not chained)

_MAX_SQLITE_MESSAGES = 20


@dataclass(frozen=True)
class Inspection:
    """What verification found in one file: its schema (None: not a ledger this code reads), every problem, and
    the well-formed rows of each readable chained table in seq order (malformed rows left out)."""

    schema: str | None
    problems: list[ChainProblem]
    rows: dict[str, list[dict[str, Any]]]
    version: str = SCHEMA_VERSION


def verify_chain(path: Path) -> list[ChainProblem]:
    """Every problem in a ledger file (site or server): broken hash chains, and any malformation of the file, its
    structure or its rows, each naming the table and row. An empty list when intact; LedgerError only when the
    path is not a file."""
    return verify_ledger(Path(path))


def verify_ledger(path: Path) -> list[ChainProblem]:
    """Every problem in the ledger file at ``path``; LedgerError only when there is no file there."""
    return inspect_ledger(path).problems


def inspect_ledger(path: Path) -> Inspection:
    """Verify the file at ``path`` and return its problems and well-formed rows (LedgerError: no file there)."""
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"ledger {path} does not exist")
    found = Findings(path)
    verified: dict[str, list[dict[str, Any]]] = {}
    try:
        conn = _connect(path, read_only=True)
    except LedgerError as exc:
        found.add(None, None, "malformed", str(exc))
        return Inspection(None, found.sorted(), verified)
    try:
        schema = _identity_pass(conn, found)
        if schema is not None:
            _integrity_pass(conn, found)
            _layout_pass(conn, found, schema)
            heads = _heads_pass(conn, found, schema)
            for table, columns in chained_tables_of(schema, found.version).items():
                decoded = _rows_pass(conn, found, table, columns)
                if decoded is None:
                    continue
                rows, malformed = decoded
                verified[table] = rows
                ChainCheck(found, table, columns, rows, heads.get(table), malformed).run()
            _meta_pass(found, verified)
    finally:
        conn.close()
    return Inspection(schema, found.sorted(), verified, found.version)


# ----------------------------------------------------------------------------------------------------------------
# 1-3. Identity, integrity, layout


@cache
def _expected_master(schema: str, version: str = SCHEMA_VERSION) -> dict[tuple[str, str], tuple[str, str | None]]:
    """``sqlite_master`` as privatune creates it for ``schema``: {(type, name): (table, sql)}."""
    conn = sqlite3.connect(":memory:")
    try:
        for stmt in schema_ddl(schema, version):
            conn.execute(stmt)
        return {
            (t, n): (tb, sql) for t, n, tb, sql in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
        }
    finally:
        conn.close()


def _identity_pass(conn: sqlite3.Connection, found: Findings) -> str | None:
    """The file's schema when it is a privatune ledger this code reads (None: nothing further can be checked).
    Catches an empty file, a file with no readable meta table, an unknown schema and an unreadable version."""
    if found.path.stat().st_size == 0:
        found.add(None, None, "malformed", f"{found.path} is empty (0 bytes): not a ledger, or one that was truncated")
        return None
    try:
        meta = read_meta(conn, found.path)
    except LedgerError as exc:
        found.add(None, None, "malformed", str(exc))
        return None
    schema, version = meta.get("schema"), meta.get("version")
    if not isinstance(schema, str) or schema not in _SCHEMAS:
        found.add(None, None, "malformed", f"{found.path} is not a privatune ledger (unknown schema {schema!r})")
        return None
    if version not in READABLE_VERSIONS:
        found.add(
            None,
            None,
            "malformed",
            f"unsupported ledger version {version!r} (this privatune reads versions {', '.join(READABLE_VERSIONS)})",
        )
        return None
    found.schema, found.version, found.meta = schema, version, meta
    return schema


def _integrity_pass(conn: sqlite3.Connection, found: Findings) -> None:
    """SQLite's own check of the file: damaged pages, b-trees, rowid order, indexes that disagree with tables."""
    try:
        messages = [str(r[0]) for r in conn.execute(f"PRAGMA integrity_check({_MAX_SQLITE_MESSAGES})")]
    except (sqlite3.Error, UnicodeError) as exc:
        messages = [str(exc)]
    if messages != ["ok"]:
        for m in messages[:_MAX_SQLITE_MESSAGES]:
            found.add(None, None, "malformed", f"SQLite integrity check: {m!r}")


def _layout_pass(conn: sqlite3.Connection, found: Findings, schema: str) -> None:
    """``sqlite_master`` against what privatune creates: a missing, redefined or unexpected table or index (a
    missing table is marked unusable, so later passes skip it)."""
    expected = _expected_master(schema, found.version)
    try:
        actual = {
            (t, n): (tb, sql) for t, n, tb, sql in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
        }
    except (sqlite3.Error, UnicodeError) as exc:
        found.add(None, None, "malformed", f"cannot read the schema table: {exc}")
        found.unusable.update(chained_tables_of(schema, found.version))
        found.unusable.add(HEADS_TABLE)
        return
    for (kind, name), (table, sql) in expected.items():
        if (kind, name) not in actual:
            found.add(table, None, "malformed", f"the {kind} {name} is missing")
            if kind == "table":
                found.unusable.add(name)
        elif actual[(kind, name)] != (table, sql):
            found.add(table, None, "malformed", f"the {kind} {name} is not defined as privatune defines it")
    for (kind, name), (table, _sql) in actual.items():
        if (kind, name) not in expected:
            found.add(
                table if isinstance(table, str) else None,
                None,
                "malformed",
                f"unexpected {kind} {name!r}: not part of a {schema}",
            )


# ----------------------------------------------------------------------------------------------------------------
# 4. Head records


def _is_text(value: Any) -> bool:
    """A str that is valid UTF-8 (text decoded with ``lenient_text`` carries lone surrogates where it was not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _heads_pass(conn: sqlite3.Connection, found: Findings, schema: str) -> dict[str, tuple[int, str]]:
    """Each chain's (count, last hash). Catches a head record of no declared chain, a malformed one and two for
    one chain (a missing head is the chain pass's to report)."""
    if HEADS_TABLE in found.unusable:
        return {}
    try:
        records = conn.execute(f"SELECT rowid, chain, count, head_hash FROM {HEADS_TABLE}").fetchall()
    except (sqlite3.Error, UnicodeError) as exc:
        found.add(HEADS_TABLE, None, "malformed", f"cannot read the chain head records: {exc}")
        return {}
    heads: dict[str, tuple[int, str]] = {}
    for rowid, chain, count, head_hash in records:
        if not _is_text(chain) or chain not in chained_tables_of(schema, found.version):
            found.add(HEADS_TABLE, None, "malformed", f"head record {rowid!r} names no declared chain ({chain!r})")
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or not _is_text(head_hash):
            found.add(
                chain,
                0,
                "malformed",
                f"the chain head record of {chain} is malformed (count {count!r}, last hash {head_hash!r})",
            )
            continue
        if chain in heads:
            found.add(chain, 0, "malformed", f"there are two head records for {chain}")
            continue
        heads[chain] = (count, head_hash)
    return heads


# ----------------------------------------------------------------------------------------------------------------
# 5. Row decoding


def _row_malformation(row: dict[str, Any], columns: Sequence[tuple[str, str]]) -> str | None:
    """Why a stored row does not fit its declared columns (None: it does)."""
    for name, sql in (*columns, ("prev_hash", "TEXT NOT NULL"), ("hash", "TEXT NOT NULL")):
        value = row[name]
        if value is None:
            if "NOT NULL" in sql:
                return f"{name} is NULL"
            continue
        kind = sql.split()[0]
        ok = {"TEXT": _is_text(value), "INTEGER": isinstance(value, int), "REAL": isinstance(value, (int, float))}.get(
            kind, False
        )
        if not ok:
            what = (
                "text that is not valid UTF-8"
                if isinstance(value, str) and not _is_text(value)
                else f"a {type(value).__name__}"
            )
            return f"{name} holds {what}, not {kind}"
    return None


def _rows_pass(
    conn: sqlite3.Connection, found: Findings, table: str, columns: Sequence[tuple[str, str]]
) -> tuple[list[dict[str, Any]], set[int]] | None:
    """The well-formed rows of ``table`` in storage order, and the seqs of malformed ones (None: unreadable).
    Catches an unreadable table, a seq that is not a positive integer, two rows stored as one seq, and a value
    that does not fit its column (NULL where forbidden, wrong type, text that is not UTF-8)."""
    if table in found.unusable:
        return None
    names = ["seq", *(n for n, _ in columns), "prev_hash", "hash"]
    try:  # named columns: a damaged schema fails here ("no such column") instead of returning other columns
        stored = conn.execute(f"SELECT {', '.join(names)} FROM {table} ORDER BY seq").fetchall()
    except (sqlite3.Error, UnicodeError) as exc:
        found.add(table, None, "malformed", f"cannot read table {table}: {exc}")
        return None
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    malformed: set[int] = set()
    for i, values in enumerate(stored, start=1):
        row = dict(zip(names, values, strict=True))
        seq = row["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            found.add(table, None, "malformed", f"the row stored {i}th has seq {seq!r}, not a positive integer")
            continue
        if seq in seen:
            found.add(table, seq, "malformed", f"two rows are stored as seq {seq}: rowids are out of order")
            malformed.add(seq)
            continue
        seen.add(seq)
        why = _row_malformation(row, columns)
        if why is not None:
            found.add(table, seq, "malformed", f"row {seq}: {why}")
            malformed.add(seq)
            continue
        rows.append(row)
    return rows, malformed


# ----------------------------------------------------------------------------------------------------------------
# 7. Meta


def _meta_pass(found: Findings, verified: dict[str, list[dict[str, Any]]]) -> None:
    """The meta table holds each required key once (schema and version were read in pass 1). Catches a missing
    or repeated key and a creation time that is not an ISO-8601 timestamp."""
    if found.version == "1":  # meta is not a chain there: only check what it must hold
        for key in META_REQUIRED:
            if key not in found.meta:
                found.add(None, None, "malformed", f"the meta table has no {key!r} entry")
        return
    meta_rows = verified.get(META_TABLE)
    if meta_rows is None:
        return
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in meta_rows:
        by_key.setdefault(r["key"], []).append(r)
    for key in META_REQUIRED:
        if key not in by_key:
            found.add(META_TABLE, None, "malformed", f"the meta table has no {key!r} entry")
    for key, rows in by_key.items():
        if len(rows) > 1:
            found.add(META_TABLE, rows[1]["seq"], "malformed", f"the meta key {key!r} is recorded {len(rows)} times")
    created = by_key.get("created_at")
    if created:
        try:
            datetime.fromisoformat(created[0]["value"])
        except ValueError:
            found.add(
                META_TABLE,
                created[0]["seq"],
                "malformed",
                f"created_at {created[0]['value']!r} is not an ISO-8601 timestamp",
            )
