"""Migration of a version 1 ledger to the current version, rows and hashes kept.

Separate from storage because it is a one-off offline step (``privatune site migrate-ledger``, site stopped), not
something a running writer does; it builds the new file with the writer's own row insertion.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from privatune.common.ledger.connection import _connect, _fsync_dir, create_file, read_meta, remove_leftovers, temp_path
from privatune.common.ledger.errors import LedgerError, LedgerIntegrityError
from privatune.common.ledger.records import utc_now
from privatune.common.ledger.schema import (
    _SCHEMAS,
    GENESIS_HASH,
    HEADS_TABLE,
    META_REQUIRED,
    META_TABLE,
    MIGRATING,
    SCHEMA_VERSION,
    chained_tables_of,
    schema_ddl,
)
from privatune.common.ledger.storage import _insert_row, _insert_sql, _start_chain
from privatune.common.ledger.verify import inspect_ledger, verify_chain


def migrate_ledger(path: Path) -> Path:
    """Rewrite a version 1 ledger as the current version, keeping every row with its seq and hash (the chains
    carry over unchanged; the meta table becomes a chain of its own). Returns where the original is kept.

    Run it with the site stopped. The original must verify; it is copied aside (``<name>.v1-<time>.bak``) under an
    exclusive lock, the new file is built under a temporary name and verified, the original is marked as being
    migrated (so a writer that still had it open fails instead of writing to a file about to be replaced), and the
    new file is renamed over it."""
    path = Path(path)
    found = inspect_ledger(path)
    if found.schema is None or found.problems:
        raise LedgerIntegrityError(path, found.problems)
    if found.version != "1":
        raise LedgerError(f"{path} is a version {found.version} ledger: nothing to migrate")
    schema = found.schema
    conn = _connect(path, read_only=False)  # leaving WAL checkpoints the log into the main file
    tmp = temp_path(path)
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
        new = create_file(tmp)
        try:
            new.execute("BEGIN IMMEDIATE")
            for stmt in schema_ddl(schema):
                new.execute(stmt)
            _start_chain(new, META_TABLE)
            items = {**meta, "version": SCHEMA_VERSION, "migrated_from": "1", "migrated_at": utc_now()}
            for key in (*META_REQUIRED, *sorted(k for k in items if k not in META_REQUIRED)):
                _insert_row(new, tmp, schema, META_TABLE, {"key": key, "value": str(items[key])})
            for table, rows in tables.items():
                names = [n for n, _ in _SCHEMAS[schema][table]]
                for r in rows:  # verbatim: same seq, fields, prev_hash and hash
                    new.execute(
                        _insert_sql(table, names), [r["seq"], *(r.get(n) for n in names), r["prev_hash"], r["hash"]]
                    )
                _start_chain(new, table, *heads.get(table, (0, GENESIS_HASH)))
            for table in _SCHEMAS[schema]:  # tables a version 1 file did not have start empty
                if table != META_TABLE and table not in tables:
                    _start_chain(new, table)
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
        remove_leftovers(tmp)
