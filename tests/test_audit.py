"""The audit: independent recomputation, chain checks with the row named, server/site cross-check, outputs."""

from __future__ import annotations

import json
import math
from datetime import UTC
from pathlib import Path

import pytest
from rich.console import Console

from privatune.common.accounting import epsilon_of
from privatune.common.audit import (
    AuditInputError,
    audit_paths,
    render_table,
    render_violations,
    report_to_json,
    write_report,
)
from privatune.common.ledger import (
    SERVER_LEDGER_NAME,
    ServerLedger,
    SiteLedger,
    SpendEntry,
    site_ledger_filename,
    utc_now,
)
from privatune.common.mechanism import DPMechanism
from tests.helpers.federation_ledgers import DELTA, MECH, SGD, federate, sql


def vkinds(report) -> set[tuple[str, str, int | None]]:
    return {(v.kind, Path(v.file).name, v.seq) for v in report.violations}


# ---------------------------------------------------------------------------------------------- clean runs


def test_clean_federation_passes_and_matches_an_independent_recomputation(tmp_path: Path) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    rounds = 3
    federate(tmp_path, rounds=rounds, mech=SGD)
    report = audit_paths([tmp_path])
    assert report.ok, report.violations
    assert {Path(f.path).name for f in report.files} == {
        "site-s1.ledger.sqlite",
        "site-s2.ledger.sqlite",
        SERVER_LEDGER_NAME,
    }
    site_rows = [e for e in report.entries if e.source == "site"]
    assert len(site_rows) == 2 * rounds
    for e in site_rows:
        # Independent of our code: one Opacus accountant that ran every step of rounds 1..r in one go.
        rdp, prv = RDPAccountant(), PRVAccountant()
        rdp.history = prv.history = [(SGD[0], SGD[1], SGD[2] * e.round)]
        assert e.epsilon_reported == pytest.approx(rdp.get_epsilon(DELTA), abs=1e-6)
        assert e.epsilon_rdp == pytest.approx(rdp.get_epsilon(DELTA), abs=1e-6)
        assert e.epsilon_prv == pytest.approx(prv.get_epsilon(DELTA), abs=1e-6)
        assert e.epsilon_prv < e.epsilon_rdp
        assert e.problems == []
    server_rows = [e for e in report.entries if e.source == "server"]
    assert len(server_rows) == 2 * rounds and all(e.aggregation == "plain" for e in server_rows)
    last = next(s for s in report.summaries if s.source == "site" and s.party == "s1")
    assert last.rounds_trained == rounds and last.budget_left == pytest.approx(50.0 - last.epsilon_total)


def test_prv_accounted_federation_passes(tmp_path: Path) -> None:
    federate(tmp_path, rounds=2, accountant="prv", sites=("s1",))
    report = audit_paths([tmp_path])
    assert report.ok, report.violations
    assert all(e.epsilon_recomputed == e.epsilon_prv for e in report.entries)


def test_budget_composes_across_runs(tmp_path: Path) -> None:
    federate(tmp_path, rounds=2, run_id="run-1", sites=("s1",))
    federate(tmp_path, rounds=2, run_id="run-2", sites=("s1",))
    report = audit_paths([tmp_path])
    assert report.ok, report.violations
    first = [e for e in report.entries if e.source == "site" and e.run_id == "run-1"]
    second = [e for e in report.entries if e.source == "site" and e.run_id == "run-2"]
    assert second[0].epsilon_rdp == pytest.approx(first[0].epsilon_rdp, abs=1e-12)  # a new run starts afresh
    assert second[-1].epsilon_dataset == pytest.approx(
        epsilon_of([MECH] * 4, DELTA, "rdp"), abs=1e-9
    )  # the data does not
    assert second[-1].epsilon_dataset > second[-1].epsilon_rdp
    assert second[-1].epsilon_dataset_reported == pytest.approx(second[-1].epsilon_dataset, abs=1e-6)


def test_no_noise_is_infinite_and_consistent(tmp_path: Path) -> None:
    federate(tmp_path, rounds=2, mech=(0.0, 0.04, 25), max_epsilon=None, sites=("s1",))
    report = audit_paths([tmp_path])
    assert report.ok, report.violations
    assert all(e.epsilon_rdp == math.inf for e in report.entries)


# ---------------------------------------------------------------------------------------------- tampering


def test_editing_one_row_fails_the_audit_with_the_row_named(tmp_path: Path) -> None:
    federate(tmp_path, rounds=3)
    sql(tmp_path / "site-s1.ledger.sqlite", "UPDATE spend SET epsilon_run = 0.01 WHERE seq = 2")
    report = audit_paths([tmp_path])
    assert not report.ok
    kinds = vkinds(report)
    assert ("chain-edited", "site-s1.ledger.sqlite", 2) in kinds
    assert ("epsilon-underreported", "site-s1.ledger.sqlite", 2) in kinds
    assert any(k == "report-mismatch" for k, _, _ in kinds)  # the server still has the true value
    assert all(f == "site-s1.ledger.sqlite" or k == "report-mismatch" for k, f, _ in kinds)
    row = next(e for e in report.entries if e.source == "site" and e.party == "s1" and e.seq == 2)
    assert "chain-edited" in row.problems


def test_deleting_one_row_fails_the_audit_with_the_row_named(tmp_path: Path) -> None:
    federate(tmp_path, rounds=3)
    sql(tmp_path / "site-s2.ledger.sqlite", "DELETE FROM spend WHERE seq = 2")
    report = audit_paths([tmp_path])
    assert not report.ok
    kinds = vkinds(report)
    assert ("chain-deleted", "site-s2.ledger.sqlite", 2) in kinds
    # the server had s2 trained in round 2: that spend is now missing at the site
    missing = [v for v in report.violations if v.kind == "missing-at-site"]
    assert len(missing) == 1 and "client s2" in missing[0].message and "round 2" in missing[0].message


def test_editing_a_server_row_is_named(tmp_path: Path) -> None:
    federate(tmp_path, rounds=2)
    sql(tmp_path / SERVER_LEDGER_NAME, "UPDATE reports SET steps = 1 WHERE seq = 3")
    report = audit_paths(
        [tmp_path / SERVER_LEDGER_NAME, tmp_path / "site-s1.ledger.sqlite", tmp_path / "site-s2.ledger.sqlite"]
    )
    assert ("chain-edited", SERVER_LEDGER_NAME, 3) in vkinds(report)
    assert any(v.kind == "report-mismatch" and v.seq == 3 for v in report.violations)


def test_a_lower_epsilon_written_through_the_api_is_flagged(tmp_path: Path) -> None:
    """The chain is intact (the client itself lied); only the recomputation catches it."""
    federate(tmp_path, rounds=2, sites=("s1",), server=False)
    ledger = SiteLedger(tmp_path / "site-s1.ledger.sqlite")
    honest = ledger.entries()[-1].entry
    now = utc_now()
    ledger.append(
        SpendEntry(
            **{
                **honest.__dict__,
                "round": 3,
                "epsilon_run": honest.epsilon_run,
                "epsilon_dataset": honest.epsilon_dataset,
                "started_at": now,
                "recorded_at": now,
            }
        )
    )
    report = audit_paths([tmp_path])
    assert not report.ok
    assert {(v.kind, v.seq) for v in report.violations} == {("epsilon-underreported", 3)}
    assert all(f.chain_ok for f in report.files)
    assert sorted(v.message.split(" records ")[1].split(" epsilon")[0] for v in report.violations) == ["dataset", "run"]


def test_budget_exceeded_is_flagged(tmp_path: Path) -> None:
    federate(tmp_path, rounds=3, sites=("s1",), max_epsilon=1.0)  # this site ignored its own budget
    report = audit_paths([tmp_path])
    over = [v for v in report.violations if v.kind == "budget-exceeded"]
    assert over and all(v.party == "s1" for v in over)
    eps = {e.seq: e.epsilon_dataset for e in report.entries if e.source == "site"}
    assert {v.seq for v in over} == {seq for seq, x in eps.items() if x > 1.0}


def test_round_missing_at_the_site_is_flagged(tmp_path: Path) -> None:
    federate(tmp_path, rounds=3, skip_site={("s2", 3)})
    report = audit_paths([tmp_path])
    assert not report.ok
    (v,) = report.violations
    assert v.kind == "missing-at-site" and Path(v.file).name == SERVER_LEDGER_NAME
    assert "client s2" in v.message and "round 3" in v.message


def test_round_missing_at_the_server_is_flagged(tmp_path: Path) -> None:
    federate(tmp_path, rounds=3, skip_server={("s1", 2)})
    report = audit_paths([tmp_path])
    assert not report.ok
    (v,) = report.violations
    assert (v.kind, Path(v.file).name, v.seq) == ("missing-at-server", "site-s1.ledger.sqlite", 2)


def test_dropped_reply_with_a_recorded_spend_is_a_note_not_a_violation(tmp_path: Path) -> None:
    federate(tmp_path, rounds=2, skip_server={("s1", 2)})
    ServerLedger(tmp_path / SERVER_LEDGER_NAME).record_report(
        "run-1", 2, "s1", 1001, status="dropped", reason="no reply before timeout"
    )
    report = audit_paths([tmp_path])
    assert report.ok, report.violations
    assert any("dropped" in n and "s1" in n for n in report.notes)


def test_budget_exhausted_reply_with_a_recorded_spend_is_flagged(tmp_path: Path) -> None:
    federate(tmp_path, rounds=2, sites=("s1",), skip_server={("s1", 2)})
    ServerLedger(tmp_path / SERVER_LEDGER_NAME).record_report(
        "run-1", 2, "s1", 1001, status="budget-exhausted", reason="would exceed"
    )
    report = audit_paths([tmp_path])
    assert [v.kind for v in report.violations] == ["report-mismatch"]


def test_mechanism_reported_differently_is_flagged(tmp_path: Path) -> None:
    federate(tmp_path, rounds=1, sites=("s1",), skip_server={("s1", 1)})
    ServerLedger(tmp_path / SERVER_LEDGER_NAME).record_report(
        "run-1",
        1,
        "s1",
        1001,
        status="trained",
        noise_multiplier=2.0 * MECH[0],
        sample_rate=MECH[1],
        steps=MECH[2],
        max_grad_norm=1.0,
        delta=DELTA,
        accountant="rdp",
        epsilon_reported=100.0,
    )
    report = audit_paths([tmp_path])
    (v,) = report.violations
    assert v.kind == "report-mismatch" and "noise_multiplier" in v.message and "epsilon (run)" in v.message


def test_server_only_audit_notes_the_unchecked_clients(tmp_path: Path) -> None:
    federate(tmp_path, rounds=2)
    report = audit_paths([tmp_path / SERVER_LEDGER_NAME])
    assert report.ok
    assert any("no site ledger for client s1" in n for n in report.notes)


def test_unreadable_file_and_bad_paths(tmp_path: Path) -> None:
    federate(tmp_path, rounds=1, sites=("s1",))
    (tmp_path / "site-junk.ledger.sqlite").write_bytes(b"not a database" * 100)
    report = audit_paths([tmp_path])
    assert [(v.kind, Path(v.file).name) for v in report.violations] == [("unreadable", "site-junk.ledger.sqlite")]
    with pytest.raises(AuditInputError, match="does not exist"):
        audit_paths([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuditInputError, match="no ledger files"):
        audit_paths([tmp_path / "empty"])
    with pytest.raises(AuditInputError, match="tolerance"):
        audit_paths([tmp_path], tolerance=-1)


# ---------------------------------------------------------------------------------------------- outputs


def test_json_entries_carry_mechanism_and_recomputed_epsilons(tmp_path: Path) -> None:
    federate(tmp_path, rounds=2, mech=MECH)
    federate(tmp_path / "nodp", rounds=1, sites=("s9",), mech=(0.0, 0.1, 3), max_epsilon=None)
    data = report_to_json(audit_paths([tmp_path]))
    text = json.dumps(data, allow_nan=False)  # strict JSON: infinities are spelled "inf"
    assert json.loads(text)["ok"] is True
    assert data["counts"]["violations"] == 0
    for entry in data["entries"]:
        for key in (
            "noise_multiplier",
            "sample_rate",
            "steps",
            "max_grad_norm",
            "delta",
            "accountant",
            "epsilon_rdp",
            "epsilon_prv",
            "epsilon_recomputed",
            "epsilon_reported",
            "run_id",
            "round",
            "party",
            "source",
            "file",
            "seq",
        ):
            assert key in entry
    trained = [e for e in data["entries"] if e["party"] != "s9"]
    assert all(isinstance(e["epsilon_rdp"], float) and isinstance(e["epsilon_prv"], float) for e in trained)
    assert any(e["epsilon_rdp"] == "inf" for e in data["entries"] if e["party"] == "s9")


def test_report_files_and_table(tmp_path: Path) -> None:
    federate(tmp_path / "run", rounds=3)
    sql(tmp_path / "run" / "site-s1.ledger.sqlite", "DELETE FROM spend WHERE seq = 3")
    report = audit_paths([tmp_path / "run"])
    files = write_report(report, tmp_path / "out")
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files.plot.stat().st_size > 5000
    md = files.markdown.read_text()
    assert "**FAIL**" in md and "chain-deleted" in md and "epsilon_per_round.png" in md
    assert json.loads(files.json.read_text())["ok"] is False
    console = Console(record=True, width=250)
    console.print(render_table(report))
    console.print(render_violations(report))
    out = console.export_text()
    assert "chain-deleted" in out and "site-s2.ledger.sqlite" in out and "FAIL" in out


# ----------------------------------------------------------------------------------------- per-record budgets


def _spend_on(guard, ids, run_id, rnd, mech=MECH):
    from datetime import datetime

    eps = guard.epsilons(ids, "rdp", new=[mech], run_id=run_id)
    guard.record_spend(
        purpose="train",
        record_ids=ids,
        mechanism=DPMechanism(*mech, max_grad_norm=1.0, delta=DELTA, accountant="rdp"),
        run_id=run_id,
        server_round=rnd,
        dataset_fingerprint=f"fp-{run_id}",
        params_fingerprint="head-v1",
        epsilon_run=eps.worst_run,
        epsilon_dataset=eps.worst,
        started_at=datetime.now(UTC),
    )


def test_audit_recomputes_the_worst_record_over_overlapping_cohorts(tmp_path: Path) -> None:
    from privatune.client.privacy_guard import PrivacyGuard

    ids = [bytes([i]) * 16 for i in range(20)]
    guard = PrivacyGuard(tmp_path / site_ledger_filename("s1"), "s1", max_epsilon=100.0, delta=DELTA)
    _spend_on(guard, ids[:12], "run-1", 1)
    _spend_on(guard, ids[8:], "run-2", 1)  # records 8..11 are in both: the worst record composes two spends
    report = audit_paths([tmp_path])
    assert report.ok, [v.message for v in report.violations]
    one, two = (e.epsilon_dataset for e in report.entries)
    assert one == pytest.approx(epsilon_of([MECH], DELTA, "rdp"))
    assert two == pytest.approx(epsilon_of([MECH, MECH], DELTA, "rdp"))


def test_audit_flags_a_record_over_the_budget_and_an_altered_cohort(tmp_path: Path) -> None:
    from privatune.client.privacy_guard import PrivacyGuard

    ids = [bytes([i]) * 16 for i in range(20)]
    path = tmp_path / site_ledger_filename("s1")
    one = epsilon_of([MECH], DELTA, "rdp")
    guard = PrivacyGuard(path, "s1", max_epsilon=one * 1.1, delta=DELTA)
    _spend_on(guard, ids[:10], "run-1", 1)
    _spend_on(guard, ids[5:15], "run-2", 1)  # the guard's own plan would exclude 5..9; written by hand here
    kinds = {v.kind for v in audit_paths([tmp_path]).violations}
    assert kinds == {"budget-exceeded"}
    # Dropping a record from a stored cohort (and rehashing nothing) breaks its id and its chain.
    from privatune.common.record_budget import pack_ids

    sql(path, f"UPDATE cohorts SET ids = '{pack_ids(ids[:9])}' WHERE seq = 1")
    kinds = {v.kind for v in audit_paths([tmp_path]).violations}
    assert {"invalid-cohort", "chain-edited"} <= kinds


def test_a_ledger_from_before_cohorts_still_audits_and_keeps_working(tmp_path: Path) -> None:
    """A version 1 ledger (no cohorts), migrated: its spends count against every record, and it keeps working."""
    from privatune.client.privacy_guard import PrivacyGuard
    from privatune.common.ledger import migrate_ledger
    from privatune.simulations.ledger_campaign import spend
    from tests.helpers.ledgers import write_v1_site_ledger

    path = write_v1_site_ledger(
        tmp_path / site_ledger_filename("s1"),  # two spends of (1.1, 0.05, 20)
        [spend("run-a", 1, 0.5), spend("run-a", 2, 1.0)],
    )
    migrate_ledger(path)
    for backup in tmp_path.glob("*.bak"):
        backup.unlink()
    # (the campaign's rows record made-up epsilons, which the audit rightly flags as under-reported)
    assert {v.kind for v in audit_paths([tmp_path]).violations} == {"epsilon-underreported"}
    guard = PrivacyGuard(path, "s1", max_epsilon=50.0, delta=DELTA)
    ids = [bytes([i]) * 16 for i in range(4)]
    legacy = epsilon_of([(1.1, 0.05, 40)], DELTA, "rdp")
    assert guard.epsilons(ids, "rdp").spent == [pytest.approx(legacy)] * 4  # an old spend counts for every record
    _spend_on(guard, ids, "run-2", 1)
    report = audit_paths([tmp_path])
    assert not [v for v in report.violations if v.seq == 3], [v.message for v in report.violations]
    assert report.entries[-1].epsilon_dataset == pytest.approx(epsilon_of([(1.1, 0.05, 40), MECH], DELTA, "rdp"))


# ---------------------------------------------------------------------------------------------- independent PLD


class _UnderReporting:
    """An accountant with a bug: it reports 80 % of what Opacus' PRV gives (the kind of error a wrong library
    version or a broken conversion would make). The clients and the audit's same-accountant check both use it."""

    def __init__(self, real):
        self.real, self.name, self.library = real, real.name, real.library

    def epsilon(self, mechanisms, delta):
        return 0.8 * self.real.epsilon(mechanisms, delta)


def test_independent_pld_matches_a_clean_prv_federation(tmp_path: Path) -> None:
    federate(tmp_path, rounds=3, mech=SGD, accountant="prv")
    report = audit_paths([tmp_path])
    assert report.ok, report.violations
    for e in report.entries:
        assert e.independent_accountant == "pld"
        assert e.epsilon_pld == pytest.approx(epsilon_of([SGD] * e.round, DELTA, "pld"), rel=1e-9)
        assert 0.98 <= e.independent_ratio <= 1.05  # PRV within the accountants' error of PLD
        if e.source == "site":
            assert e.epsilon_dataset_independent == pytest.approx(e.epsilon_pld, rel=1e-9)  # one run only


def test_pld_accounted_rows_are_checked_against_opacus_prv(tmp_path: Path) -> None:
    federate(tmp_path, rounds=2, mech=SGD, accountant="pld", sites=("s1",))
    report = audit_paths([tmp_path])
    assert report.ok, report.violations
    assert all(e.independent_accountant == "prv" and e.epsilon_recomputed == e.epsilon_pld for e in report.entries)
    assert all(0.95 <= e.independent_ratio <= 1.05 for e in report.entries)


def test_an_accountant_that_under_reports_is_caught_by_the_independent_pld(tmp_path: Path, monkeypatch) -> None:
    import privatune.common.accountants as accountants

    monkeypatch.setitem(accountants.REGISTRY, "prv", _UnderReporting(accountants.REGISTRY["prv"]))
    federate(tmp_path, rounds=2, mech=SGD, accountant="prv")  # the clients record the buggy values
    report = audit_paths([tmp_path])  # the same buggy PRV agrees with them; dp-accounting's PLD does not
    assert not report.ok
    kinds = {(v.kind, Path(v.file).name, v.seq) for v in report.violations}
    assert kinds == {
        ("epsilon-underreported", name, seq)
        for name in ("site-s1.ledger.sqlite", "site-s2.ledger.sqlite")
        for seq in (1, 2)
    } | {("epsilon-underreported", SERVER_LEDGER_NAME, seq) for seq in (1, 2, 3, 4)}
    assert all("independent pld recomputation" in v.message for v in report.violations)
    site_msgs = [v.message for v in report.violations if v.table == "spend"]
    assert sum("records run epsilon" in m for m in site_msgs) == 4
    assert sum("records dataset epsilon" in m for m in site_msgs) == 4
    assert all(e.independent_ratio == pytest.approx(0.8, abs=0.02) for e in report.entries)
    md = write_report(report, tmp_path / "out").markdown.read_text()
    assert "ε PLD" in md and "| pld |" in md and "independent pld recomputation" in md


def test_a_small_gap_within_the_accountants_error_is_not_a_violation(tmp_path: Path, monkeypatch) -> None:
    import privatune.common.accountants as accountants

    class Slightly(_UnderReporting):
        def epsilon(self, mechanisms, delta):
            return 0.99 * self.real.epsilon(mechanisms, delta)

    monkeypatch.setitem(accountants.REGISTRY, "prv", Slightly(accountants.REGISTRY["prv"]))
    federate(tmp_path, rounds=1, mech=SGD, accountant="prv", sites=("s1",))
    assert audit_paths([tmp_path]).ok


def test_pld_column_in_console_and_json(tmp_path: Path) -> None:
    federate(tmp_path, rounds=1, mech=SGD, accountant="prv", sites=("s1",))
    report = audit_paths([tmp_path])
    console = Console(record=True, width=100)
    console.print(render_table(report))
    out = console.export_text()
    assert "ε PLD" in out and f"{report.entries[0].epsilon_pld:.3f}" in out
    data = report_to_json(report)
    assert data["independent_rel_tolerance"] == 0.02
    assert all(
        isinstance(e["epsilon_pld"], float)
        and e["independent_accountant"] == "pld"
        and isinstance(e["independent_ratio"], float)
        for e in data["entries"]
    )
