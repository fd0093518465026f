"""`privatune site check` validates a site alone and names what to fix."""

from __future__ import annotations

from datetime import UTC

import numpy as np
from typer.testing import CliRunner

from privatune.cli import app
from privatune.client.site_check import check_site
from privatune.common.mechanism import DPMechanism


def _csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


def test_a_good_site_passes_and_reports_counts(tmp_path):
    data = _csv(tmp_path / "sms.csv", [(f"message number {i}", "spam" if i % 5 == 0 else "ham") for i in range(200)])
    node = {"site-id": "bank-a", "data-path": str(data), "ledger-path": str(tmp_path / "l.sqlite"), "max-epsilon": 8}
    rep = check_site(node, {"preset": "sms-spam", "batch-size": 32})
    assert rep.ok, [(c.name, c.detail) for c in rep.checks]
    assert rep.data_summary["labels"] == {"ham": 160, "spam": 40}
    assert any(
        c.name == "budget" and "200 records with budget left, 0 exhausted" in c.detail and "max-epsilon 8" in c.detail
        for c in rep.checks
    )


def test_unknown_label_names_the_file_and_record(tmp_path):
    data = _csv(tmp_path / "bad.csv", [("fine", "ham"), ("odd", "phishing")])
    rep = check_site(
        {"site-id": "s", "data-path": str(data), "ledger-path": str(tmp_path / "l")}, {"preset": "sms-spam"}
    )
    assert not rep.ok
    (fail,) = [c for c in rep.checks if not c.ok]
    assert str(data) in fail.detail and "record 2" in fail.detail and "phishing" in fail.detail


def test_missing_ledger_path_and_wrong_images_are_refused(tmp_path):
    rep = check_site({"site-id": "s", "data-path": str(tmp_path / "x.csv")}, {"preset": "sms-spam"})
    assert not rep.ok and "ledger-path is required" in rep.checks[-1].detail
    npz = tmp_path / "imgs.npz"
    np.savez(npz, x=np.zeros((10, 30, 30), np.float32), y=np.zeros(10, np.int64))
    rep = check_site({"site-id": "s", "data-path": str(npz), "ledger-path": str(tmp_path / "l")}, {"preset": "digits"})
    assert not rep.ok and "imgs.npz" in rep.checks[-1].detail


def test_cli_exit_status(tmp_path):
    data = _csv(tmp_path / "sms.csv", [(f"m {i}", "ham" if i % 3 else "spam") for i in range(120)])
    runner = CliRunner(env={"COLUMNS": "250"})
    ok = runner.invoke(
        app,
        [
            "site",
            "check",
            "--node-config",
            f"site-id=a data-path={data} ledger-path={tmp_path}/l.sqlite",
            "--run-config",
            "preset=sms-spam batch-size=16",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "site ready" in ok.output
    bad = runner.invoke(
        app,
        [
            "site",
            "check",
            "--node-config",
            f"site-id=a data-path={tmp_path}/none.csv ledger-path={tmp_path}/l",
            "--run-config",
            "preset=sms-spam",
        ],
    )
    assert bad.exit_code == 1
    assert "none.csv" in bad.output


def test_site_check_counts_exhausted_records_and_the_worst_spend(tmp_path):
    from datetime import datetime

    from privatune.client.privacy_guard import PrivacyGuard
    from privatune.client.record_ids import key_check, record_ids
    from privatune.client.site_data import SiteDataSpec, load_site_data
    from privatune.client.site_secret import default_key_path, key_for_ledger

    data = _csv(tmp_path / "sms.csv", [(f"message number {i}", "spam" if i % 5 == 0 else "ham") for i in range(200)])
    ledger = tmp_path / "site-a.ledger.sqlite"
    node = {"site-id": "a", "data-path": str(data), "ledger-path": str(ledger), "max-epsilon": 2.0}
    # The site spent epsilon ~3 on the first 50 records in an earlier run.
    key = key_for_ledger(default_key_path(ledger), ledger)
    ids = record_ids(key, load_site_data(SiteDataSpec(data, "csv"), ("ham", "spam"), kind="text"))
    guard = PrivacyGuard(ledger, "a", 2.0, key_check=key_check(key))
    guard.record_spend(
        purpose="train",
        record_ids=ids[:50],
        mechanism=DPMechanism(1.0, 0.5, 10, max_grad_norm=1.0, delta=1e-5, accountant="rdp"),
        run_id="old",
        server_round=1,
        dataset_fingerprint="fp",
        params_fingerprint="pf",
        epsilon_run=3.0,
        epsilon_dataset=3.0,
        started_at=datetime.now(UTC),
    )
    from privatune.common.accountants import DEFAULT_ACCOUNTANT

    worst = guard.epsilons(ids, DEFAULT_ACCOUNTANT).worst  # site check reports with the run's accountant
    assert worst > 2.0
    rep = check_site(node, {"preset": "sms-spam", "batch-size": 32})
    (budget,) = [c for c in rep.checks if c.name == "budget"]
    assert budget.ok and "150 records with budget left, 50 exhausted" in budget.detail
    assert f"worst record has spent {worst:.3f} of max-epsilon 2" in budget.detail
