"""The ledgers: SiteLedger (a site's privacy spends) and ServerLedger (the coordinator's runs and client reports),
each an append-only set of hash chains in one SQLite file.

A ledger is opened, or created when (and only when) nothing is at its path; each append extends its table's chain
and is in the main file, fsynced, before it returns. Layout and hashing live in ``schema``, file plumbing in
``connection``, checking a file in ``verify``: this module is what a writer holds.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, cast

from privatune.common.accounting import Mechanism, compose, epsilon_of
from privatune.common.ledger.connection import (
    _fsync_dir,
    _open,
    create_file,
    ledger_schema,
    remove_leftovers,
    temp_path,
)
from privatune.common.ledger.errors import (
    ChainProblem,
    LedgerError,
    LedgerIntegrityError,
    LedgerVersionError,
    recovery_advice,
)
from privatune.common.ledger.records import (
    ClientReport,
    ReportRecord,
    RunRecord,
    SpendEntry,
    SpendRecord,
    _bad,
    _text,
    utc_now,
)
from privatune.common.ledger.schema import (
    _ADDED_COLUMNS,
    _SCHEMAS,
    GENESIS_HASH,
    HEADS_TABLE,
    META_TABLE,
    SCHEMA_VERSION,
    SERVER_SCHEMA,
    SITE_SCHEMA,
    _real_columns,
    chained_tables_of,
    hashed_fields,
    row_hash,
    schema_ddl,
)
from privatune.common.ledger.totals import DatasetTotal, SiteTotal, dataset_totals, ledger_spend, site_total
from privatune.common.ledger.verify import verify_chain
from privatune.common.mechanism import DPMechanism
from privatune.common.record_budget import cohort_id_of, pack_ids, unpack_ids

# ----------------------------------------------------------------------------------------------------------------
# Writing a row


def _insert_sql(table: str, names: Sequence[str]) -> str:
    """The INSERT of one whole row of a chained table: seq, its data columns ``names``, prev_hash and hash."""
    return (
        f"INSERT INTO {table} (seq, {', '.join(names)}, prev_hash, hash) VALUES ({', '.join('?' * (len(names) + 3))})"
    )


def _start_chain(conn: sqlite3.Connection, table: str, count: int = 0, head: str = GENESIS_HASH) -> None:
    """The head record of ``table``'s chain: ``count`` rows, the last one's hash ``head`` (new: none, genesis)."""
    conn.execute(f"INSERT INTO {HEADS_TABLE} VALUES (?, ?, ?)", (table, count, head))


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
    conn.execute(_insert_sql(table, names), [seq, *(values[n] for n in names), head, digest])
    conn.execute(f"UPDATE {HEADS_TABLE} SET count=?, head_hash=? WHERE chain=?", (seq, digest, table))
    return seq


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
            with suppress(OSError):  # ledgers written by an older privatune were world-readable
                os.chmod(path, 0o600)

    # -- a new file --------------------------------------------------------------------------------------------

    def _create_new(self) -> bool:
        """Build the empty ledger under a temporary name in the same folder, then link it into place, so a crash
        mid-create leaves no half ledger at the real path. False when another process created it first."""
        tmp = temp_path(self.path)
        try:
            conn = create_file(tmp)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for stmt in schema_ddl(self.SCHEMA):
                    conn.execute(stmt)
                for table in _SCHEMAS[self.SCHEMA]:
                    _start_chain(conn, table)
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
            remove_leftovers(tmp)

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


def _mechanisms(rows: Sequence[dict[str, Any]]) -> list[Mechanism]:
    """The accountants' (sigma, q, steps) of spend rows, in their order."""
    return [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in rows]


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
                stored: dict[str, Any] = {
                    n: r.get(n) for n in _SPEND_FIELDS if r.get(n) is not None or n not in _ADDED_COLUMNS["spend"]
                }
                entry = SpendEntry(**stored)
            except LedgerError as exc:
                raise LedgerError(f"{self.path}: row {r['seq']} is invalid: {exc}") from exc
            out.append(SpendRecord(seq=r["seq"], entry=entry, prev_hash=r["prev_hash"], hash=r["hash"]))
        return out

    def history(self, dataset_fingerprint: str) -> list[Mechanism]:
        """Every mechanism ever applied to this dataset (all runs, in order): what its budget composes over."""
        return _mechanisms(self._select("spend", "WHERE dataset_fingerprint=?", (dataset_fingerprint,)))

    def run_history(self, run_id: str, dataset_fingerprint: str) -> list[Mechanism]:
        return _mechanisms(
            self._select("spend", "WHERE run_id=? AND dataset_fingerprint=?", (run_id, dataset_fingerprint))
        )

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

    def totals(
        self, *, delta: float | None = None, accountant: str | None = None
    ) -> tuple[list[DatasetTotal], SiteTotal]:
        """Each dataset's privacy total and the site's, from every recorded spend (``common/ledger/totals.py``: the
        worst record's composition, what the audit shows); by default at each one's latest spend's delta and
        accountant."""
        spends = [ledger_spend(r.entry) for r in self.entries()]
        cohorts = self.cohorts()
        return (
            dataset_totals(spends, cohorts, delta=delta, accountant=accountant),
            site_total(spends, cohorts, delta=delta, accountant=accountant),
        )

    def last_round(self, run_id: str) -> int | None:
        with _open(self.path, read_only=False) as conn:
            row = conn.execute("SELECT max(round) FROM spend WHERE run_id=?", (run_id,)).fetchone()
        return row[0]

    def projected(self, run_id: str, dataset_fingerprint: str, new: DPMechanism) -> tuple[float, float]:
        """(epsilon_run, epsilon_dataset) this site would reach if it applied ``new`` now (at its delta, with its
        accountant): the budget check to make before training, and the values to record in the SpendEntry."""
        delta, accountant = new.delta, new.accountant
        run = epsilon_of(compose(self.run_history(run_id, dataset_fingerprint), new.gaussian), delta, accountant)
        data = epsilon_of(compose(self.history(dataset_fingerprint), new.gaussian), delta, accountant)
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
        mechanism: DPMechanism | None = None,
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
        tell a lost reply from an unreported spend. A whole mechanism comes as ``mechanism``; the loose fields are
        for the part of one a dropped reply held, and must stay None when ``mechanism`` is given."""
        if mechanism is not None:
            loose = (noise_multiplier, sample_rate, steps, max_grad_norm, delta, accountant)
            if any(value is not None for value in loose):
                raise LedgerError("record_report: give the mechanism either whole or as fields, not both")
            noise_multiplier, sample_rate, steps = mechanism.gaussian
            max_grad_norm, delta, accountant = mechanism.max_grad_norm, mechanism.delta, mechanism.accountant
        report = ClientReport(
            run_id=run_id,
            round=round,
            client_id=client_id,
            node_id=cast(str, node_id),  # ClientReport checks an int or str node id and stores it as text
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
                stored: dict[str, Any] = {n: r.get(n) for n in _REPORT_FIELDS}
                report = ClientReport(**stored)
            except LedgerError as exc:
                raise LedgerError(f"{self.path}: report row {r['seq']} is invalid: {exc}") from exc
            out.append(ReportRecord(seq=r["seq"], report=report, prev_hash=r["prev_hash"], hash=r["hash"]))
        return out
