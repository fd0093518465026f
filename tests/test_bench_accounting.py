"""Pure parts of simulations.benchmarks.accounting: the calibration plan and its arithmetic, ledger reading, tables."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from privatune.common.accounting import epsilon_of
from privatune.common.config import RunConfig
from privatune.common.ledger import SiteLedger, SpendEntry, site_ledger_filename, utc_now
from privatune.simulations.benchmarks import accounting as b


def tiny_config(**kw) -> RunConfig:
    # one round, one epoch, batch 64: few steps, so both accountants answer in well under a second
    return RunConfig.create(preset="trec6", num_server_rounds=1, local_epochs=1, batch_size=64, **kw)


def test_run_mechanism_is_the_clients_whole_run() -> None:
    cfg = RunConfig.create(preset="trec6", num_server_rounds=5, local_epochs=5, batch_size=64)
    q, steps, delta = b.run_mechanism(cfg, 380)
    assert q == 1 / 6 and steps == 5 * 5 * 6 and delta == 1e-5
    assert b.run_mechanism(cfg, 10)[:2] == (1.0, 25)  # small n: one batch, q = 1


def test_calibration_rows_compare_accountants_on_the_same_clients() -> None:
    cfg = tiny_config(target_epsilon=4.0)
    rows = b.calibration_rows(cfg, [64, 640])
    assert [(r.records, r.accountant) for r in rows] == [(64, "rdp"), (64, "prv"), (640, "rdp"), (640, "prv")]
    for r in rows:
        assert r.epsilon <= 4.0 and r.target_epsilon == 4.0
        q, steps, delta = b.run_mechanism(cfg, r.records)
        assert r.epsilon_pld == pytest.approx(epsilon_of([(r.noise_multiplier, q, steps)], delta, "pld"))
    saving = b.noise_saving(rows)
    assert len(saving) == 2 and all(0.0 < s < 0.3 for s in saving)  # PRV needs less noise than RDP
    rdp = [r for r in rows if r.accountant == "rdp"]
    assert all(r.epsilon_pld < r.epsilon for r in rdp)  # RDP over-states the spend
    text = b.calibration_table(rows)
    assert len(text.splitlines()) == 6 and "prv" in text and "rdp" in text


def test_ledger_spends_read_the_last_run_and_recompute_with_pld(tmp_path: Path) -> None:
    mech, delta = (1.2, 0.25, 4), 1e-5
    ledger = SiteLedger(tmp_path / site_ledger_filename("s1"))
    for run_id, rounds in (("old", 1), ("new", 2)):
        for rnd in range(1, rounds + 1):
            eps = epsilon_of([mech] * rnd, delta, "prv")
            now = utc_now()
            ledger.append(
                SpendEntry(
                    run_id=run_id,
                    round=rnd,
                    site_id="s1",
                    dataset_fingerprint="fp",
                    params_fingerprint="p",
                    noise_multiplier=mech[0],
                    sample_rate=mech[1],
                    steps=mech[2],
                    max_grad_norm=1.0,
                    delta=delta,
                    accountant="prv",
                    epsilon_run=eps,
                    epsilon_dataset=eps,
                    max_epsilon=None,
                    started_at=now,
                    recorded_at=now,
                )
            )
    (spend,) = b.ledger_spends(tmp_path)
    assert spend.site == "s1" and spend.noise_multiplier == 1.2
    assert spend.epsilon_reported == pytest.approx(epsilon_of([mech] * 2, delta, "prv"))
    assert spend.epsilon_pld == pytest.approx(epsilon_of([mech] * 2, delta, "pld"))  # the "new" run only
    assert spend.epsilon_pld / 1.05 <= spend.epsilon_reported <= spend.epsilon_pld * 1.05


def test_accounting_table_is_well_formed() -> None:
    rows = [
        b.AccountingRow("trec6", "rdp", 8.0, 0.9, 1.1, 7.99, 7.3, 0.8, 0.75, 10.0),
        b.AccountingRow("trec6", "prv", 8.0, 0.85, 0.85, 7.99, 7.98, 0.81, 0.76, 10.0),
        b.AccountingRow("trec6", "prv", 1.0, None, None, None, None, math.nan, math.nan, 1.0, error="boom"),
    ]
    lines = b.accounting_table(rows).splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1
    assert "0.900-1.100" in lines[2] and "1.095" in lines[2] and "0.850 " in lines[3] and "FAILED" in lines[4]


def test_the_benchmark_refuses_an_accountant_override() -> None:
    with pytest.raises(SystemExit):
        b.main(["--run-config", "accountant=pld"])
