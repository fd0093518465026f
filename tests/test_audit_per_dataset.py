"""The audit per dataset and per site: one site ledger holding two datasets shows each dataset's own total, the same
in the console, the Markdown report and the JSON; ledgers are named by their site, never three ``ledger.sqlite``.

The reported bug: the console showed the last round's run epsilon (3.99), the report the largest dataset epsilon of
the ledger (9.52), and the second dataset's total (5.49) appeared nowhere. Every expected total here is composed in
the test, from the rows read with sqlite3 and Opacus' RDP accountant, not through the code under test.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from privatune.client.privacy_guard import PrivacyGuard
from privatune.common.audit import audit_paths, render_table, report_to_json, write_report
from privatune.common.ledger import SiteLedger, SpendEntry, utc_now
from privatune.common.mechanism import DPMechanism

DELTA = 1e-5
MECH_A = (3.0, 1.0, 2)  # sigma, q, steps; q = 1 keeps every accountant fast
MECH_B = (2.5, 1.0, 3)
IDS_A = [bytes([i]) * 16 for i in range(20)]
IDS_B = [bytes([100 + i]) * 16 for i in range(20)]


def _spend(guard: PrivacyGuard, ids, run_id: str, rnd: int, fingerprint: str, mech) -> None:
    """A round as the site records it: the guard's own epsilons, written through its record_spend."""
    eps = guard.epsilons(ids, "rdp", new=[mech], run_id=run_id)
    guard.record_spend(
        purpose="train",
        record_ids=ids,
        mechanism=DPMechanism(*mech, max_grad_norm=1.0, delta=DELTA, accountant="rdp"),
        run_id=run_id,
        server_round=rnd,
        dataset_fingerprint=fingerprint,
        params_fingerprint="head-v1",
        epsilon_run=eps.worst_run,
        epsilon_dataset=eps.worst,
        started_at=datetime.now(UTC),
    )


def _two_dataset_site(path: Path, site: str = "hospital-a", ids_b=IDS_B) -> PrivacyGuard:
    """Dataset A: two runs of two rounds; then dataset B: a run of two rounds and a run of one (last)."""
    guard = PrivacyGuard(path, site, max_epsilon=50.0, delta=DELTA)
    for run in ("run-1", "run-2"):
        for rnd in (1, 2):
            _spend(guard, IDS_A, run, rnd, "fp-A", MECH_A)
    for run, rounds in (("run-3", 2), ("run-4", 1)):
        for rnd in range(1, rounds + 1):
            _spend(guard, ids_b, run, rnd, "fp-B", MECH_B)
    return guard


def _rows(path: Path, fingerprint: str | None = None) -> list[tuple[float, float, int]]:
    """The mechanisms of a ledger's rows, read with sqlite3 (not through privatune)."""
    conn = sqlite3.connect(path)
    sql = "SELECT noise_multiplier, sample_rate, steps FROM spend"
    rows = conn.execute(sql + " WHERE dataset_fingerprint = ?", (fingerprint,)) if fingerprint else conn.execute(sql)
    out = [(float(s), float(q), int(n)) for s, q, n in rows]
    conn.close()
    return out


def _rdp(history) -> float:
    """Opacus' RDP accountant holding every step of ``history`` at once: the independent composition."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(DELTA)


def _console(report, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(render_table(report))
    return console.export_text()


def test_each_datasets_total_is_an_independent_composition_of_its_own_rows(tmp_path: Path) -> None:
    path = tmp_path / "hospital-a" / "ledger.sqlite"
    _two_dataset_site(path)
    want_a, want_b = _rdp(_rows(path, "fp-A")), _rdp(_rows(path, "fp-B"))
    assert len(_rows(path, "fp-A")) == 4 and len(_rows(path, "fp-B")) == 3
    report = audit_paths([path])
    assert report.ok, [v.message for v in report.violations]
    totals = {d.dataset_fingerprint: d for d in report.datasets}
    assert set(totals) == {"fp-A", "fp-B"}
    assert totals["fp-A"].epsilon == pytest.approx(want_a, abs=1e-6)
    assert totals["fp-B"].epsilon == pytest.approx(want_b, abs=1e-6)
    # Composed, not added; and one dataset's spends never enter the other's total.
    run_eps = [_rdp([MECH_A] * 2)] * 2
    assert totals["fp-A"].epsilon < sum(run_eps)
    assert totals["fp-B"].epsilon < _rdp(_rows(path)) and totals["fp-A"].epsilon < _rdp(_rows(path))
    assert (totals["fp-A"].records, totals["fp-B"].records, totals["fp-B"].shared_records) == (20, 20, 0)
    assert totals["fp-A"].runs == ["run-1", "run-2"] and totals["fp-B"].runs == ["run-3", "run-4"]
    # The site's total: its worst record, here the worst dataset's (the datasets share no record).
    (site,) = report.sites
    assert site.site == "hospital-a" and site.epsilon == pytest.approx(max(want_a, want_b), abs=1e-6)
    assert site.budget_left == pytest.approx(50.0 - max(want_a, want_b), abs=1e-6)
    # The site's own ledger API gives the same numbers (what `privatune budget` can show).
    datasets, whole = SiteLedger(path).totals()
    assert [d.epsilon for d in datasets] == [pytest.approx(want_a, abs=1e-6), pytest.approx(want_b, abs=1e-6)]
    assert whole.epsilon == pytest.approx(site.epsilon, abs=1e-12)


def test_console_report_and_json_show_the_same_totals(tmp_path: Path) -> None:
    """The bug as reported: before the fix the console showed only the last round's run epsilon, the Markdown only
    the largest dataset epsilon, and the second dataset's total appeared in neither."""
    path = tmp_path / "hospital-a" / "ledger.sqlite"
    _two_dataset_site(path)
    want = {"fp-A": _rdp(_rows(path, "fp-A")), "fp-B": _rdp(_rows(path, "fp-B"))}
    site_want = max(want.values())
    report = audit_paths([path])
    text = _console(report)
    assert max(len(line) for line in text.splitlines()) <= 80
    md = write_report(report, tmp_path / "out").markdown.read_text()
    for fp, value in want.items():
        console_row = next(line.split() for line in text.splitlines() if line.split()[:2] == ["hospital-a", fp])
        assert console_row[4] == f"{value:.3f}", console_row  # Site Dataset Runs Spends ε-total Budget Left
        assert console_row[6] == f"{50.0 - value:.3f}"
        md_row = next(line for line in md.splitlines() if line.startswith(f"| hospital-a | {fp} |"))
        cells = [c.strip() for c in md_row.strip("|").split("|")]
        assert cells[9] == f"{value:.3f}" and cells[11] == f"{50.0 - value:.3f}", cells
    site_row = next(line.split() for line in text.splitlines() if line.split()[:3] == ["hospital-a", "all", "2"])
    assert site_row[5] == f"{site_want:.3f}"
    md_site = next(line for line in md.splitlines() if line.startswith("| hospital-a | 2 |"))
    assert [c.strip() for c in md_site.strip("|").split("|")][6] == f"{site_want:.3f}"
    # JSON: both the report's audit.json and what `--json` writes.
    for data in (report_to_json(report), json.loads((tmp_path / "out" / "audit.json").read_text())):
        got = {d["dataset_fingerprint"]: d["epsilon"] for d in data["datasets"]}
        assert got == {fp: pytest.approx(v, abs=1e-6) for fp, v in want.items()}
        assert [s["epsilon"] for s in data["sites"]] == [pytest.approx(site_want, abs=1e-6)]
        assert all(d["site"] == "hospital-a" for d in data["datasets"])
    # The ledger's summary row states the site's total, not the largest row of one dataset under another name.
    (summary,) = [s for s in report.summaries if s.source == "site"]
    assert summary.epsilon_total == pytest.approx(site_want, abs=1e-6) and summary.datasets == 2


def test_the_cli_prints_and_writes_the_totals(tmp_path: Path) -> None:
    from privatune.cli import app

    path = tmp_path / "hospital-a" / "ledger.sqlite"
    _two_dataset_site(path)
    want_b = _rdp(_rows(path, "fp-B"))
    out = tmp_path / "audit.json"
    # A folder holding a plain ledger.sqlite (the name docs/deploy-site.md gives) is searched too.
    result = CliRunner().invoke(app, ["audit", str(tmp_path), "--json", str(out), "--report", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert re.search(rf"hospital-a\s+fp-B\s+2\s+3\s+{want_b:.3f}", result.output), result.output
    data = json.loads(out.read_text())
    assert {d["dataset_fingerprint"]: round(d["epsilon"], 3) for d in data["datasets"]}["fp-B"] == round(want_b, 3)
    assert f"| {want_b:.3f} |" in (tmp_path / "rep" / "audit.md").read_text()


def test_records_two_datasets_share_carry_the_spends_of_both(tmp_path: Path) -> None:
    """Keyed record ids say when two datasets hold the same records: those records compose both datasets' spends."""
    path = tmp_path / "site-s1.ledger.sqlite"
    _two_dataset_site(path, "s1", ids_b=IDS_A[10:] + IDS_B[:10])  # B holds half of A's records
    both = _rdp(_rows(path))
    report = audit_paths([path])
    assert report.ok, [v.message for v in report.violations]
    totals = {d.dataset_fingerprint: d for d in report.datasets}
    assert totals["fp-A"].epsilon == pytest.approx(both, abs=1e-6)  # A's worst record is one B trained on too
    assert totals["fp-B"].epsilon == pytest.approx(both, abs=1e-6)
    assert totals["fp-A"].shared_records == totals["fp-B"].shared_records == 10
    assert report.sites[0].epsilon == pytest.approx(both, abs=1e-6) and report.sites[0].records == 30


def test_a_datasets_total_is_its_worst_record_not_every_spend(tmp_path: Path) -> None:
    """Two spends on one dataset with disjoint cohorts (records left out): each record went through one of them."""
    path = tmp_path / "site-s1.ledger.sqlite"
    guard = PrivacyGuard(path, "s1", max_epsilon=50.0, delta=DELTA)
    _spend(guard, IDS_A[:10], "run-1", 1, "fp-A", MECH_A)
    _spend(guard, IDS_A[10:], "run-1", 2, "fp-A", MECH_B)
    (total,) = audit_paths([path]).datasets
    assert total.epsilon == pytest.approx(max(_rdp([MECH_A]), _rdp([MECH_B])), abs=1e-6)
    assert total.epsilon < _rdp(_rows(path)) and total.records == 20


def test_spends_from_before_cohorts_total_per_fingerprint_and_the_site_composes_them_all(tmp_path: Path) -> None:
    """Rows without a cohort cannot say which records they touched: per dataset they compose as the budget of their
    time did (by fingerprint); the site's total composes all of them, since one record may be in every one."""
    path = tmp_path / "site-old.ledger.sqlite"
    ledger = SiteLedger(path)
    mech = DPMechanism(*MECH_A, max_grad_norm=1.0, delta=DELTA, accountant="rdp")
    for fp, run, rounds in (("fp-A", "run-1", 2), ("fp-B", "run-2", 1)):
        for rnd in range(1, rounds + 1):
            eps_run, eps_data = ledger.projected(run, fp, mech)
            now = utc_now()
            ledger.append(
                SpendEntry.from_mechanism(
                    mech,
                    run_id=run,
                    round=rnd,
                    site_id="old",
                    dataset_fingerprint=fp,
                    params_fingerprint="head-v1",
                    epsilon_run=eps_run,
                    epsilon_dataset=eps_data,
                    max_epsilon=50.0,
                    started_at=now,
                    recorded_at=now,
                )
            )
    report = audit_paths([path])
    assert report.ok, [v.message for v in report.violations]
    totals = {d.dataset_fingerprint: d for d in report.datasets}
    assert totals["fp-A"].epsilon == pytest.approx(_rdp(_rows(path, "fp-A")), abs=1e-6)
    assert totals["fp-B"].epsilon == pytest.approx(_rdp(_rows(path, "fp-B")), abs=1e-6)
    assert totals["fp-A"].records is None
    assert report.sites[0].epsilon == pytest.approx(_rdp(_rows(path)), abs=1e-6)
    # The console shows the site's row, since it differs from every dataset's.
    site_row = next(line.split() for line in _console(report).splitlines() if line.split()[:2] == ["old", "all"])
    assert site_row[5] == f"{_rdp(_rows(path)):.3f}"


def test_three_sites_ledgers_all_called_ledger_sqlite_are_named_by_site(tmp_path: Path) -> None:
    paths = []
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        path = tmp_path / "collected" / site / "ledger.sqlite"
        guard = PrivacyGuard(path, site, max_epsilon=50.0, delta=DELTA)
        _spend(guard, IDS_A, "run-1", 1, f"fp-{site}", MECH_A)
        paths.append(path)
    report = audit_paths(paths)
    names = [f.name for f in report.files]
    assert sorted(names) == ["hospital-a", "hospital-b", "hospital-c"]
    assert [d.site for d in report.datasets] == names
    text = _console(report)
    for name in names:
        assert re.search(rf"^ ?{name}\s+site\s+1\s+intact\s+{name}/ledger.sqlite", text, re.M), text
    md = write_report(report, tmp_path / "out").markdown.read_text()
    assert all(f"| {name} | {(tmp_path / 'collected' / name / 'ledger.sqlite').resolve()} |" in md for name in names)
    data = report_to_json(report)
    assert sorted(f["name"] for f in data["files"]) == sorted(names)
    assert {e["ledger"] for e in data["entries"]} == set(names)
    # Searching the folder finds them by their plain name too.
    assert sorted(f.name for f in audit_paths([tmp_path / "collected"]).files) == names


def test_ledgers_without_a_site_id_or_with_the_same_one_get_distinct_names(tmp_path: Path) -> None:
    # No rows yet: the folder names the ledger. The same site id in two folders: the folder tells them apart.
    for site in ("north", "south"):
        SiteLedger(tmp_path / site / "ledger.sqlite")
    for copy in ("live", "backup"):
        guard = PrivacyGuard(tmp_path / copy / "ledger.sqlite", "s1", max_epsilon=50.0, delta=DELTA)
        _spend(guard, IDS_A, "run-1", 1, "fp-A", MECH_A)
    report = audit_paths([tmp_path])
    names = sorted(f.name for f in report.files)
    assert names == ["north", "s1 (backup/ledger.sqlite)", "s1 (live/ledger.sqlite)", "south"]
    assert len({s.site for s in report.sites}) == 4


def test_the_pure_totals_name_what_they_cannot_compose() -> None:
    from privatune.common.ledger import LedgerSpend, compose_dataset, site_total

    spend = LedgerSpend("fp-A", "run-1", MECH_A, "no-such-cohort", DELTA, "rdp")
    total = compose_dataset([spend], {}, "fp-A")
    assert total.epsilon is None and "no-such-cohort"[:16] in (total.error or "")
    with pytest.raises(ValueError, match="fp-B"):
        compose_dataset([spend], {}, "fp-B")
    empty = site_total([], {})
    assert (empty.epsilon, empty.spends, empty.datasets) == (0.0, 0, ())
