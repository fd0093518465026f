"""Append-only, hash-chained SQLite ledgers of privacy spend.

A *site ledger* lives where the data lives: one row per training round a client takes part in, written (and
committed, WAL mode with ``synchronous=FULL``) before the update leaves the site. It is the source of truth for
the site's budget across runs. The *server ledger* is the coordinator's record of what each client reported, plus
the run's configuration and aggregation mode.

Tamper evidence: every row stores ``prev_hash`` and ``hash = sha256(canonical JSON of chain name, seq, the row's
fields and prev_hash)``; a per-chain head record (row count and last hash), updated in the same transaction as the
row, exposes truncation of the tail. ``verify_chain`` names the row that was edited, deleted, inserted or moved.
There is no secret key: someone who rewrites a whole suffix of the chain and its head consistently is not caught
by the chain alone; that is what the audit's cross-check against the other party's ledger is for.

File naming (what ``privatune audit`` searches folders for): site ledgers ``site-<site_id>.ledger.sqlite``, the
server ledger ``server.ledger.sqlite``. Files are told apart by the schema recorded inside them, not by name.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT, Mechanism, compose, epsilon_of

GENESIS_HASH = "0" * 64
LEDGER_SUFFIX = ".ledger.sqlite"
LEDGER_GLOB = "*" + LEDGER_SUFFIX
SERVER_LEDGER_NAME = "server" + LEDGER_SUFFIX
SITE_SCHEMA = "privatune.site-ledger"
SERVER_SCHEMA = "privatune.server-ledger"
SCHEMA_VERSION = "1"

STATUS_TRAINED = "trained"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"
STATUS_DROPPED = "dropped"
STATUSES = (STATUS_TRAINED, STATUS_BUDGET_EXHAUSTED, STATUS_DROPPED)

PROBLEM_KINDS = ("edited", "deleted", "inserted", "reordered")
_BUSY_TIMEOUT_S = 30.0


class LedgerError(RuntimeError):
    """A ledger file cannot be opened, read or written as asked."""


class LedgerIntegrityError(LedgerError):
    """The ledger's hash chain is broken; ``problems`` lists what ``verify_chain`` found."""

    def __init__(self, path: Path, problems: Sequence[ChainProblem]):
        self.path = Path(path)
        self.problems = list(problems)
        listed = "; ".join(f"{p.table} row {p.seq}: {p.kind} ({p.detail})" for p in self.problems[:5])
        more = f" and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
        super().__init__(
            f"ledger {self.path} failed verification: {listed}{more}. The recorded privacy spend cannot be trusted; "
            "keep the file as evidence, audit it with `privatune audit`, and start a new ledger only after review."
        )


@dataclass(frozen=True)
class ChainProblem:
    """One break in a hash chain. ``seq`` is the row's sequence number (0: the chain's head record)."""

    seq: int
    kind: str  # one of PROBLEM_KINDS
    detail: str
    table: str = "spend"


# ----------------------------------------------------------------------------------------------------------------
# Validation and canonical hashing


def utc_now() -> str:
    """The current time as ISO-8601 UTC with microseconds (the ledger's timestamp format)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


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


def _real(where: str, name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False,
          allow_inf: bool = False) -> float:
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

    def __post_init__(self) -> None:
        w = f"SpendEntry(run {self.run_id!r}, round {self.round!r})"
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
)
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
)
_SCHEMAS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    SITE_SCHEMA: {"spend": _SPEND_COLUMNS},
    SERVER_SCHEMA: {"runs": _RUN_COLUMNS, "reports": _REPORT_COLUMNS},
}
_INDEXES = {
    SITE_SCHEMA: ("CREATE INDEX IF NOT EXISTS spend_dataset ON spend(dataset_fingerprint)",
                  "CREATE INDEX IF NOT EXISTS spend_run ON spend(run_id)"),
    SERVER_SCHEMA: ("CREATE INDEX IF NOT EXISTS reports_run ON reports(run_id)",),
}


def _real_columns(columns: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(name for name, sql in columns if sql.startswith("REAL"))


# ----------------------------------------------------------------------------------------------------------------
# SQLite plumbing


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only and not path.is_file():
        raise LedgerError(f"ledger {path} does not exist")
    try:
        if read_only:
            try:
                conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S,
                                       isolation_level=None)
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.Error:  # e.g. a WAL file whose -shm cannot be created read-only: read it normally
                pass
        conn = sqlite3.connect(str(path), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc} (is it an SQLite file?)") from exc
    if not read_only:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    return conn


@contextmanager
def _open(path: Path, *, read_only: bool) -> Iterator[sqlite3.Connection]:
    conn = _connect(path, read_only=read_only)
    try:
        yield conn
    finally:
        conn.close()


def _read_schema(conn: sqlite3.Connection, path: Path) -> str:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" not in tables:
        raise LedgerError(f"{path} is not a privatune ledger (it has no meta table)")
    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is None or row[0] not in _SCHEMAS:
        raise LedgerError(f"{path} is not a privatune ledger (unknown schema {row[0] if row else None!r})")
    version = conn.execute("SELECT value FROM meta WHERE key='version'").fetchone()
    if version is None or version[0] != SCHEMA_VERSION:
        raise LedgerError(f"{path}: unsupported ledger version {version[0] if version else None!r}, "
                          f"this privatune reads version {SCHEMA_VERSION}")
    return row[0]


def ledger_schema(path: Path) -> str:
    """``SITE_SCHEMA`` or ``SERVER_SCHEMA`` for a ledger file; LedgerError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"ledger {path} does not exist")
    with _open(path, read_only=True) as conn:
        try:
            return _read_schema(conn, path)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {path}: {exc}") from exc


def read_rows(path: Path, table: str) -> list[dict[str, Any]]:
    """Raw rows of one chained table in seq order, as stored (no validation: tampered rows are returned as-is)."""
    path = Path(path)
    with _open(path, read_only=True) as conn:
        schema = _read_schema(conn, path)
        if table not in _SCHEMAS[schema]:
            raise LedgerError(f"{path} ({schema}) has no table {table!r}")
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY seq")]
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read table {table} of {path}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# Chain verification


def _candidate_seqs(stored: int, hint: int, upper: int) -> Iterator[int]:
    """Positions a moved row might have been hashed at: first the shift seen on the previous moved row, then
    outward from where it is stored."""
    if 1 <= stored + hint <= upper and hint != 0:
        yield stored + hint
    for d in range(1, upper + 1):
        for cand in (stored + d, stored - d):
            if 1 <= cand <= upper and cand != stored + hint:
                yield cand
        if stored + d > upper and stored - d < 1:
            return


def _verify_table(table: str, columns: Sequence[tuple[str, str]], rows: list[dict[str, Any]],
                  head: tuple[int, str] | None) -> list[ChainProblem]:
    names = [name for name, _ in columns]
    reals = _real_columns(columns)
    found: dict[tuple[int, str], ChainProblem] = {}

    def add(seq: int, kind: str, detail: str) -> None:
        found.setdefault((seq, kind), ChainProblem(seq=seq, kind=kind, detail=detail, table=table))

    prefixes = {r["seq"]: _hash_prefix(table, {n: r[n] for n in names}, reals, r["prev_hash"]) for r in rows}

    def h(row: dict[str, Any], seq: int) -> str:
        return _finish(prefixes[row["seq"]], seq)

    count = head[0] if head else 0
    upper = max([count, len(rows)] + [r["seq"] for r in rows]) + 1
    # 1. Each row against its own hash: intact, moved (hash valid at another position) or edited.
    position: dict[int, int] = {}  # stored seq -> position in the chain it was written at
    edited: set[int] = set()
    hint = 0
    for r in rows:
        s = r["seq"]
        if h(r, s) == r["hash"]:
            position[s] = s
            continue
        moved_to = next((c for c in _candidate_seqs(s, hint, upper) if h(r, c) == r["hash"]), None)
        if moved_to is None:
            edited.add(s)
            position[s] = s
            add(s, "edited", f"row {s}'s contents no longer match its stored hash: a field was changed after it "
                             "was written")
        else:
            position[s] = moved_to
            hint = moved_to - s
    by_seq = {r["seq"]: r for r in rows}
    if head is not None:
        at = [position[r["seq"]] for r in rows if r["hash"] == head[1] and r["seq"] not in edited]
        if at and max(at) != count:
            add(0, "edited", f"the chain head records {count} rows but its last hash is row {max(at)}'s: the "
                             "head's count was changed")
            count = max(at)
            head = (count, head[1])
    # 2. Rows written at a position but stored out of order relative to their neighbours: reordered.
    stored_order = [r["seq"] for r in rows]
    prefix_max, running = [], -1
    for s in stored_order:
        prefix_max.append(running)
        running = max(running, position[s])
    suffix_min, running = [0] * len(stored_order), math.inf
    for i in range(len(stored_order) - 1, -1, -1):
        suffix_min[i] = running
        running = min(running, position[stored_order[i]])
    for i, s in enumerate(stored_order):
        p = position[s]
        if p != s and (prefix_max[i] > p or suffix_min[i] < p):
            add(s, "reordered", f"row stored as seq {s} was written as row {p}: rows were moved")
    # 3. Walk the chain by position.
    holders: dict[int, list[int]] = {}
    for s in stored_order:
        holders.setdefault(position[s], []).append(s)
    last = max([count] + list(holders))
    chosen: dict[int, int] = {}  # position -> stored seq of the row taken as genuine
    for p in range(1, last + 1):
        if p not in holders:
            continue
        cands = holders[p]
        if len(cands) == 1:
            chosen[p] = cands[0]
            continue
        referenced = {by_seq[s]["prev_hash"] for s in holders.get(p + 1, [])}
        if head and p == count:
            referenced.add(head[1])
        genuine = next((s for s in cands if by_seq[s]["hash"] in referenced),
                       next((s for s in cands if s == p), cands[0]))
        chosen[p] = genuine
        for s in cands:
            if s != genuine:
                add(s, "inserted", f"row stored as seq {s} claims chain position {p}, which another row holds: "
                                   "it was inserted")
    hashes = {by_seq[s]["hash"]: p for p, s in chosen.items()}
    for p in range(1, last + 1):
        if p not in chosen:
            if head and p > count:
                continue
            why = "the tail was truncated" if not any(q > p for q in chosen) else "it was deleted"
            add(p, "deleted", f"row {p} is missing (the chain head records {count} rows): {why}")
            continue
        s = chosen[p]
        if p > 1 and p - 1 not in chosen:
            continue  # explained by the deletion reported above
        expected = GENESIS_HASH if p == 1 else by_seq[chosen[p - 1]]["hash"]
        prev = by_seq[s]["prev_hash"]
        if prev == expected or s in edited:
            continue
        two_back = GENESIS_HASH if p == 2 else (by_seq[chosen[p - 2]]["hash"] if p - 2 in chosen else None)
        if p >= 2 and prev == two_back:
            q = chosen[p - 1]
            add(q, "inserted", f"row {q} does not belong to the chain: row {p}'s prev_hash skips it and points "
                               f"to row {p - 2}")
        elif prev in hashes:
            add(s, "reordered", f"row {s}'s prev_hash points to row {hashes[prev]}, not to the row before it")
        elif p >= 2:
            q = chosen[p - 1]
            add(q, "edited", f"row {q} was rewritten and its hash recomputed: row {p}'s prev_hash no longer "
                             f"matches it (or rows between them were removed and the rest renumbered)")
        else:
            add(s, "edited", f"row {s} is the first row but its prev_hash is not the genesis hash")
    # 4. The head record: rows past its count were added outside the ledger; its hash must be the last row's.
    if head is None:
        add(0, "deleted", "the chain head record (row count and last hash) is missing: truncation of the tail "
                          "cannot be ruled out")
    else:
        for p in sorted(holders):
            if p > count:
                for s in holders[p]:
                    add(s, "inserted", f"row stored as seq {s} lies beyond the {count} rows the chain head "
                                       "records: it was added outside the ledger")
        if count == 0 and head[1] != GENESIS_HASH:
            add(0, "edited", "the chain head records no rows but a non-genesis hash")
        elif count in chosen and by_seq[chosen[count]]["hash"] != head[1]:
            q = chosen[count]
            add(q, "edited", f"row {q}'s hash does not match the chain head's last hash: it was rewritten "
                             "(or the head record was)")
    return sorted(found.values(), key=lambda pr: (pr.seq, PROBLEM_KINDS.index(pr.kind)))


def verify_chain(path: Path) -> list[ChainProblem]:
    """Every break in every hash chain of a ledger file (site or server); an empty list when intact.

    Detected and named: a row edited in place (its hash no longer matches), a row rewritten with a recomputed hash
    (the next row's prev_hash or the head no longer matches), a row deleted (with or without renumbering the
    rest), the tail truncated (the head's count is larger), a row inserted or appended outside the ledger, and
    rows moved to other positions.
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"ledger {path} does not exist")
    with _open(path, read_only=True) as conn:
        return _verify_conn(conn, path)


def _verify_conn(conn: sqlite3.Connection, path: Path) -> list[ChainProblem]:
    schema = _read_schema(conn, path)
    saved = conn.row_factory
    conn.row_factory = sqlite3.Row
    try:
        try:
            heads = {r["chain"]: (r["count"], r["head_hash"]) for r in conn.execute("SELECT * FROM chain_heads")}
        except sqlite3.Error:
            heads = {}
        problems: list[ChainProblem] = []
        for table, columns in _SCHEMAS[schema].items():
            try:
                rows = [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY seq")]
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot read table {table} of {path}: {exc}") from exc
            problems.extend(_verify_table(table, columns, rows, heads.get(table)))
        return problems
    finally:
        conn.row_factory = saved


# ----------------------------------------------------------------------------------------------------------------
# Ledgers


class _ChainedLedger:
    SCHEMA = ""

    def __init__(self, path: Path, *, verify: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists() and self.path.stat().st_size > 0
        with _open(self.path, read_only=False) as conn:
            try:
                self._create(conn, existed)
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot initialise ledger {self.path}: {exc}") from exc
        if existed and verify:
            problems = verify_chain(self.path)
            if problems:
                raise LedgerIntegrityError(self.path, problems)

    def _create(self, conn: sqlite3.Connection, existed: bool) -> None:
        if existed:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables:  # an existing ledger: it must be ours and of this kind
                schema = _read_schema(conn, self.path)
                if schema != self.SCHEMA:
                    raise LedgerError(f"{self.path} is a {schema}, not a {self.SCHEMA}")
                return
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS chain_heads (chain TEXT PRIMARY KEY, "
                         "count INTEGER NOT NULL, head_hash TEXT NOT NULL)")
            for table, columns in _SCHEMAS[self.SCHEMA].items():
                cols = ", ".join(f"{name} {sql}" for name, sql in columns)
                conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (seq INTEGER PRIMARY KEY, {cols}, "
                             "prev_hash TEXT NOT NULL, hash TEXT NOT NULL)")
                conn.execute("INSERT OR IGNORE INTO chain_heads VALUES (?, 0, ?)", (table, GENESIS_HASH))
            for stmt in _INDEXES[self.SCHEMA]:
                conn.execute(stmt)
            for key, value in (("schema", self.SCHEMA), ("version", SCHEMA_VERSION), ("created_at", utc_now())):
                conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        schema = _read_schema(conn, self.path)
        if schema != self.SCHEMA:
            raise LedgerError(f"{self.path} is a {schema}, not a {self.SCHEMA}")

    def _append(self, table: str, values: dict[str, Any]) -> int:
        """Insert one row at the end of ``table``'s chain; committed (fsynced) before returning its seq."""
        columns = _SCHEMAS[self.SCHEMA][table]
        names = [name for name, _ in columns]
        with _open(self.path, read_only=False) as conn:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock before reading the head: appends serialise
            try:
                count, head = conn.execute("SELECT count, head_hash FROM chain_heads WHERE chain=?",
                                           (table,)).fetchone()
                n_rows, max_seq = conn.execute(f"SELECT count(*), coalesce(max(seq), 0) FROM {table}").fetchone()
                last = conn.execute(f"SELECT hash FROM {table} WHERE seq=?", (max_seq,)).fetchone()
                if n_rows != count or max_seq != count or (last[0] if last else GENESIS_HASH) != head:
                    raise LedgerIntegrityError(self.path, _verify_conn(conn, self.path))
                seq = count + 1
                digest = row_hash(table, seq, {n: values[n] for n in names}, _real_columns(columns), head)
                conn.execute(
                    f"INSERT INTO {table} (seq, {', '.join(names)}, prev_hash, hash) "
                    f"VALUES ({', '.join('?' * (len(names) + 3))})",
                    [seq, *(values[n] for n in names), head, digest],
                )
                conn.execute("UPDATE chain_heads SET count=?, head_hash=? WHERE chain=?", (seq, digest, table))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return seq

    def verify(self) -> list[ChainProblem]:
        return verify_chain(self.path)

    def _select(self, table: str, where: str = "", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with _open(self.path, read_only=False) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(f"SELECT * FROM {table} {where} ORDER BY seq", params)]


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
        rows = (self._select("spend") if dataset_fingerprint is None
                else self._select("spend", "WHERE dataset_fingerprint=?", (dataset_fingerprint,)))
        out = []
        for r in rows:
            try:
                entry = SpendEntry(**{n: r[n] for n in _SPEND_FIELDS})
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

    def last_round(self, run_id: str) -> int | None:
        with _open(self.path, read_only=False) as conn:
            row = conn.execute("SELECT max(round) FROM spend WHERE run_id=?", (run_id,)).fetchone()
        return row[0]

    def projected(self, run_id: str, dataset_fingerprint: str, new: Mechanism, delta: float,
                  accountant: str = DEFAULT_ACCOUNTANT) -> tuple[float, float]:
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
        return self._append("runs", {"run_id": run_id, "config": text, "aggregation": aggregation,
                                     "recorded_at": utc_now()})

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
    ) -> int:
        """Record what a client reported for a round. ``status`` 'trained' needs every mechanism field and
        ``epsilon_reported``; record 'dropped' for every sampled client whose reply never arrived, so the audit can
        tell a lost reply from an unreported spend."""
        report = ClientReport(
            run_id=run_id, round=round, client_id=client_id, node_id=node_id, status=status, reason=reason,
            dataset_fingerprint=dataset_fingerprint, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
            steps=steps, max_grad_norm=max_grad_norm, delta=delta, accountant=accountant,
            epsilon_reported=epsilon_reported, epsilon_dataset_reported=epsilon_dataset_reported,
            recorded_at=recorded_at or utc_now(),
        )
        return self._append("reports", asdict(report))

    def runs(self) -> list[RunRecord]:
        return [RunRecord(seq=r["seq"], run_id=r["run_id"], config=json.loads(r["config"]),
                          aggregation=r["aggregation"], recorded_at=r["recorded_at"], prev_hash=r["prev_hash"],
                          hash=r["hash"]) for r in self._select("runs")]

    def reports(self, run_id: str | None = None) -> list[ReportRecord]:
        rows = self._select("reports") if run_id is None else self._select("reports", "WHERE run_id=?", (run_id,))
        out = []
        for r in rows:
            try:
                report = ClientReport(**{n: r[n] for n in _REPORT_FIELDS})
            except LedgerError as exc:
                raise LedgerError(f"{self.path}: report row {r['seq']} is invalid: {exc}") from exc
            out.append(ReportRecord(seq=r["seq"], report=report, prev_hash=r["prev_hash"], hash=r["hash"]))
        return out
