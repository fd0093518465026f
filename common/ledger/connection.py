"""SQLite plumbing for ledger files: opening a connection with the ledger's durability settings, reading the meta
table and a file's schema, raw rows, and the file-system steps of making a new file (owner-only temporary files,
directory fsync).

Separate from the ledgers themselves because the verifier and the migration open files the same way the writers
do, and must not depend on the writers.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from privatune.common.ledger.errors import LedgerError, LedgerVersionError
from privatune.common.ledger.names import JOURNAL_SUFFIX
from privatune.common.ledger.schema import (
    _ADDED_COLUMNS,
    _ADDED_TABLES,
    _SCHEMAS,
    META_TABLE,
    MIGRATING,
    SCHEMA_VERSION,
)

_BUSY_TIMEOUT_S = 30.0

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


# ----------------------------------------------------------------------------------------------------------------
# New files


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` to build a ledger file under before it is moved into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.creating")


def create_file(tmp: Path) -> sqlite3.Connection:
    """A writable connection to a new database at ``tmp``, owner-only: the file and its journal are 0600 from
    their first byte."""
    old_umask = os.umask(0o077)
    try:
        return _connect(tmp, read_only=False, create=True)
    finally:
        os.umask(old_umask)


def remove_leftovers(tmp: Path) -> None:
    """Remove a temporary ledger file and its journal, whichever of them exist."""
    for leftover in (tmp, tmp.with_name(tmp.name + JOURNAL_SUFFIX)):
        with suppress(FileNotFoundError):
            leftover.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the file itself was fsynced before the rename
    finally:
        os.close(fd)
