"""Site and server ledgers: durability, continuation, validation and tamper detection with the row named."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from privatune.common.accounting import compose, epsilon_of
from privatune.common.ledger import (
    GENESIS_HASH,
    SERVER_LEDGER_NAME,
    LedgerError,
    LedgerIntegrityError,
    ServerLedger,
    SiteLedger,
    SpendEntry,
    ledger_schema,
    row_hash,
    site_ledger_filename,
    utc_now,
    verify_chain,
)
from privatune.common.mechanism import DPMechanism

DELTA = 1e-5
MECH = (1.1, 0.05, 20)


def make_entry(
    run_id: str = "run-a",
    rnd: int = 1,
    *,
    dataset: str = "ds-1",
    site: str = "s1",
    mech: tuple[float, float, int] = MECH,
    epsilon_run: float = 1.0,
    epsilon_dataset: float = 1.0,
    max_epsilon: float | None = 8.0,
) -> SpendEntry:
    now = utc_now()
    return SpendEntry(
        run_id=run_id,
        round=rnd,
        site_id=site,
        dataset_fingerprint=dataset,
        params_fingerprint="p-1",
        noise_multiplier=mech[0],
        sample_rate=mech[1],
        steps=mech[2],
        max_grad_norm=1.0,
        delta=DELTA,
        accountant="rdp",
        epsilon_run=epsilon_run,
        epsilon_dataset=epsilon_dataset,
        max_epsilon=max_epsilon,
        started_at=now,
        recorded_at=now,
    )


def fill(path: Path, rounds: int = 6) -> SiteLedger:
    ledger = SiteLedger(path)
    for r in range(1, rounds + 1):
        ledger.append(make_entry(rnd=r, epsilon_run=float(r), epsilon_dataset=float(r)))
    return ledger


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in statements:
        conn.execute(stmt)
    conn.close()


def rehash(path: Path, seq: int) -> None:
    """What a tamperer who knows the scheme does: recompute one row's own hash after editing it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM spend WHERE seq=?", (seq,)).fetchone())
    from privatune.common.ledger.schema import (  # private; the tamperer reads our code
        _SPEND_COLUMNS,
        _real_columns,
        hashed_fields,
    )

    names = [n for n, _ in _SPEND_COLUMNS]
    digest = row_hash("spend", seq, hashed_fields("spend", names, row), _real_columns(_SPEND_COLUMNS), row["prev_hash"])
    conn.execute("UPDATE spend SET hash=? WHERE seq=?", (digest, seq))
    conn.close()


def kinds(problems) -> set[tuple[int, str]]:
    return {(p.seq, p.kind) for p in problems}


# ---------------------------------------------------------------------------------------------- storage


def test_append_returns_seq_and_chains_rows(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / site_ledger_filename("s1")
    ledger = SiteLedger(path)
    assert path.exists() and path.name == "site-s1.ledger.sqlite"
    assert ledger.append(make_entry(rnd=1)) == 1
    assert ledger.append(make_entry(rnd=2)) == 2
    records = ledger.entries()
    assert [r.seq for r in records] == [1, 2]
    assert records[0].prev_hash == GENESIS_HASH
    assert records[1].prev_hash == records[0].hash
    assert len({r.hash for r in records}) == 2
    assert verify_chain(path) == []
    assert ledger_schema(path) == "privatune.site-ledger"


def test_rollback_journal_mode_keeps_no_wal(tmp_path: Path) -> None:
    """Commits go to the main file (no -wal whose loss could drop an acknowledged spend)."""
    ledger = fill(tmp_path / "l.ledger.sqlite", 1)
    conn = sqlite3.connect(ledger.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    assert not any(p.name.endswith(("-wal", "-shm", "-journal")) for p in tmp_path.iterdir())


def test_values_round_trip_exactly(tmp_path: Path) -> None:
    ledger = SiteLedger(tmp_path / "l.ledger.sqlite")
    entry = make_entry(mech=(0.1 + 0.2, 1 / 3, 7), epsilon_run=math.inf, epsilon_dataset=math.inf, max_epsilon=None)
    ledger.append(entry)
    (record,) = ledger.entries()
    assert record.entry == entry
    assert record.entry.noise_multiplier == 0.1 + 0.2 and record.entry.max_epsilon is None
    assert verify_chain(ledger.path) == []


def test_integers_for_float_fields_hash_stably(tmp_path: Path) -> None:
    ledger = SiteLedger(tmp_path / "l.ledger.sqlite")
    entry = make_entry(mech=(1, 1, 3), epsilon_run=2, epsilon_dataset=2, max_epsilon=8)
    assert isinstance(entry.noise_multiplier, float) and isinstance(entry.max_epsilon, float)
    ledger.append(entry)
    assert verify_chain(ledger.path) == []


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "l.ledger.sqlite"
    fill(path, 3)
    again = SiteLedger(path)
    assert again.append(make_entry(rnd=4)) == 4
    assert [r.seq for r in again.entries()] == [1, 2, 3, 4]
    assert verify_chain(path) == []


def test_spend_is_on_disk_when_the_process_dies_right_after_append(tmp_path: Path) -> None:
    """Write-ahead: append returns only after commit, so a hard kill (no cleanup, no close) keeps the row."""
    path = tmp_path / "l.ledger.sqlite"
    entry = asdict(make_entry(rnd=1))
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from privatune.common.ledger import SiteLedger, SpendEntry
        SiteLedger({str(path)!r}).append(SpendEntry(**{entry!r}))
        os._exit(9)   # killed before replying: no atexit, no finalisers
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    ledger = SiteLedger(path)
    assert [r.entry.round for r in ledger.entries()] == [1]
    assert ledger.last_round("run-a") == 1
    assert verify_chain(path) == []


def test_concurrent_appenders_serialise(tmp_path: Path) -> None:
    """Several writers on one file (e.g. a restarted client overlapping the old one) never fork the chain."""
    path = tmp_path / "l.ledger.sqlite"
    SiteLedger(path)

    def work(worker: int) -> list[int]:
        ledger = SiteLedger(path, verify=False)
        return [ledger.append(make_entry(f"run-{worker}", r)) for r in range(1, 6)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        seqs = [s for batch in pool.map(work, range(4)) for s in batch]
    assert sorted(seqs) == list(range(1, 21))
    assert verify_chain(path) == []


def test_history_spans_runs_and_run_history_one_run(tmp_path: Path) -> None:
    ledger = SiteLedger(tmp_path / "l.ledger.sqlite")
    ledger.append(make_entry("run-a", 1, mech=(1.0, 0.1, 10)))
    ledger.append(make_entry("run-b", 1, mech=(2.0, 0.1, 10)))
    ledger.append(make_entry("run-a", 2, mech=(1.0, 0.1, 10)))
    ledger.append(make_entry("run-a", 1, dataset="ds-2", mech=(3.0, 0.2, 5)))
    assert ledger.history("ds-1") == [(1.0, 0.1, 10), (2.0, 0.1, 10), (1.0, 0.1, 10)]
    assert ledger.run_history("run-a", "ds-1") == [(1.0, 0.1, 10), (1.0, 0.1, 10)]
    assert ledger.history("ds-unknown") == []
    assert len(ledger.entries("ds-2")) == 1
    assert ledger.last_round("run-a") == 2
    assert ledger.last_round("run-b") == 1
    assert ledger.last_round("run-z") is None


def test_projected_composes_the_new_round_onto_the_ledger(tmp_path: Path) -> None:
    ledger = SiteLedger(tmp_path / "l.ledger.sqlite")
    ledger.append(make_entry("run-a", 1, mech=MECH))
    ledger.append(make_entry("run-b", 1, mech=MECH))
    run_eps, data_eps = ledger.projected("run-b", "ds-1", DPMechanism(*MECH, 1.0, DELTA, "rdp"))
    assert run_eps == pytest.approx(epsilon_of([MECH, MECH], DELTA, "rdp"), abs=1e-12)
    assert data_eps == pytest.approx(epsilon_of(compose([MECH, MECH], MECH), DELTA, "rdp"), abs=1e-12)
    assert data_eps > run_eps


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(round=0), "round"),
        (dict(run_id=""), "run_id"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(delta=1.0), "delta"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=math.nan), "noise_multiplier"),
        (dict(steps=-1), "steps"),
        (dict(accountant="gdp"), "accountant"),
        (dict(epsilon_run=math.nan), "epsilon_run"),
        (dict(max_epsilon=0.0), "max_epsilon"),
        (dict(started_at="yesterday"), "started_at"),
        (dict(recorded_at="2024-01-01T10:00:00+02:00"), "UTC"),
    ],
)
def test_bad_entries_are_refused_with_the_field_named(change: dict, match: str) -> None:
    with pytest.raises(LedgerError, match=match):
        replace(make_entry(), **change)


def test_wrong_kind_of_file_is_refused(tmp_path: Path) -> None:
    server_path = tmp_path / SERVER_LEDGER_NAME
    ServerLedger(server_path)
    with pytest.raises(LedgerError, match=r"not a privatune.site-ledger"):
        SiteLedger(server_path)
    junk = tmp_path / "junk.ledger.sqlite"
    junk.write_bytes(b"this is not sqlite at all, not even close" * 10)
    with pytest.raises(LedgerError, match=r"junk.ledger.sqlite"):
        SiteLedger(junk)
    other = tmp_path / "other.sqlite"
    sql(other, "CREATE TABLE t (x)")
    (problem,) = verify_chain(other)  # the verifier reports, it does not raise
    assert problem.kind == "malformed" and problem.table is None and "not a privatune ledger" in problem.detail
    with pytest.raises(LedgerError, match="not a privatune ledger"):
        SiteLedger(other)


# ---------------------------------------------------------------------------------------------- tampering


def test_edit_in_place_is_named(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite").path
    sql(path, "UPDATE spend SET epsilon_run = 0.5 WHERE seq = 3")
    assert kinds(verify_chain(path)) == {(3, "edited")}


@pytest.mark.parametrize(
    "column, value",
    [
        ("steps", 1),
        ("noise_multiplier", 9.0),
        ("run_id", "'x'"),
        ("max_epsilon", "NULL"),
        ("prev_hash", "'00'"),
        ("hash", "'00'"),
    ],
)
def test_editing_any_field_is_detected(tmp_path: Path, column: str, value: object) -> None:
    path = fill(tmp_path / "l.ledger.sqlite", 4).path
    sql(path, f"UPDATE spend SET {column} = {value} WHERE seq = 2")
    assert kinds(verify_chain(path)) == {(2, "edited")}


def test_edit_with_recomputed_hash_is_named(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite").path
    sql(path, "UPDATE spend SET steps = 1 WHERE seq = 2")
    rehash(path, 2)
    assert kinds(verify_chain(path)) == {(2, "edited")}


def test_edit_of_last_row_with_recomputed_hash_is_caught_by_the_head(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite").path
    sql(path, "UPDATE spend SET steps = 1 WHERE seq = 6")
    rehash(path, 6)
    assert kinds(verify_chain(path)) == {(6, "edited")}


def test_deleted_middle_row_is_named(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite").path
    sql(path, "DELETE FROM spend WHERE seq = 4")
    assert kinds(verify_chain(path)) == {(4, "deleted")}


def test_deleted_row_with_renumbering_is_named(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite").path
    sql(path, "DELETE FROM spend WHERE seq = 2", "UPDATE spend SET seq = seq - 1 WHERE seq > 2")
    assert kinds(verify_chain(path)) == {(2, "deleted")}
    sql(
        path, "UPDATE chain_heads SET count = 5 WHERE chain = 'spend'"
    )  # the head's count changed too: that is named as well
    assert kinds(verify_chain(path)) == {(2, "deleted"), (0, "edited")}


def test_truncated_tail_is_named(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite").path
    sql(path, "DELETE FROM spend WHERE seq >= 5")
    problems = verify_chain(path)
    assert kinds(problems) == {(5, "deleted"), (6, "deleted")}
    assert "truncated" in problems[0].detail


def test_deleting_every_row_is_detected(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite", 2).path
    sql(path, "DELETE FROM spend")
    assert kinds(verify_chain(path)) == {(1, "deleted"), (2, "deleted")}


def test_missing_head_record_is_reported(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite", 2).path
    sql(path, "DELETE FROM chain_heads WHERE chain = 'spend'")
    assert kinds(verify_chain(path)) == {(0, "deleted")}


def test_swapped_rows_are_reordered(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite").path
    sql(
        path,
        "UPDATE spend SET seq = 100 WHERE seq = 2",
        "UPDATE spend SET seq = 2 WHERE seq = 5",
        "UPDATE spend SET seq = 5 WHERE seq = 100",
    )
    assert kinds(verify_chain(path)) == {(2, "reordered"), (5, "reordered")}


def test_row_appended_outside_the_ledger_is_inserted(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite", 3).path
    conn = sqlite3.connect(path, isolation_level=None)
    last = conn.execute("SELECT hash FROM spend WHERE seq = 3").fetchone()[0]
    conn.execute(
        "INSERT INTO spend SELECT 4, run_id, 4, site_id, dataset_fingerprint, params_fingerprint, "
        "noise_multiplier, sample_rate, steps, max_grad_norm, delta, accountant, epsilon_run, "
        "epsilon_dataset, max_epsilon, started_at, recorded_at, cohort_id, purpose, noise_source, augment_views, "
        "?, 'f' FROM spend WHERE seq = 3",
        (last,),
    )
    conn.close()
    rehash(path, 4)  # even a well-formed row is caught: the head does not count it
    assert kinds(verify_chain(path)) == {(4, "inserted")}


def test_row_inserted_in_the_middle_is_named(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite", 5).path
    conn = sqlite3.connect(path, isolation_level=None)
    for seq in range(5, 2, -1):  # make room at 3 by moving 3..5 up one
        conn.execute("UPDATE spend SET seq = ? WHERE seq = ?", (seq + 1, seq))
    prev = conn.execute("SELECT hash FROM spend WHERE seq = 2").fetchone()[0]
    conn.execute(
        "INSERT INTO spend SELECT 3, run_id, 99, site_id, dataset_fingerprint, params_fingerprint, "
        "noise_multiplier, sample_rate, steps, max_grad_norm, delta, accountant, epsilon_run, "
        "epsilon_dataset, max_epsilon, started_at, recorded_at, cohort_id, purpose, noise_source, augment_views, "
        "?, 'f' FROM spend WHERE seq = 2",
        (prev,),
    )
    conn.close()
    rehash(path, 3)
    assert kinds(verify_chain(path)) == {(3, "inserted")}
    sql(path, "UPDATE chain_heads SET count = 6 WHERE chain = 'spend'")
    assert kinds(verify_chain(path)) == {(3, "inserted"), (0, "edited")}


def test_clean_ledger_of_many_rows_verifies_quickly(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite", 60).path
    assert verify_chain(path) == []
    sql(path, "DELETE FROM spend WHERE seq = 1", "UPDATE spend SET seq = seq - 1")
    assert kinds(verify_chain(path)) == {(1, "deleted")}


def test_opening_a_tampered_ledger_refuses_to_continue(tmp_path: Path) -> None:
    path = fill(tmp_path / "l.ledger.sqlite", 3).path
    sql(path, "DELETE FROM spend WHERE seq = 2")
    with pytest.raises(LedgerIntegrityError, match="row 2: deleted") as info:
        SiteLedger(path)
    assert kinds(info.value.problems) == {(2, "deleted")}


def test_append_refuses_when_the_tail_was_cut_behind_its_back(tmp_path: Path) -> None:
    ledger = fill(tmp_path / "l.ledger.sqlite", 3)
    sql(ledger.path, "DELETE FROM spend WHERE seq = 3")
    with pytest.raises(LedgerIntegrityError):
        ledger.append(make_entry(rnd=4))
    assert len(ledger.entries()) == 2  # nothing written


# ---------------------------------------------------------------------------------------------- server ledger


def test_server_ledger_records_runs_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "run" / SERVER_LEDGER_NAME
    ledger = ServerLedger(path)
    assert ledger.record_run("run-a", {"num-server-rounds": 3, "dp": True}, "ckks") == 1
    ledger.record_report(
        "run-a",
        1,
        "s1",
        2**63 + 5,
        status="trained",
        noise_multiplier=1.1,
        sample_rate=0.05,
        steps=20,
        max_grad_norm=1.0,
        delta=DELTA,
        accountant="rdp",
        epsilon_reported=0.7,
        dataset_fingerprint="ds-1",
    )
    ledger.record_report("run-a", 1, "s2", 7, status="budget-exhausted", reason="would reach 9.1 > 8")
    ledger.record_report("run-a", 2, "s1", 2**63 + 5, status="dropped", reason="no reply")
    (run,) = ledger.runs()
    assert run.config == {"num-server-rounds": 3, "dp": True} and run.aggregation == "ckks"
    reports = ledger.reports("run-a")
    assert [r.report.status for r in reports] == ["trained", "budget-exhausted", "dropped"]
    assert reports[0].report.node_id == str(2**63 + 5)  # uint64 node ids do not fit SQLite integers
    assert reports[0].report.mechanism == (1.1, 0.05, 20)
    assert reports[1].report.mechanism is None
    assert verify_chain(path) == []
    assert ServerLedger(path).record_run("run-b", {}, "plain") == 2  # reopening continues


def test_server_ledger_validation_and_tampering(tmp_path: Path) -> None:
    ledger = ServerLedger(tmp_path / SERVER_LEDGER_NAME)
    with pytest.raises(LedgerError, match="needs noise_multiplier"):
        ledger.record_report("run-a", 1, "s1", 1, status="trained")
    with pytest.raises(LedgerError, match="status"):
        ledger.record_report("run-a", 1, "s1", 1, status="fine")
    with pytest.raises(LedgerError, match="JSON"):
        ledger.record_run("run-a", {"x": object()}, "plain")
    ledger.record_run("run-a", {}, "plain")
    for rnd in (1, 2, 3):
        ledger.record_report(
            "run-a",
            rnd,
            "s1",
            1,
            status="trained",
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=5,
            max_grad_norm=1.0,
            delta=DELTA,
            accountant="rdp",
            epsilon_reported=rnd,
        )
    sql(ledger.path, "UPDATE reports SET epsilon_reported = 0.1 WHERE seq = 2")
    problems = verify_chain(ledger.path)
    assert [(p.table, p.seq, p.kind) for p in problems] == [("reports", 2, "edited")]


def test_a_metrics_spends_purpose_is_hashed(tmp_path: Path) -> None:
    """A metrics spend's purpose is covered by its hash."""
    import dataclasses

    from privatune.common.ledger import PURPOSE_METRICS

    ledger = fill(tmp_path / "l.ledger.sqlite", 2)
    path = ledger.path
    first = ledger.entries()[0].entry
    ledger.append(dataclasses.replace(first, round=3, purpose=PURPOSE_METRICS))
    assert [r.entry.purpose for r in ledger.entries()] == ["train", "train", "metrics"]
    assert verify_chain(path) == []
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE spend SET purpose = 'train' WHERE seq = 3")
    conn.close()
    assert kinds(verify_chain(path)) == {(3, "edited")}
