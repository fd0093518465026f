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
updated in the same transaction as the row, exposes truncation of the tail. ``verify_chain`` (``verify``) checks
the file's structure against the declared schema, SQLite's own integrity check, every row's types, every chain
link and head, and names the row that was edited, deleted, inserted, moved or is malformed; it reports and
never raises on a damaged file. There is no secret key: someone who rewrites a whole suffix of the chain and its
head consistently is not caught by the chain alone; that is what the audit's cross-check against the other
party's ledger is for.

An existing ledger file is never re-created: an empty, truncated, corrupt or foreign file at a ledger path is
refused with a LedgerError that says how to recover. Only a missing path creates a ledger, built under a temporary
name in the same folder and linked into place, owner-only (0600) like its journal.

File naming (what ``privatune audit`` searches folders for): site ledgers ``site-<site_id>.ledger.sqlite``, the
server ledger ``server.ledger.sqlite``. Files are told apart by the schema recorded inside them, not by name.

The modules: ``errors`` (LedgerError family, ChainProblem), ``names`` (file names), ``records`` (the row values
and their validation), ``schema`` (tables, DDL, hashing), ``connection`` (SQLite plumbing), ``storage``
(SiteLedger, ServerLedger), ``verify`` with ``chain`` and ``findings`` (verification in passes), ``migrate``
(version 1 files), ``selections`` (a site's private-selection records, in a chained file beside its ledger),
``totals`` (what a site ledger adds up to, per dataset and for the site: the audit's and the
budget's one computation). This package re-exports what callers use.
"""

from __future__ import annotations

from privatune.common.ledger.connection import (
    ledger_schema,
    lenient_text,
    read_meta,
    read_rows,
)
from privatune.common.ledger.errors import (
    PROBLEM_KINDS,
    ChainProblem,
    LedgerError,
    LedgerIntegrityError,
    LedgerVersionError,
    recovery_advice,
)
from privatune.common.ledger.migrate import (
    migrate_ledger,
)
from privatune.common.ledger.names import (
    LEDGER_GLOB,
    LEDGER_SUFFIX,
    SELECTION_SUFFIX,
    SERVER_LEDGER_NAME,
    SITE_LEDGER_PREFIX,
    SQLITE_SIDE_SUFFIXES,
    selection_ledger_path,
    site_id_from_ledger_name,
    site_ledger_filename,
)
from privatune.common.ledger.records import (
    PURPOSE_METRICS,
    PURPOSE_PERSONALISE,
    PURPOSE_TRAIN,
    PURPOSES,
    STATUS_BUDGET_EXHAUSTED,
    STATUS_DROPPED,
    STATUS_TRAINED,
    STATUSES,
    ClientReport,
    ReportRecord,
    RunRecord,
    SpendEntry,
    SpendRecord,
    utc_now,
)
from privatune.common.ledger.schema import (
    GENESIS_HASH,
    HEADS_TABLE,
    META_REQUIRED,
    META_TABLE,
    MIGRATING,
    SCHEMA_VERSION,
    SELECTION_SCHEMA,
    SERVER_SCHEMA,
    SITE_SCHEMA,
    chained_tables,
    chained_tables_of,
    hashed_fields,
    row_hash,
    schema_ddl,
)
from privatune.common.ledger.selections import SelectionLedger, SelectionRecord
from privatune.common.ledger.storage import (
    ServerLedger,
    SiteLedger,
)
from privatune.common.ledger.totals import (
    DatasetTotal,
    LedgerSpend,
    SiteTotal,
    compose_dataset,
    dataset_totals,
    ledger_spend,
    site_total,
)
from privatune.common.ledger.verify import (
    READABLE_VERSIONS,
    Inspection,
    inspect_ledger,
    verify_chain,
    verify_ledger,
)

__all__ = [
    "GENESIS_HASH",
    "HEADS_TABLE",
    "LEDGER_GLOB",
    "LEDGER_SUFFIX",
    "META_REQUIRED",
    "META_TABLE",
    "MIGRATING",
    "PROBLEM_KINDS",
    "PURPOSES",
    "PURPOSE_METRICS",
    "PURPOSE_PERSONALISE",
    "PURPOSE_TRAIN",
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "SELECTION_SCHEMA",
    "SELECTION_SUFFIX",
    "SERVER_LEDGER_NAME",
    "SERVER_SCHEMA",
    "SITE_LEDGER_PREFIX",
    "SITE_SCHEMA",
    "SQLITE_SIDE_SUFFIXES",
    "STATUSES",
    "STATUS_BUDGET_EXHAUSTED",
    "STATUS_DROPPED",
    "STATUS_TRAINED",
    "ChainProblem",
    "ClientReport",
    "DatasetTotal",
    "Inspection",
    "LedgerError",
    "LedgerIntegrityError",
    "LedgerSpend",
    "LedgerVersionError",
    "ReportRecord",
    "RunRecord",
    "SelectionLedger",
    "SelectionRecord",
    "ServerLedger",
    "SiteLedger",
    "SiteTotal",
    "SpendEntry",
    "SpendRecord",
    "chained_tables",
    "chained_tables_of",
    "compose_dataset",
    "dataset_totals",
    "hashed_fields",
    "inspect_ledger",
    "ledger_schema",
    "ledger_spend",
    "lenient_text",
    "migrate_ledger",
    "read_meta",
    "read_rows",
    "recovery_advice",
    "row_hash",
    "schema_ddl",
    "selection_ledger_path",
    "site_id_from_ledger_name",
    "site_ledger_filename",
    "site_total",
    "utc_now",
    "verify_chain",
    "verify_ledger",
]
