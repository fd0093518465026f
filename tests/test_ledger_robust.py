"""Ledgers under faults: a damaged file is refused, never re-created; a lost journal loses no acknowledged spend;
the verifier reports every malformation and never raises; the audit goes on past a bad ledger; files are 0600."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import privatune.common.ledger as ledger_mod
import privatune.common.ledger.schema as schema_mod
import privatune.common.ledger.storage as storage_mod
from privatune.common.ledger import (
    LedgerError,
    LedgerIntegrityError,
    ServerLedger,
    SiteLedger,
    site_ledger_filename,
    verify_chain,
)
from privatune.common.ledger.verify import _expected_master
from privatune.simulations.ledger_campaign import (
    build_server_ledger,
    build_site_ledger,
    flip_campaign,
    lost_journal_campaign,
    run_campaign,
    spend,
    truncation_campaign,
)

ROOT = Path(__file__).resolve().parents[1]


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in statements:
        conn.execute(stmt)
    conn.close()


def side_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(("-wal", "-shm", "-journal", ".creating")))


# ---------------------------------------------------------------------------------------- never re-created


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "foreign sqlite"])
def test_a_damaged_ledger_is_refused_and_left_untouched(tmp_path: Path, damage: str) -> None:
    path = build_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=8)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: 4096 * 3])
    elif damage == "garbage":
        path.write_bytes(os.urandom(8192))
    else:
        path.unlink()
        sql(path, "CREATE TABLE notes (x TEXT)", "INSERT INTO notes VALUES ('mine')")
    before = path.read_bytes()
    with pytest.raises(LedgerError) as info:
        SiteLedger(path)
    message = str(info.value)
    assert "site-s1.ledger.sqlite" in message and "backup" in message and "privatune audit" in message
    assert path.read_bytes() == before  # not re-created, not "repaired"
    assert side_files(tmp_path) == []
    assert verify_chain(path) != []  # and the verifier says so too, without raising


def test_only_a_missing_path_creates_a_ledger_and_a_crash_mid_create_leaves_none(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "deep" / site_ledger_filename("s1")

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt("killed between building the ledger and linking it into place")

    monkeypatch.setattr(storage_mod.os, "link", crash)
    with pytest.raises(KeyboardInterrupt):
        SiteLedger(path)
    assert not path.exists() and list(path.parent.iterdir()) == []  # no half ledger at the real path
    monkeypatch.undo()
    SiteLedger(path).append(spend("run-a", 1, 0.5))
    assert verify_chain(path) == [] and list(path.parent.iterdir()) == [path]


def test_concurrent_creators_end_with_one_ledger(tmp_path: Path) -> None:
    path = tmp_path / "site-s1.ledger.sqlite"
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda _: SiteLedger(path), range(4)))
    SiteLedger(path).append(spend("run-a", 1, 0.5))
    assert verify_chain(path) == [] and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_site_refuses_to_train_on_an_empty_ledger(tmp_path: Path, message_factory, context_factory) -> None:
    from privatune.client.app import train
    from tests.helpers.messages import digits_config, initial_state

    cfg = digits_config(tmp_path, num_server_rounds=2)
    ledger = tmp_path / "ledgers" / "site-client-0.ledger.sqlite"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"")
    reply = train(message_factory(cfg, initial_state(cfg)), context_factory({"partition-id": 0, "num-partitions": 3}))
    status = reply.content["status"]
    assert status["status"] == "refused"
    assert "site-client-0.ledger.sqlite" in status["reason"]
    assert str(ledger.parent) not in status["reason"]  # the file's name, not where the site keeps it
    assert "arrays" not in reply.content
    assert ledger.read_bytes() == b""


def test_site_check_reports_an_empty_ledger(tmp_path: Path) -> None:
    from privatune.client.site_check import check_site

    data = tmp_path / "sms.csv"
    data.write_text("text,label\n" + "".join(f"message {i},{'spam' if i % 5 == 0 else 'ham'}\n" for i in range(200)))
    ledger = tmp_path / "l.ledger.sqlite"
    ledger.write_bytes(b"")
    rep = check_site({"site-id": "a", "data-path": str(data), "ledger-path": str(ledger)}, {"preset": "sms-spam"})
    (check,) = [c for c in rep.checks if c.name == "ledger"]
    assert not rep.ok and not check.ok and "empty (0 bytes)" in check.detail
    assert not any(c.name == "budget" for c in rep.checks)  # no "spent 0.000": the budget is unknown
    assert ledger.read_bytes() == b""


# ---------------------------------------------------------------------------------------- durability


def test_deleting_journal_files_under_an_open_writer_loses_no_acknowledged_spend(tmp_path: Path) -> None:
    path = tmp_path / "site-s1.ledger.sqlite"
    ledger = SiteLedger(path)
    holder = sqlite3.connect(path)  # another process's connection, open throughout
    holder.execute("SELECT count(*) FROM spend").fetchone()
    for i in range(1, 21):
        ledger.append(spend("run-a", i, 0.5 * i))
    for suffix in ("-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    holder.close()
    assert [r.entry.round for r in SiteLedger(path).entries()] == list(range(1, 21))
    assert verify_chain(path) == []
    assert lost_journal_campaign(3, tmp_path, seed=1).data_lost == 0


def test_a_killed_writer_whose_side_files_are_deleted_keeps_its_spends(tmp_path: Path) -> None:
    path = tmp_path / "site-s1.ledger.sqlite"
    script = textwrap.dedent(f"""
        import os, sys, sqlite3
        sys.path.insert(0, {str(ROOT)!r})
        from privatune.common.ledger import SiteLedger
        from privatune.simulations.ledger_campaign import spend
        ledger = SiteLedger({str(path)!r})
        keep = sqlite3.connect({str(path)!r}); keep.execute("SELECT 1 FROM spend").fetchall()
        for i in range(1, 11):
            ledger.append(spend("run-a", i, 0.5 * i))
        os._exit(9)   # no close, no cleanup
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    for suffix in ("-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    assert len(SiteLedger(path).entries()) == 10


def test_a_ledger_switched_to_wal_is_switched_back_on_write(tmp_path: Path) -> None:
    path = build_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=2)
    sql(path, "PRAGMA journal_mode=WAL")
    SiteLedger(path).append(spend("run-c", 1, 5.0))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    assert verify_chain(path) == [] and side_files(tmp_path) == []


@pytest.mark.parametrize("per_process", [60, pytest.param(300, marks=pytest.mark.slow)])
def test_interleaved_appends_from_two_processes(tmp_path: Path, per_process: int) -> None:
    """Two writers on one file (600 appends in the slow run): every commit serialises, the chain never forks."""
    path = tmp_path / "site-s1.ledger.sqlite"
    SiteLedger(path)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from privatune.common.ledger import SiteLedger
        from privatune.simulations.ledger_campaign import spend
        import time
        from pathlib import Path
        ledger = SiteLedger({str(path)!r}, verify=False)
        folder = Path({str(tmp_path)!r})
        (folder / ("ready-" + sys.argv[1])).touch()
        deadline = time.monotonic() + 60
        while len(list(folder.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)  # start together, so the appends overlap
        for i in range(1, int(sys.argv[2]) + 1):
            ledger.append(spend("run-" + sys.argv[1], i, 0.01 * i))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, name, str(per_process)], stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    records = SiteLedger(path).entries()
    assert [r.seq for r in records] == list(range(1, 2 * per_process + 1))
    runs = [r.entry.run_id for r in records]
    assert runs.count("run-a") == runs.count("run-b") == per_process
    assert verify_chain(path) == []


# ---------------------------------------------------------------------------------------- tamper evidence


def test_the_meta_table_is_chained(tmp_path: Path) -> None:
    path = build_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=3)
    sql(path, "UPDATE meta SET value = '2020-01-01T00:00:00+00:00' WHERE key = 'created_at'")
    assert {(p.table, p.seq, p.kind) for p in verify_chain(path)} == {("meta", 3, "edited")}


def test_schema_changes_are_reported_not_raised(tmp_path: Path) -> None:
    path = build_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=3)
    sql(path, "CREATE TABLE extra (x)")
    assert [(p.table, p.kind) for p in verify_chain(path)] == [("extra", "malformed")]
    sql(path, "DROP TABLE extra", "DROP TABLE spend")
    problems = verify_chain(path)
    assert ("spend", None, "malformed") in {(p.table, p.seq, p.kind) for p in problems}
    assert any("spend is missing" in p.detail for p in problems)


@pytest.mark.parametrize(
    "value, what", [("X'00ff'", "bytes"), ("CAST(X'ff80' AS TEXT)", "not valid UTF-8"), ("'twenty'", "str")]
)
def test_a_wrongly_typed_value_is_a_malformed_row(tmp_path: Path, value: str, what: str) -> None:
    path = build_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=4)
    column = "run_id" if "UTF-8" in what else "steps"
    sql(path, f"UPDATE spend SET {column} = {value} WHERE seq = 2")
    problems = verify_chain(path)
    assert [(p.table, p.seq, p.kind) for p in problems] == [("spend", 2, "malformed")]
    assert what in problems[0].detail and column in problems[0].detail
    with pytest.raises(LedgerIntegrityError, match="spend row 2: malformed"):
        SiteLedger(path)


def test_a_renumbered_row_is_detected(tmp_path: Path) -> None:
    path = build_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=1)
    sql(path, "UPDATE spend SET seq = 5")
    assert {(p.seq, p.kind) for p in verify_chain(path)} == {(5, "reordered")}


def test_a_new_declared_table_is_chained_and_verified_with_no_verifier_code(tmp_path: Path, monkeypatch) -> None:
    """What adding a table (as record cohorts were) takes: its entry in _SCHEMAS, nothing in the verifier."""
    site = ledger_mod.SITE_SCHEMA
    tables = dict(schema_mod._SCHEMAS[site], extra=(("cohort", "TEXT NOT NULL"), ("records", "INTEGER NOT NULL")))
    monkeypatch.setitem(schema_mod._SCHEMAS, site, tables)
    _expected_master.cache_clear()
    try:
        ledger = SiteLedger(tmp_path / "site-s1.ledger.sqlite")
        for i in range(1, 4):
            ledger._append("extra", {"cohort": f"c{i}", "records": 10 * i})
        assert verify_chain(ledger.path) == []
        sql(ledger.path, "UPDATE extra SET records = 1 WHERE seq = 2")
        assert {(p.table, p.seq, p.kind) for p in verify_chain(ledger.path)} == {("extra", 2, "edited")}
        sql(ledger.path, "DELETE FROM extra WHERE seq = 3")
        assert ("extra", 3, "deleted") in {(p.table, p.seq, p.kind) for p in verify_chain(ledger.path)}
    finally:
        _expected_master.cache_clear()


# ---------------------------------------------------------------------------------------- fault campaigns


def _check_campaign(result) -> None:
    assert result.exceptions == 0, result.examples
    assert result.undetected == 0, result.examples
    assert result.data_lost == 0, result.examples


def test_bit_flip_campaign_fast(tmp_path: Path) -> None:
    """300 seeded single-bit flips: none crashes the verifier, none changes data undetected."""
    site = build_site_ledger(tmp_path / "site-s1.ledger.sqlite")
    server = build_server_ledger(tmp_path / "server.ledger.sqlite")
    results = [
        flip_campaign(site, 150, 11, tmp_path),
        flip_campaign(server, 150, 12, tmp_path),
        truncation_campaign(site, 10, 13, tmp_path),
    ]
    for result in results:
        _check_campaign(result)
    assert sum(r.cases for r in results) == 310
    assert all(r.detected > 0 for r in results) and results[0].benign > 0


@pytest.mark.slow
def test_bit_flip_campaign_full(tmp_path: Path) -> None:
    """The campaign of docs/security.md: 3,000 flips, 40 truncations, 10 lost-journal cases."""
    parts = run_campaign(flips=3000, seed=0, truncations=40, journal_cases=10, workdir=tmp_path)
    _check_campaign(parts["total"])
    assert parts["total"].cases == 3050 and parts["flips"].detected > 1000


# ---------------------------------------------------------------------------------------- audit


def test_a_folder_with_one_corrupt_ledger_audits_the_others(tmp_path: Path) -> None:
    build_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=4)
    build_site_ledger(tmp_path / "site-s2.ledger.sqlite", rows=4)
    bad = tmp_path / "site-s2.ledger.sqlite"
    data = bytearray(bad.read_bytes())
    data[16:18] = b"\x00\x03"  # page size 3: "file is not a database"
    bad.write_bytes(bytes(data))
    (tmp_path / "site-s3.ledger.sqlite").write_bytes(b"")
    from privatune.common.audit import audit_paths

    report = audit_paths([tmp_path])
    kinds = {Path(f.path).name: (f.kind, f.chain_ok) for f in report.files}
    assert kinds == {
        "site-s1.ledger.sqlite": ("site", True),
        "site-s2.ledger.sqlite": ("unknown", False),
        "site-s3.ledger.sqlite": ("unknown", False),
    }
    damage = [v for v in report.violations if v.kind == "unreadable" or v.kind.startswith("chain-")]
    assert {Path(v.file).name for v in damage} == {"site-s2.ledger.sqlite", "site-s3.ledger.sqlite"}
    assert len([e for e in report.entries if Path(e.file).name == "site-s1.ledger.sqlite"]) == 4

    from typer.testing import CliRunner

    from privatune.cli import app

    result = CliRunner().invoke(app, ["audit", str(tmp_path), "--report", str(tmp_path / "report")])
    assert result.exit_code == 1
    assert "site-s2.ledger.sqlite" in result.output and "Traceback" not in result.output


def test_audit_accounts_the_rows_of_a_ledger_with_one_malformed_row(tmp_path: Path) -> None:
    path = build_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=4)
    sql(path, "UPDATE spend SET noise_multiplier = X'00' WHERE seq = 3")
    from privatune.common.audit import audit_paths

    report = audit_paths([path])
    damage = [v for v in report.violations if v.kind == "unreadable" or v.kind.startswith("chain-")]
    assert [(v.kind, v.seq) for v in damage] == [("chain-malformed", 3)]
    assert sorted(e.seq for e in report.entries) == [1, 2, 4]


# ---------------------------------------------------------------------------------------- permissions


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ledger_and_journal_files_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a typical umask: without care the files would be 0644
    try:
        site = SiteLedger(tmp_path / "site-s1.ledger.sqlite")
        server = ServerLedger(tmp_path / "server.ledger.sqlite")
        assert _mode(site.path) == 0o600 and _mode(server.path) == 0o600
        conn = sqlite3.connect(site.path, isolation_level=None)  # a transaction in flight has a -journal
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO chain_heads VALUES ('scratch', 0, '')")
        journal = Path(str(site.path) + "-journal")
        assert journal.exists() and _mode(journal) == 0o600
        conn.execute("ROLLBACK")
        conn.close()
        legacy = build_site_ledger(tmp_path / "site-s2.ledger.sqlite", rows=1)
        os.chmod(legacy, 0o644)  # as an older privatune left it
        SiteLedger(legacy)
        assert _mode(legacy) == 0o600
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------- version 1 files


def _v1_site_ledger(path: Path, rows: int) -> Path:
    """A version 1 site ledger of ``rows`` campaign spends (tests/ledger_helpers.py)."""
    from tests.helpers.ledgers import write_v1_site_ledger

    return write_v1_site_ledger(path, (spend("run-a", i, 0.5 * i) for i in range(1, rows + 1)))


def test_a_version_1_ledger_is_verified_and_audited_but_not_written(tmp_path: Path) -> None:
    path = _v1_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=3)
    assert verify_chain(path) == []
    with pytest.raises(ledger_mod.LedgerVersionError, match=r"version 1 ledger.*migrate-ledger") as info:
        SiteLedger(path)
    assert "backup" not in str(info.value)  # nothing to restore: it only needs migrating
    from privatune.common.audit import audit_paths

    report = audit_paths([path])
    assert len(report.entries) == 3 and any("version 1 ledger" in n for n in report.notes)
    sql(path, "UPDATE spend SET steps = 1 WHERE seq = 2")
    assert {(p.table, p.seq, p.kind) for p in verify_chain(path)} == {("spend", 2, "edited")}


def test_a_version_1_ledger_migrates_with_every_row_and_hash(tmp_path: Path) -> None:
    path = _v1_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=3)
    original = path.read_bytes()
    conn = sqlite3.connect(path)
    old_rows = conn.execute("SELECT * FROM spend ORDER BY seq").fetchall()
    conn.close()
    from typer.testing import CliRunner

    from privatune.cli import app

    result = CliRunner().invoke(app, ["site", "migrate-ledger", str(path)])
    assert result.exit_code == 0, result.output
    (backup,) = [p for p in tmp_path.iterdir() if p.name.endswith(".bak")]
    assert backup.read_bytes() == original and backup.name.startswith("site-s1.ledger.sqlite.v1-")
    assert verify_chain(path) == [] and ledger_mod.ledger_schema(path) == ledger_mod.SITE_SCHEMA
    conn = sqlite3.connect(path)
    v1 = ", ".join(n for n, _ in ledger_mod.chained_tables_of(ledger_mod.SITE_SCHEMA, "1")["spend"])
    migrated = conn.execute(f"SELECT seq, {v1}, prev_hash, hash FROM spend ORDER BY seq").fetchall()
    assert migrated == old_rows  # seq, fields, hashes (the columns added since are NULL)
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    conn.close()
    assert meta["version"] == ledger_mod.SCHEMA_VERSION and meta["migrated_from"] == "1"
    assert meta["created_at"] == "2026-01-01T00:00:00+00:00"
    assert SiteLedger(path).append(spend("run-b", 1, 9.0)) == 4  # the chain continues
    again = CliRunner().invoke(app, ["site", "migrate-ledger", str(path)])
    assert again.exit_code == 1 and "nothing to migrate" in again.output


def test_a_tampered_version_1_ledger_is_not_migrated(tmp_path: Path) -> None:
    path = _v1_site_ledger(tmp_path / "site-s1.ledger.sqlite", rows=3)
    sql(path, "UPDATE spend SET steps = 1 WHERE seq = 2")
    before = path.read_bytes()
    with pytest.raises(LedgerIntegrityError, match="spend row 2: edited"):
        ledger_mod.migrate_ledger(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
