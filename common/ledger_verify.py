"""Verify a ledger file: report every problem as a ChainProblem, never raise on a damaged file.

The check runs in passes that each read on their own:

1. structure: the file opens as SQLite, its meta table names a known schema and version, SQLite's own
   ``integrity_check`` passes (pages, b-trees, rowid order, indexes against their tables), and ``sqlite_master``
   holds exactly the tables and indexes privatune creates for that schema, with the same definitions;
2. heads: each declared chain has one well-formed head record (row count and last hash), and no other;
3. rows: each chained table's rows decode with the declared columns and types (text that is valid UTF-8, no NULL
   where the schema forbids it, no duplicate seq);
4. chain links, per table: every row against its own hash (edited, or moved to another position), rows stored out
   of order (reordered), the walk by position (deleted, inserted, rewritten with a recomputed hash), and the head
   record (rows beyond its count, a last hash that is not the last row's);
5. cross-table: the meta table holds each required key exactly once, with a well-formed creation time.

Every declared table in ``privatune.common.ledger._SCHEMAS`` (meta included) goes through the same passes: a new chained
table needs no code here. A malformed row is reported as such and left out of the chain walk, so one bad row is
named once, not as a cascade. Loops are bounded by the number of stored rows, whatever a corrupt count or seq says.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from privatune.common.ledger import (
    _SCHEMAS,
    GENESIS_HASH,
    HEADS_TABLE,
    META_REQUIRED,
    META_TABLE,
    PROBLEM_KINDS,
    SCHEMA_VERSION,
    ChainProblem,
    LedgerError,
    _connect,
    _finish,
    _hash_prefix,
    _real_columns,
    chained_tables_of,
    hashed_fields,
    read_meta,
    schema_ddl,
)

READABLE_VERSIONS = ("1", SCHEMA_VERSION)  # version 1: verified and audited (its meta table is not chained)

_MAX_LISTED = 20  # missing rows listed one by one before they are summarised as a range
_MAX_SEARCH = 1024  # how far past the stored rows a moved row's original position is searched for
_MAX_SQLITE_MESSAGES = 20


class _Findings:
    """The problems found so far, one per (table, row, kind) (file-level ones also per message)."""

    def __init__(self, path: Path, schema: str | None = None):
        self.path = path
        self.schema = schema
        self.version = SCHEMA_VERSION
        self.meta: dict[str, Any] = {}
        self.unusable: set[str] = set()  # declared tables missing from the file: no row pass
        self._found: dict[tuple[Any, ...], ChainProblem] = {}

    def add(self, table: str | None, seq: int | None, kind: str, detail: str) -> None:
        key = (table, seq, kind, detail if seq is None else "")
        self._found.setdefault(key, ChainProblem(seq=seq, kind=kind, detail=detail, table=table))

    def sorted(self) -> list[ChainProblem]:
        order = {t: i for i, t in enumerate([HEADS_TABLE, *(_SCHEMAS.get(self.schema or "", {}))])}

        def key(p: ChainProblem) -> tuple[int, int, int]:
            t = -1 if p.table is None else order.get(p.table, len(order))
            return (t, -1 if p.seq is None else p.seq, PROBLEM_KINDS.index(p.kind))

        return sorted(self._found.values(), key=key)


@dataclass(frozen=True)
class Inspection:
    """What verification found in one file: its schema (None: not a ledger this code reads), every problem, and
    the well-formed rows of each readable chained table in seq order (malformed rows left out)."""

    schema: str | None
    problems: list[ChainProblem]
    rows: dict[str, list[dict[str, Any]]]
    version: str = SCHEMA_VERSION


def verify_ledger(path: Path) -> list[ChainProblem]:
    """Every problem in the ledger file at ``path``; LedgerError only when there is no file there."""
    return inspect_ledger(path).problems


def inspect_ledger(path: Path) -> Inspection:
    """Verify the file at ``path`` and return its problems and well-formed rows (LedgerError: no file there)."""
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"ledger {path} does not exist")
    found = _Findings(path)
    verified: dict[str, list[dict[str, Any]]] = {}
    try:
        conn = _connect(path, read_only=True)
    except LedgerError as exc:
        found.add(None, None, "malformed", str(exc))
        return Inspection(None, found.sorted(), verified)
    try:
        schema = _structure_pass(conn, found)
        if schema is not None:
            heads = _heads_pass(conn, found, schema)
            for table, columns in chained_tables_of(schema, found.version).items():
                decoded = _rows_pass(conn, found, table, columns)
                if decoded is None:
                    continue
                rows, malformed = decoded
                verified[table] = rows
                _chain_pass(found, table, columns, rows, heads.get(table), malformed)
            _cross_pass(found, verified)
    finally:
        conn.close()
    return Inspection(schema, found.sorted(), verified, found.version)


# ----------------------------------------------------------------------------------------------------------------
# 1. Structure


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


def _structure_pass(conn: sqlite3.Connection, found: _Findings) -> str | None:
    """The file's schema when it is a privatune ledger this code reads (None: nothing further can be checked)."""
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
    try:
        messages = [str(r[0]) for r in conn.execute(f"PRAGMA integrity_check({_MAX_SQLITE_MESSAGES})")]
    except (sqlite3.Error, UnicodeError) as exc:
        messages = [str(exc)]
    if messages != ["ok"]:
        for m in messages[:_MAX_SQLITE_MESSAGES]:
            found.add(None, None, "malformed", f"SQLite integrity check: {m!r}")
    expected = _expected_master(schema, version)
    try:
        actual = {
            (t, n): (tb, sql) for t, n, tb, sql in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
        }
    except (sqlite3.Error, UnicodeError) as exc:
        found.add(None, None, "malformed", f"cannot read the schema table: {exc}")
        found.unusable.update(chained_tables_of(schema, version))
        found.unusable.add(HEADS_TABLE)
        return schema
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
    return schema


# ----------------------------------------------------------------------------------------------------------------
# 2. Head records


def _is_text(value: Any) -> bool:
    """A str that is valid UTF-8 (text decoded with ``lenient_text`` carries lone surrogates where it was not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _heads_pass(conn: sqlite3.Connection, found: _Findings, schema: str) -> dict[str, tuple[int, str]]:
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
# 3. Row decoding


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
    conn: sqlite3.Connection, found: _Findings, table: str, columns: Sequence[tuple[str, str]]
) -> tuple[list[dict[str, Any]], set[int]] | None:
    """The well-formed rows of ``table`` in storage order, and the seqs of malformed ones (None: unreadable)."""
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
        row = dict(zip(names, values))
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
# 4. Chain links and the head record


def _candidate_seqs(stored: int, hint: int, upper: int) -> Iterator[int]:
    """Positions in [1, upper] a moved row might have been hashed at: first the shift seen on the previous moved
    row, then outward from where it is stored (at most ``upper`` candidates)."""
    if hint != 0 and 1 <= stored + hint <= upper:
        yield stored + hint
    centre = min(max(stored, 1), upper)
    for d in range(upper + 1):
        for cand in (centre,) if d == 0 else (centre + d, centre - d):
            if 1 <= cand <= upper and cand != stored and cand != stored + hint:
                yield cand
        if centre + d >= upper and centre - d <= 1:
            return


class _Chain:
    """One table's rows during the chain passes: where each row was written, and which are edited."""

    def __init__(
        self,
        found: _Findings,
        table: str,
        columns: Sequence[tuple[str, str]],
        rows: list[dict[str, Any]],
        head: tuple[int, str] | None,
        malformed: set[int],
    ):
        self.found, self.table = found, table
        names = [name for name, _ in columns]
        reals = _real_columns(columns)
        self.prefixes = {
            r["seq"]: _hash_prefix(table, hashed_fields(table, names, r), reals, r["prev_hash"]) for r in rows
        }
        self.rows = rows
        self.by_seq = {r["seq"]: r for r in rows}
        self.head = head
        self.count = head[0] if head else 0
        self.malformed = malformed
        self.position: dict[int, int] = {}  # stored seq -> position in the chain it was written at
        self.edited: set[int] = set()
        self.chosen: dict[int, int] = {}  # position -> stored seq of the row taken as genuine
        self.holders: dict[int, list[int]] = {}

    def add(self, seq: int, kind: str, detail: str) -> None:
        self.found.add(self.table, seq, kind, detail)

    def hash_at(self, row: dict[str, Any], seq: int) -> str:
        return _finish(self.prefixes[row["seq"]], seq)

    def place(self) -> None:
        """Each row against its own hash: intact, moved (its hash is valid at another position) or edited."""
        n = len(self.rows) + len(self.malformed)
        upper = min(max(self.count, n) + 1, n + 1 + _MAX_SEARCH)
        hint = 0
        for r in self.rows:
            s = r["seq"]
            if self.hash_at(r, s) == r["hash"]:
                self.position[s] = s
                continue
            moved_to = next((c for c in _candidate_seqs(s, hint, upper) if self.hash_at(r, c) == r["hash"]), None)
            if moved_to is None:
                self.edited.add(s)
                self.position[s] = s
                self.add(
                    s,
                    "edited",
                    f"row {s}'s contents no longer match its stored hash: a field was changed after it was written",
                )
            else:
                self.position[s] = moved_to
                hint = moved_to - s
        if self.head is not None:
            at = [
                self.position[r["seq"]] for r in self.rows if r["hash"] == self.head[1] and r["seq"] not in self.edited
            ]
            if at and max(at) != self.count:
                self.add(
                    0,
                    "edited",
                    f"the chain head records {self.count} rows but its last hash is row "
                    f"{max(at)}'s: the head's count was changed",
                )
                self.count = max(at)
                self.head = (self.count, self.head[1])

    def reorders(self) -> None:
        """Rows written at one position but stored at another: out of order relative to their neighbours, or
        renumbered in a way no deletion or insertion explains (those are reported at the gap or the intruder)."""
        stored_order = [r["seq"] for r in self.rows]
        prefix_max, running = [], -1
        for s in stored_order:
            prefix_max.append(running)
            running = max(running, self.position[s])
        suffix_min, low = [0.0] * len(stored_order), math.inf
        for i in range(len(stored_order) - 1, -1, -1):
            suffix_min[i] = low
            low = min(low, self.position[stored_order[i]])
        for i, s in enumerate(stored_order):
            p = self.position[s]
            if p != s and (prefix_max[i] > p or suffix_min[i] < p):
                self.add(s, "reordered", f"row stored as seq {s} was written as row {p}: rows were moved")
            elif p != s and s != i + 1:
                # In order, but not where closing a gap (a deletion) or making room (an insertion) would have
                # renumbered it: its seq alone was changed.
                self.add(s, "reordered", f"row stored as seq {s} was written as row {p}: it was renumbered")

    def choose(self) -> None:
        """One genuine row per position; the others claiming it were inserted."""
        for s in (r["seq"] for r in self.rows):
            self.holders.setdefault(self.position[s], []).append(s)
        for p in sorted(self.holders):
            cands = self.holders[p]
            if len(cands) == 1:
                self.chosen[p] = cands[0]
                continue
            referenced = {self.by_seq[s]["prev_hash"] for s in self.holders.get(p + 1, [])}
            if self.head and p == self.count:
                referenced.add(self.head[1])
            genuine = next(
                (s for s in cands if self.by_seq[s]["hash"] in referenced), next((s for s in cands if s == p), cands[0])
            )
            self.chosen[p] = genuine
            for s in cands:
                if s != genuine:
                    self.add(
                        s,
                        "inserted",
                        f"row stored as seq {s} claims chain position {p}, which another row holds: it was inserted",
                    )

    def gaps(self) -> None:
        """Positions up to the head's count (or the last row, without a head) that no row holds: deleted."""
        end = self.count if self.head is not None else max(self.chosen, default=0)
        present = sorted(p for p in self.chosen if p <= end)
        last_present = max(self.chosen, default=0)
        prev = 0
        for p in [*present, end + 1]:
            missing = [m for m in range(prev + 1, min(p, prev + 1 + _MAX_LISTED + 1)) if m not in self.malformed]
            size = p - prev - 1
            if size > _MAX_LISTED:
                first = prev + 1
                why = "the tail was truncated" if first > last_present else "they were deleted"
                self.add(
                    first,
                    "deleted",
                    f"rows {first} to {p - 1} ({size} rows) are missing (the chain head "
                    f"records {self.count} rows): {why}",
                )
            else:
                for m in missing:
                    why = "the tail was truncated" if m > last_present else "it was deleted"
                    self.add(m, "deleted", f"row {m} is missing (the chain head records {self.count} rows): {why}")
            prev = p

    def links(self) -> None:
        """Each chosen row's prev_hash against the row before it."""
        hashes = {self.by_seq[s]["hash"]: p for p, s in self.chosen.items()}
        for p in sorted(self.chosen):
            s = self.chosen[p]
            if p > 1 and p - 1 not in self.chosen:
                continue  # explained by the deletion (or malformed row) reported already
            expected = GENESIS_HASH if p == 1 else self.by_seq[self.chosen[p - 1]]["hash"]
            prev = self.by_seq[s]["prev_hash"]
            if prev == expected or s in self.edited:
                continue
            two_back = (
                GENESIS_HASH if p == 2 else (self.by_seq[self.chosen[p - 2]]["hash"] if p - 2 in self.chosen else None)
            )
            if p >= 2 and prev == two_back:
                q = self.chosen[p - 1]
                self.add(
                    q,
                    "inserted",
                    f"row {q} does not belong to the chain: row {p}'s prev_hash skips it and points to row {p - 2}",
                )
            elif prev in hashes:
                self.add(s, "reordered", f"row {s}'s prev_hash points to row {hashes[prev]}, not to the row before it")
            elif p >= 2:
                q = self.chosen[p - 1]
                self.add(
                    q,
                    "edited",
                    f"row {q} was rewritten and its hash recomputed: row {p}'s prev_hash no "
                    "longer matches it (or rows between them were removed and the rest renumbered)",
                )
            else:
                self.add(s, "edited", f"row {s} is the first row but its prev_hash is not the genesis hash")

    def head_record(self) -> None:
        """Rows past the head's count were added outside the ledger; its hash must be the last row's."""
        if self.head is None:
            self.add(
                0,
                "deleted",
                "the chain head record (row count and last hash) is missing: truncation of the "
                "tail cannot be ruled out",
            )
            return
        for p in sorted(self.holders):
            if p > self.count:
                for s in self.holders[p]:
                    self.add(
                        s,
                        "inserted",
                        f"row stored as seq {s} lies beyond the {self.count} rows the chain "
                        "head records: it was added outside the ledger",
                    )
        if self.count == 0 and self.head[1] != GENESIS_HASH:
            self.add(0, "edited", "the chain head records no rows but a non-genesis hash")
        elif self.count in self.chosen and self.by_seq[self.chosen[self.count]]["hash"] != self.head[1]:
            q = self.chosen[self.count]
            self.add(
                q,
                "edited",
                f"row {q}'s hash does not match the chain head's last hash: it was rewritten (or the head record was)",
            )


def _chain_pass(
    found: _Findings,
    table: str,
    columns: Sequence[tuple[str, str]],
    rows: list[dict[str, Any]],
    head: tuple[int, str] | None,
    malformed: set[int],
) -> None:
    chain = _Chain(found, table, columns, rows, head, malformed)
    chain.place()
    chain.reorders()
    chain.choose()
    chain.gaps()
    chain.links()
    chain.head_record()


# ----------------------------------------------------------------------------------------------------------------
# 5. Cross-table checks


def _cross_pass(found: _Findings, verified: dict[str, list[dict[str, Any]]]) -> None:
    """The meta table holds each required key once (schema and version were read in pass 1)."""
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
