"""Ledger file names: the one source for what a ledger file is called and what SQLite leaves beside it.

Site ledgers are ``site-<site_id>.ledger.sqlite``, the server ledger ``server.ledger.sqlite``; ``privatune audit``
searches folders for ``LEDGER_GLOB``. Files are told apart by the schema recorded inside them, not by name: these
names are conventions for writers and for finding files, never a check.
"""

from __future__ import annotations

import re
from pathlib import Path

from privatune.common.ledger.errors import LedgerError

LEDGER_SUFFIX = ".ledger.sqlite"
LEDGER_GLOB = "*" + LEDGER_SUFFIX
SITE_LEDGER_PREFIX = "site-"
SERVER_LEDGER_NAME = "server" + LEDGER_SUFFIX
#: What SQLite may keep beside a database file: its rollback journal, and a WAL file and its index.
#: The private-selection records kept beside a site ledger (common/ledger/selections.py).
SELECTION_SUFFIX = ".selections.sqlite"
SQLITE_SIDE_SUFFIXES = ("-journal", "-wal", "-shm")
JOURNAL_SUFFIX = SQLITE_SIDE_SUFFIXES[0]


def site_ledger_filename(site_id: str) -> str:
    """``site-<site_id>.ledger.sqlite`` with characters unsafe in file names replaced by ``_``."""
    if not isinstance(site_id, str) or not site_id:
        raise LedgerError(f"site_id must be a non-empty string, got {site_id!r}")
    return f"{SITE_LEDGER_PREFIX}{re.sub(r'[^A-Za-z0-9._-]', '_', site_id)}{LEDGER_SUFFIX}"


def site_id_from_ledger_name(name: str) -> str | None:
    """The site id a file name ``site-<site_id>.ledger.sqlite`` carries (None: not named as a site ledger)."""
    if name.startswith(SITE_LEDGER_PREFIX) and name.endswith(LEDGER_SUFFIX):
        return name[len(SITE_LEDGER_PREFIX) : -len(LEDGER_SUFFIX)]
    return None


def selection_ledger_path(site_ledger: Path) -> Path:
    """Where the private-selection records of the site ledger at ``site_ledger`` are kept: beside it,
    ``site-<id>.selections.sqlite`` (any other name: its stem, then ``.selections.sqlite``)."""
    name = site_ledger.name
    stem = name[: -len(LEDGER_SUFFIX)] if name.endswith(LEDGER_SUFFIX) else Path(name).stem
    return site_ledger.with_name(stem + SELECTION_SUFFIX)
