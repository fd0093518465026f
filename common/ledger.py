"""Append-only, hash-chained SQLite ledgers of privacy spend.

A *site ledger* lives where the data lives: one row per training round a client takes part in, written before
the update leaves the site. Each append is committed in rollback-journal mode with ``synchronous=FULL``, so the
row is in the main database file, fsynced, before ``append`` returns: losing a ``-wal``, ``-shm`` or ``-journal``
file cannot lose an acknowledged spend. It is the source of truth for the site's budget across runs. The
*server ledger* is the coordinator's record of what each client reported, plus the run's configuration and
aggregation mode.

Tamper evidence: every declared table (``_SCHEMAS``: the meta table with the schema, version and creation time,
and the spend / runs / reports tables) is a hash chain: each row stores ``prev_hash`` and ``hash = sha256(canonical
JSON of chain name, seq, the row's fields and prev_hash)``; a per-chain head record (row count and last hash),
updated in the same transaction as the row, exposes truncation of the tail. ``verify_chain`` (``privatune.common.ledger_verify``)
checks the file's structure against the declared schema, SQLite's own integrity check, every row's types, every
chain link and head, and names the row that was edited, deleted, inserted, moved or is malformed; it reports and
never raises on a damaged file. There is no secret key: someone who rewrites a whole suffix of the chain and its
head consistently is not caught by the chain alone; that is what the audit's cross-check against the other
party's ledger is for.

An existing ledger file is never re-created: an empty, truncated, corrupt or foreign file at a ledger path is
refused with a LedgerError that says how to recover. Only a missing path creates a ledger, built under a temporary
name in the same folder and linked into place, owner-only (0600) like its journal.

File naming (what ``privatune audit`` searches folders for): site ledgers ``site-<site_id>.ledger.sqlite``, the
server ledger ``server.ledger.sqlite``. Files are told apart by the schema recorded inside them, not by name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privatune.common.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT, Mechanism, compose, epsilon_of
from privatune.common.protocol import NOISE_SOURCE_SEEDED, NOISE_SOURCES
from privatune.common.record_budget import cohort_id_of, pack_ids, unpack_ids

GENESIS_HASH = "0" * 64
LEDGER_SUFFIX = ".ledger.sqlite"
LEDGER_GLOB = "*" + LEDGER_SUFFIX
SERVER_LEDGER_NAME = "server" + LEDGER_SUFFIX
SITE_SCHEMA = "privatune.site-ledger"
SERVER_SCHEMA = "privatune.server-ledger"
SCHEMA_VERSION = "2"  # 2: the meta table is chained too; rollback-journal mode

STATUS_TRAINED = "trained"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"
STATUS_DROPPED = "dropped"
STATUSES = (STATUS_TRAINED, STATUS_BUDGET_EXHAUSTED, STATUS_DROPPED)

#: Why a spend was made: DP-SGD training, or a noised release of metrics on validation records
#: (client/metrics_release.py).
PURPOSE_TRAIN = "train"
PURPOSE_METRICS = "metrics"
PURPOSES = (PURPOSE_TRAIN, PURPOSE_METRICS)

PROBLEM_KINDS = ("malformed", "edited", "deleted", "inserted", "reordered")
_BUSY_TIMEOUT_S = 30.0


class LedgerError(RuntimeError):
    """A ledger file cannot be opened, read or written as asked."""


class LedgerVersionError(LedgerError):
    """The ledger is sound but of an older version this privatune does not write (migrate it)."""


class LedgerIntegrityError(LedgerError):
    """The ledger failed verification; ``problems`` lists what ``verify_chain`` found."""

    def __init__(self, path: Path, problems: Sequence[ChainProblem]):
        self.path = Path(path)
        self.problems = list(problems)
        listed = "; ".join(p.describe() for p in self.problems[:5])
        more = f" and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
        super().__init__(
            f"ledger {self.path} failed verification: {listed}{more}. The recorded privacy spend cannot be trusted. "
            f"{recovery_advice(self.path)}."
        )


@dataclass(frozen=True)
class ChainProblem:
    """One problem in a ledger file. ``seq``: the row's sequence number (0: the chain's head record; None: the
    table, or with ``table`` None the file, as a whole). ``kind`` is one of PROBLEM_KINDS: "malformed" for
    anything that is not a well-formed ledger (unreadable file, wrong structure, a value of the wrong type)."""

    seq: int | None
    kind: str  # one of PROBLEM_KINDS
    detail: str
    table: str | None = "spend"

    def describe(self) -> str:
        if self.table is None:
            where = "the file"
        elif self.seq is None:
            where = f"table {self.table}"
        elif self.seq == 0:
            where = f"{self.table} head"
        else:
            where = f"{self.table} row {self.seq}"
        return f"{where}: {self.kind} ({self.detail})"


# ----------------------------------------------------------------------------------------------------------------
# Validation and canonical hashing


def utc_now() -> str:
    """The current time as ISO-8601 UTC with microseconds (the ledger's timestamp format)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def site_ledger_filename(site_id: str) -> str:
    """``site-<site_id>.ledger.sqlite`` with characters unsafe in file names replaced by ``_``."""
    if not isinstance(site_id, str) or not site_id:
        raise LedgerError(f"site_id must be a non-empty string, got {site_id!r}")
    return f"site-{re.sub(r'[^A-Za-z0-9._-]', '_', site_id)}{LEDGER_SUFFIX}"


def _bad(where: str, name: str, value: Any, want: str) -> LedgerError:
    return LedgerError(f"{where}: {name} must be {want}, got {value!r}")


def _text(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(where, name, value, "a non-empty string")
    return value


def _int(where: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(where, name, value, f"an integer >= {minimum}")
    return value


def _real(
    where: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    allow_inf: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _bad(where, name, value, "a number")
    value = float(value)
    if math.isinf(value) and not allow_inf:
        raise _bad(where, name, value, "finite")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise _bad(where, name, value, f"in {bracket}{low:g}, {high:g}]")
    return value


def _timestamp(where: str, name: str, value: Any) -> str:
    _text(where, name, value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _bad(where, name, value, "an ISO-8601 timestamp") from None
    if parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:
        raise _bad(where, name, value, "an ISO-8601 timestamp in UTC (ending +00:00 or Z)")
    return value


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


# ----------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class SpendEntry:
    """One training round at one site: the mechanism applied to the dataset and the epsilon it brings."""

    run_id: str
    round: int
    site_id: str
    dataset_fingerprint: str
    params_fingerprint: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_run: float  # epsilon of this run after this round (rounds 1..r of this run)
    epsilon_dataset: float  # epsilon of this dataset across ALL runs in the ledger after this round
    max_epsilon: float | None  # the site budget in force (None = none)
    started_at: str  # ISO-8601 UTC
    recorded_at: str  # ISO-8601 UTC
    # The cohort (row of the ``cohorts`` table) the mechanism sampled from; None in ledgers written before
    # per-record budgets: such a spend counts against every record of the site.
    cohort_id: str | None = None
    purpose: str = PURPOSE_TRAIN
    # Where the round's DP noise came from (common.protocol NOISE_SOURCES). Defaults to "seeded", the weaker claim:
    # a row says "site-csprng" only when the writer says so; rows of ledgers older than the field read as "seeded".
    noise_source: str = NOISE_SOURCE_SEEDED

    def __post_init__(self) -> None:
        w = f"SpendEntry(run {self.run_id!r}, round {self.round!r})"
        if self.cohort_id is not None:
            _text(w, "cohort_id", self.cohort_id)
        if self.purpose is None:  # a row written before purposes existed
            object.__setattr__(self, "purpose", PURPOSE_TRAIN)
        if self.purpose not in PURPOSES:
            raise _bad(w, "purpose", self.purpose, f"one of {PURPOSES}")
        for name in ("run_id", "site_id", "dataset_fingerprint", "params_fingerprint"):
            _text(w, name, getattr(self, name))
        _int(w, "round", self.round, 1)
        _int(w, "steps", self.steps, 0)
        norm = {
            "noise_multiplier": _real(w, "noise_multiplier", self.noise_multiplier, low=0.0),
            "sample_rate": _real(w, "sample_rate", self.sample_rate, low=0.0, high=1.0, low_open=True),
            "max_grad_norm": _real(w, "max_grad_norm", self.max_grad_norm, low=0.0, allow_inf=True),
            "delta": _real(w, "delta", self.delta, low=0.0, high=1.0, low_open=True),
            "epsilon_run": _real(w, "epsilon_run", self.epsilon_run, low=0.0, allow_inf=True),
            "epsilon_dataset": _real(w, "epsilon_dataset", self.epsilon_dataset, low=0.0, allow_inf=True),
        }
        if norm["delta"] == 1.0:
            raise _bad(w, "delta", self.delta, "in (0, 1)")
        if self.max_epsilon is not None:
            norm["max_epsilon"] = _real(w, "max_epsilon", self.max_epsilon, low=0.0, low_open=True)
        if self.accountant not in ACCOUNTANTS:
            raise _bad(w, "accountant", self.accountant, f"one of {ACCOUNTANTS}")
        _timestamp(w, "started_at", self.started_at)
        _timestamp(w, "recorded_at", self.recorded_at)
        if self.noise_source not in NOISE_SOURCES:
            raise _bad(w, "noise_source", self.noise_source, f"one of {NOISE_SOURCES}")
        for name, value in norm.items():  # store ints given for float fields as floats (stable hashes)
            object.__setattr__(self, name, value)

    @property
    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class SpendRecord:
    """A stored site-ledger row."""

    seq: int
    entry: SpendEntry
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class RunRecord:
    """A stored server-ledger run row: the run's configuration and aggregation mode."""

    seq: int
    run_id: str
    config: dict[str, Any]
    aggregation: str
    recorded_at: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class ClientReport:
    """What one client reported to the server for one round. Mechanism fields are None unless it trained."""

    run_id: str
    round: int
    client_id: str  # must equal the site_id the client writes into its own ledger (the audit joins on it)
    node_id: str  # Flower node id (a uint64, stored as text)
    status: str  # one of STATUSES
    reason: str
    dataset_fingerprint: str | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    max_grad_norm: float | None
    delta: float | None
    accountant: str | None
    epsilon_reported: float | None  # the client's epsilon for this run after this round
    epsilon_dataset_reported: float | None  # the client's epsilon for its dataset across runs, if it reported one
    recorded_at: str
    noise_source: str | None = None  # what the client reported (NOISE_SOURCES); None when it reported none

    def __post_init__(self) -> None:
        w = f"ClientReport(run {self.run_id!r}, round {self.round!r}, client {self.client_id!r})"
        _text(w, "run_id", self.run_id)
        _text(w, "client_id", self.client_id)
        _int(w, "round", self.round, 1)
        if isinstance(self.node_id, bool) or not isinstance(self.node_id, (int, str)) or self.node_id == "":
            raise _bad(w, "node_id", self.node_id, "an integer or a non-empty string")
        object.__setattr__(self, "node_id", str(self.node_id))
        if self.status not in STATUSES:
            raise _bad(w, "status", self.status, f"one of {STATUSES}")
        if not isinstance(self.reason, str):
            raise _bad(w, "reason", self.reason, "a string")
        _timestamp(w, "recorded_at", self.recorded_at)
        mech = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta", "accountant", "epsilon_reported")
        if self.status == STATUS_TRAINED:
            missing = [n for n in mech if getattr(self, n) is None]
            if missing:
                raise LedgerError(f"{w}: a 'trained' report needs {', '.join(missing)}")
        checks = {
            "noise_multiplier": dict(low=0.0),
            "sample_rate": dict(low=0.0, high=1.0, low_open=True),
            "max_grad_norm": dict(low=0.0, allow_inf=True),
            "delta": dict(low=0.0, high=1.0, low_open=True),
            "epsilon_reported": dict(low=0.0, allow_inf=True),
            "epsilon_dataset_reported": dict(low=0.0, allow_inf=True),
        }
        for name, kw in checks.items():
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _real(w, name, getattr(self, name), **kw))
        if self.steps is not None:
            _int(w, "steps", self.steps, 0)
        if self.accountant is not None and self.accountant not in ACCOUNTANTS:
            raise _bad(w, "accountant", self.accountant, f"one of {ACCOUNTANTS}")
        if self.noise_source is not None and self.noise_source not in NOISE_SOURCES:
            raise _bad(w, "noise_source", self.noise_source, f"one of {NOISE_SOURCES} or None")
        if self.dataset_fingerprint is not None and not isinstance(self.dataset_fingerprint, str):
            raise _bad(w, "dataset_fingerprint", self.dataset_fingerprint, "a string or None")

    @property
    def mechanism(self) -> Mechanism | None:
        if self.noise_multiplier is None or self.sample_rate is None or self.steps is None:
            return None
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class ReportRecord:
    """A stored server-ledger report row."""

    seq: int
    report: ClientReport
    prev_hash: str
    hash: str


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
    "spend": ("cohort_id", "purpose", "noise_source"),
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
}
_INDEXES = {
    SITE_SCHEMA: (
        "CREATE UNIQUE INDEX meta_key ON meta(key)",
        "CREATE INDEX spend_dataset ON spend(dataset_fingerprint)",
        "CREATE INDEX spend_run ON spend(run_id)",
        "CREATE INDEX cohorts_id ON cohorts(cohort_id)",
    ),
    SERVER_SCHEMA: ("CREATE UNIQUE INDEX meta_key ON meta(key)", "CREATE INDEX reports_run ON reports(run_id)"),
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
# SQLite plumbing
#
# Durability: rollback-journal mode (journal_mode=DELETE) with synchronous=FULL. A commit has reached the main
# file (and been fsynced) before it returns, so nothing acknowledged lives only in a -wal file that could be lost;
# the -journal file only ever holds the *old* pages of a transaction still in flight.


def lenient_text(raw: bytes) -> str:
    """SQLite text factory that cannot fail: invalid UTF-8 becomes lone surrogates, which the verifier reports."""
    return raw.decode("utf-8", errors="surrogateescape")


def _connect(path: Path, *, read_only: bool, create: bool = False) -> sqlite3.Connection:
    """A connection to an existing ledger file (``create``: the temporary file a new ledger is built in).

    Writers open with ``mode=rw``: a ledger that vanished is an error, never silently re-created empty."""
    if not create and not path.is_file():
        raise LedgerError(f"ledger {path} does not exist")
    uri = path.resolve().as_uri()
    try:
        conn = None
        if read_only:
            try:
                conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
                conn.text_factory = lenient_text
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.Error:  # e.g. a hot journal a read-only connection may not roll back
                if conn is not None:
                    conn.close()
        conn = sqlite3.connect(
            uri + ("?mode=rwc" if create else "?mode=rw"), uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None
        )
        conn.text_factory = lenient_text
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if not read_only:
            mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            if str(mode).lower() != "delete":
                conn.close()
                raise LedgerError(
                    f"ledger {path}: cannot leave journal mode {mode!r} (another process has it open "
                    "in WAL mode); stop it and retry"
                )
            conn.execute("PRAGMA synchronous=FULL")
    except (sqlite3.Error, UnicodeError) as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc} (is it an SQLite file?)") from exc
    return conn


@contextmanager
def _open(path: Path, *, read_only: bool) -> Iterator[sqlite3.Connection]:
    conn = _connect(path, read_only=read_only)
    try:
        yield conn
    finally:
        conn.close()


def read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    """The meta table as {key: value} (first row of a key wins); LedgerError when it is missing or unreadable."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if META_TABLE not in tables:
            raise LedgerError(f"{path} is not a privatune ledger (it has no meta table)")
        meta: dict[str, Any] = {}
        for key, value in conn.execute(f"SELECT key, value FROM {META_TABLE} ORDER BY rowid"):
            meta.setdefault(key, value)
        return meta
    except (sqlite3.Error, UnicodeError) as exc:
        raise LedgerError(f"cannot read the meta table of {path}: {exc}") from exc


def _read_schema(conn: sqlite3.Connection, path: Path) -> str:
    """The schema of a ledger this code writes (the current version); LedgerError for anything else."""
    meta = read_meta(conn, path)
    schema = meta.get("schema")
    if not isinstance(schema, str) or schema not in _SCHEMAS:
        raise LedgerError(f"{path} is not a privatune ledger (unknown schema {schema!r})")
    version = meta.get("version")
    if version == MIGRATING:
        raise LedgerError(
            f"{path}: a migration of this ledger was interrupted; its original is kept as "
            f"{meta.get('migration_backup')!r} in the same folder: put it back and migrate again"
        )
    if version == "1":
        raise LedgerVersionError(
            f"{path} is a version 1 ledger (written before the meta table was hash-chained): "
            f"`privatune audit` verifies it, but this privatune writes only version {SCHEMA_VERSION}: "
            "stop the site and run `privatune site migrate-ledger` on it"
        )
    if version != SCHEMA_VERSION:
        raise LedgerError(
            f"{path}: unsupported ledger version {version!r}, this privatune reads version {SCHEMA_VERSION}"
        )
    return schema


def ledger_schema(path: Path) -> str:
    """``SITE_SCHEMA`` or ``SERVER_SCHEMA`` for a ledger file; LedgerError for anything else."""
    path = Path(path)
    with _open(path, read_only=True) as conn:
        return _read_schema(conn, path)


def read_rows(path: Path, table: str) -> list[dict[str, Any]]:
    """Raw rows of one chained table in seq order, as stored (no validation: tampered rows are returned as-is)."""
    path = Path(path)
    with _open(path, read_only=True) as conn:
        schema = _read_schema(conn, path)
        if table not in _SCHEMAS[schema]:
            raise LedgerError(f"{path} ({schema}) has no table {table!r}")
        present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if table in _ADDED_TABLES and table not in present:
            return []  # a file written before the table existed
        conn.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY seq")]
            for r in rows:  # a file written before a column existed: the column reads as NULL
                for column in _ADDED_COLUMNS.get(table, ()):
                    r.setdefault(column, None)
            return rows
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read table {table} of {path}: {exc}") from exc


def verify_chain(path: Path) -> list[ChainProblem]:
    """Every problem in a ledger file (site or server): broken hash chains, and any malformation of the file, its
    structure or its rows, each naming the table and row. An empty list when intact; LedgerError only when the
    path is not a file. See ``privatune.common.ledger_verify``."""
    from privatune.common.ledger_verify import verify_ledger

    return verify_ledger(Path(path))


def recovery_advice(path: Path) -> str:
    """What to do with a ledger that cannot be trusted: never re-create it (its spends would be forgotten)."""
    return (
        f"Do not delete or re-create {Path(path).name}: the privacy spend it records would be forgotten. Keep "
        f"the file as evidence, audit it with `privatune audit {path}`, and restore the ledger from a backup; "
        "the site must not train until then"
    )


def _insert_row(
    conn: sqlite3.Connection, path: Path, schema: str, table: str, values: dict[str, Any], version: str = SCHEMA_VERSION
) -> int:
    """Insert one row at the end of ``table``'s chain inside the caller's write transaction; returns its seq.
    (``version`` "1" writes the older layout: only tests build such files.)"""
    columns = chained_tables_of(schema, version)[table]
    names = [name for name, _ in columns]
    found = conn.execute(f"SELECT count, head_hash FROM {HEADS_TABLE} WHERE chain=?", (table,)).fetchone()
    n_rows, max_seq = conn.execute(f"SELECT count(*), coalesce(max(seq), 0) FROM {table}").fetchone()
    last = conn.execute(f"SELECT hash FROM {table} WHERE seq=?", (max_seq,)).fetchone()
    if found is None or n_rows != found[0] or max_seq != found[0] or (last[0] if last else GENESIS_HASH) != found[1]:
        raise LedgerIntegrityError(
            path,
            verify_chain(path)
            or [ChainProblem(seq=0, kind="edited", detail="the chain head does not match the rows", table=table)],
        )
    count, head = found
    seq = count + 1
    digest = row_hash(table, seq, hashed_fields(table, names, values), _real_columns(columns), head)
    conn.execute(
        f"INSERT INTO {table} (seq, {', '.join(names)}, prev_hash, hash) VALUES ({', '.join('?' * (len(names) + 3))})",
        [seq, *(values[n] for n in names), head, digest],
    )
    conn.execute(f"UPDATE {HEADS_TABLE} SET count=?, head_hash=? WHERE chain=?", (seq, digest, table))
    return seq


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def migrate_ledger(path: Path) -> Path:
    """Rewrite a version 1 ledger as the current version, keeping every row with its seq and hash (the chains
    carry over unchanged; the meta table becomes a chain of its own). Returns where the original is kept.

    Run it with the site stopped. The original must verify; it is copied aside (``<name>.v1-<time>.bak``) under an
    exclusive lock, the new file is built under a temporary name and verified, the original is marked as being
    migrated (so a writer that still had it open fails instead of writing to a file about to be replaced), and the
    new file is renamed over it."""
    from privatune.common.ledger_verify import inspect_ledger

    path = Path(path)
    found = inspect_ledger(path)
    if found.schema is None or found.problems:
        raise LedgerIntegrityError(path, found.problems)
    if found.version != "1":
        raise LedgerError(f"{path} is a version {found.version} ledger: nothing to migrate")
    schema = found.schema
    conn = _connect(path, read_only=False)  # leaving WAL checkpoints the log into the main file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.creating")
    try:
        conn.execute("BEGIN EXCLUSIVE")
        conn.row_factory = sqlite3.Row
        meta = read_meta(conn, path)
        heads = {r["chain"]: (r["count"], r["head_hash"]) for r in conn.execute(f"SELECT * FROM {HEADS_TABLE}")}
        present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        tables = {
            t: ([dict(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY seq")] if t in present else [])
            for t in chained_tables_of(schema, "1")
        }
        backup = path.with_name(f"{path.name}.v1-{utc_now()[:19].replace(':', '')}.bak")
        shutil.copy2(path, backup)
        os.chmod(backup, 0o600)
        old_umask = os.umask(0o077)
        try:
            new = _connect(tmp, read_only=False, create=True)
        finally:
            os.umask(old_umask)
        try:
            new.execute("BEGIN IMMEDIATE")
            for stmt in schema_ddl(schema):
                new.execute(stmt)
            new.execute(f"INSERT INTO {HEADS_TABLE} VALUES (?, 0, ?)", (META_TABLE, GENESIS_HASH))
            items = {**meta, "version": SCHEMA_VERSION, "migrated_from": "1", "migrated_at": utc_now()}
            for key in (*META_REQUIRED, *sorted(k for k in items if k not in META_REQUIRED)):
                _insert_row(new, tmp, schema, META_TABLE, {"key": key, "value": str(items[key])})
            for table, rows in tables.items():
                names = [n for n, _ in _SCHEMAS[schema][table]]
                for r in rows:  # verbatim: same seq, fields, prev_hash and hash
                    new.execute(
                        f"INSERT INTO {table} (seq, {', '.join(names)}, prev_hash, hash) VALUES "
                        f"({', '.join('?' * (len(names) + 3))})",
                        [r["seq"], *(r.get(n) for n in names), r["prev_hash"], r["hash"]],
                    )
                count, head = heads.get(table, (0, GENESIS_HASH))
                new.execute(f"INSERT INTO {HEADS_TABLE} VALUES (?, ?, ?)", (table, count, head))
            for table in _SCHEMAS[schema]:  # tables a version 1 file did not have start empty
                if table != META_TABLE and table not in tables:
                    new.execute(f"INSERT INTO {HEADS_TABLE} VALUES (?, 0, ?)", (table, GENESIS_HASH))
            new.execute("COMMIT")
        finally:
            new.close()
        problems = verify_chain(tmp)
        if problems:
            raise LedgerIntegrityError(tmp, problems)
        # Writers that still hold the original open must fail, not write to a file about to be replaced.
        conn.execute(f"DELETE FROM {HEADS_TABLE}")
        conn.execute(f"UPDATE {META_TABLE} SET value=? WHERE key='version'", (MIGRATING,))
        conn.execute(f"INSERT OR REPLACE INTO {META_TABLE} (key, value) VALUES ('migration_backup', ?)", (backup.name,))
        conn.execute("COMMIT")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return backup
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot migrate ledger {path}: {exc}") from exc
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass


# ----------------------------------------------------------------------------------------------------------------
# Ledgers


class _ChainedLedger:
    SCHEMA = ""

    def __init__(self, path: Path, *, verify: bool = True):
        """Open the ledger at ``path``, or create it if (and only if) nothing is there.

        An existing file is never re-created or treated as new, whatever state it is in: empty, truncated,
        corrupt, another kind of file, or a broken chain all raise LedgerError naming the file and what to do.
        ``verify=False`` skips the full chain check (the file must still be a readable ledger of this kind)."""
        self.path = Path(path)
        if not os.path.lexists(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._create_new():
                return
        self._open_existing(verify)

    # -- an existing file ----------------------------------------------------------------------------------------

    def _open_existing(self, verify: bool) -> None:
        path = self.path
        if not path.is_file():
            raise LedgerError(f"ledger {path} is not a regular file. {recovery_advice(path)}")
        if path.stat().st_size == 0:
            raise LedgerError(
                f"ledger {path} is empty (0 bytes): it was truncated or never finished. {recovery_advice(path)}"
            )
        try:
            schema = ledger_schema(path)
        except LedgerVersionError:
            raise
        except LedgerError as exc:
            raise LedgerError(f"{exc}. {recovery_advice(path)}") from exc
        if schema != self.SCHEMA:
            raise LedgerError(f"{path} is a {schema}, not a {self.SCHEMA}: check the path")
        if verify:
            problems = verify_chain(path)
            if problems:
                raise LedgerIntegrityError(path, problems)
        if path.stat().st_mode & 0o077:
            try:  # ledgers written by an older privatune were world-readable
                os.chmod(path, 0o600)
            except OSError:
                pass

    # -- a new file --------------------------------------------------------------------------------------------

    def _create_new(self) -> bool:
        """Build the empty ledger under a temporary name in the same folder, then link it into place, so a crash
        mid-create leaves no half ledger at the real path. False when another process created it first."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.creating")
        try:
            old_umask = os.umask(0o077)  # the file and its -journal are owner-only from the first byte
            try:
                conn = _connect(tmp, read_only=False, create=True)
            finally:
                os.umask(old_umask)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for stmt in schema_ddl(self.SCHEMA):
                    conn.execute(stmt)
                for table in _SCHEMAS[self.SCHEMA]:
                    conn.execute(f"INSERT INTO {HEADS_TABLE} VALUES (?, 0, ?)", (table, GENESIS_HASH))
                for key, value in (("schema", self.SCHEMA), ("version", SCHEMA_VERSION), ("created_at", utc_now())):
                    _insert_row(conn, tmp, self.SCHEMA, META_TABLE, {"key": key, "value": value})
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise LedgerError(f"cannot create ledger {self.path}: {exc}") from exc
            finally:
                conn.close()
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, self.path)  # atomic, and never replaces a file that appeared meanwhile
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links
                if os.path.lexists(self.path):
                    return False
                os.rename(tmp, self.path)
            _fsync_dir(self.path.parent)
            return True
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
                try:
                    leftover.unlink()
                except FileNotFoundError:
                    pass

    # -- rows --------------------------------------------------------------------------------------------------

    def _append(self, table: str, values: dict[str, Any]) -> int:
        """Insert one row at the end of ``table``'s chain; in the main file (fsynced) before returning its seq."""
        with _open(self.path, read_only=False) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")  # take the write lock before reading the head: appends serialise
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot write ledger {self.path}: {exc}") from exc
            try:
                seq = _insert_row(conn, self.path, self.SCHEMA, table, values)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise LedgerError(f"cannot write ledger {self.path}: {exc}") from exc
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return seq

    def verify(self) -> list[ChainProblem]:
        return verify_chain(self.path)

    def _select(self, table: str, where: str = "", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with _open(self.path, read_only=False) as conn:
            conn.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in conn.execute(f"SELECT * FROM {table} {where} ORDER BY seq", params)]
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot read table {table} of {self.path}: {exc}") from exc


_SPEND_FIELDS = tuple(f.name for f in fields(SpendEntry))
_REPORT_FIELDS = tuple(f.name for f in fields(ClientReport))


class SiteLedger(_ChainedLedger):
    """A site's durable record of every privacy spend on its data (one row per round it trains in).

    Opening an existing file verifies its chain (LedgerIntegrityError if broken: a site must not keep spending on a
    budget it can no longer prove) and continues it. Each ``append`` is committed before it returns, so writing
    the spend before the update leaves the site makes the record survive a crash.
    """

    SCHEMA = SITE_SCHEMA

    def append(self, entry: SpendEntry) -> int:
        if not isinstance(entry, SpendEntry):
            raise LedgerError(f"append takes a SpendEntry, got {type(entry).__name__}")
        return self._append("spend", asdict(entry))

    def entries(self, dataset_fingerprint: str | None = None) -> list[SpendRecord]:
        rows = (
            self._select("spend")
            if dataset_fingerprint is None
            else self._select("spend", "WHERE dataset_fingerprint=?", (dataset_fingerprint,))
        )
        out = []
        for r in rows:
            try:
                entry = SpendEntry(
                    **{n: r.get(n) for n in _SPEND_FIELDS if r.get(n) is not None or n not in _ADDED_COLUMNS["spend"]}
                )
            except LedgerError as exc:
                raise LedgerError(f"{self.path}: row {r['seq']} is invalid: {exc}") from exc
            out.append(SpendRecord(seq=r["seq"], entry=entry, prev_hash=r["prev_hash"], hash=r["hash"]))
        return out

    def history(self, dataset_fingerprint: str) -> list[Mechanism]:
        """Every mechanism ever applied to this dataset (all runs, in order): what its budget composes over."""
        rows = self._select("spend", "WHERE dataset_fingerprint=?", (dataset_fingerprint,))
        return [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in rows]

    def run_history(self, run_id: str, dataset_fingerprint: str) -> list[Mechanism]:
        rows = self._select("spend", "WHERE run_id=? AND dataset_fingerprint=?", (run_id, dataset_fingerprint))
        return [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in rows]

    def add_cohort(self, record_ids: Sequence[bytes], key_check: str) -> str:
        """Store a set of record ids once (a no-op when already stored); returns its cohort id."""
        _text("add_cohort", "key_check", key_check)
        packed = pack_ids(record_ids)
        cid = cohort_id_of(packed)
        if not self._select("cohorts", "WHERE cohort_id=?", (cid,)):
            self._append(
                "cohorts",
                {
                    "cohort_id": cid,
                    "size": len(unpack_ids(packed)),
                    "ids": packed,
                    "key_check": key_check,
                    "recorded_at": utc_now(),
                },
            )
        return cid

    def key_checks(self) -> set[str]:
        """The key checks of every site key that made a stored cohort (one, unless the key was replaced)."""
        with _open(self.path, read_only=False) as conn:
            return {r[0] for r in conn.execute("SELECT DISTINCT key_check FROM cohorts")}

    def cohorts(self) -> dict[str, frozenset[bytes]]:
        """Every stored cohort: cohort id -> the record ids it holds."""
        return {r["cohort_id"]: frozenset(unpack_ids(r["ids"])) for r in self._select("cohorts")}

    def last_round(self, run_id: str) -> int | None:
        with _open(self.path, read_only=False) as conn:
            row = conn.execute("SELECT max(round) FROM spend WHERE run_id=?", (run_id,)).fetchone()
        return row[0]

    def projected(
        self, run_id: str, dataset_fingerprint: str, new: Mechanism, delta: float, accountant: str = DEFAULT_ACCOUNTANT
    ) -> tuple[float, float]:
        """(epsilon_run, epsilon_dataset) this site would reach if it applied ``new`` now: the budget check to make
        before training, and the values to record in the SpendEntry."""
        run = epsilon_of(compose(self.run_history(run_id, dataset_fingerprint), new), delta, accountant)
        data = epsilon_of(compose(self.history(dataset_fingerprint), new), delta, accountant)
        return run, data


class ServerLedger(_ChainedLedger):
    """The coordinator's record: each run's configuration and aggregation mode, and every client report."""

    SCHEMA = SERVER_SCHEMA

    def record_run(self, run_id: str, config: dict[str, Any], aggregation: str) -> int:
        _text("record_run", "run_id", run_id)
        _text("record_run", "aggregation", aggregation)
        if not isinstance(config, dict):
            raise _bad("record_run", "config", config, "a dict")
        try:
            text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"record_run: config of run {run_id!r} is not JSON-serialisable: {exc}") from exc
        return self._append(
            "runs", {"run_id": run_id, "config": text, "aggregation": aggregation, "recorded_at": utc_now()}
        )

    def record_report(
        self,
        run_id: str,
        round: int,
        client_id: str,
        node_id: int | str,
        *,
        status: str,
        reason: str = "",
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
        steps: int | None = None,
        max_grad_norm: float | None = None,
        delta: float | None = None,
        accountant: str | None = None,
        epsilon_reported: float | None = None,
        epsilon_dataset_reported: float | None = None,
        dataset_fingerprint: str | None = None,
        recorded_at: str | None = None,
        noise_source: str | None = None,
    ) -> int:
        """Record what a client reported for a round. ``status`` 'trained' needs every mechanism field and
        ``epsilon_reported``; record 'dropped' for every sampled client whose reply never arrived, so the audit can
        tell a lost reply from an unreported spend."""
        report = ClientReport(
            run_id=run_id,
            round=round,
            client_id=client_id,
            node_id=node_id,
            status=status,
            reason=reason,
            dataset_fingerprint=dataset_fingerprint,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            max_grad_norm=max_grad_norm,
            delta=delta,
            accountant=accountant,
            epsilon_reported=epsilon_reported,
            epsilon_dataset_reported=epsilon_dataset_reported,
            recorded_at=recorded_at or utc_now(),
            noise_source=noise_source,
        )
        return self._append("reports", asdict(report))

    def runs(self) -> list[RunRecord]:
        return [
            RunRecord(
                seq=r["seq"],
                run_id=r["run_id"],
                config=json.loads(r["config"]),
                aggregation=r["aggregation"],
                recorded_at=r["recorded_at"],
                prev_hash=r["prev_hash"],
                hash=r["hash"],
            )
            for r in self._select("runs")
        ]

    def reports(self, run_id: str | None = None) -> list[ReportRecord]:
        rows = self._select("reports") if run_id is None else self._select("reports", "WHERE run_id=?", (run_id,))
        out = []
        for r in rows:
            try:
                report = ClientReport(**{n: r.get(n) for n in _REPORT_FIELDS})
            except LedgerError as exc:
                raise LedgerError(f"{self.path}: report row {r['seq']} is invalid: {exc}") from exc
            out.append(ReportRecord(seq=r["seq"], report=report, prev_hash=r["prev_hash"], hash=r["hash"]))
        return out
