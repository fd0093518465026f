"""Private selection in the site ledgers (issue 14): each site's record of a study's private selection
(``site-<id>.selections.sqlite`` beside its ledger), written once per study, and ``privatune audit`` recomputing it
from the trials' spends; and the best-trial config through Flower's own run-config parser and (slow) ``flwr run``.

The synthetic ledgers are written by the site's own PrivacyGuard, so everything but the selection record is honest
and the audit passes on them; each failure case changes one thing."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import tomllib
import uuid
from datetime import UTC, datetime
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from privatune.common.audit import audit_paths
from privatune.common.ledger import (
    SelectionLedger,
    SelectionRecord,
    selection_ledger_path,
    site_ledger_filename,
    verify_chain,
)
from privatune.common.mechanism import DPMechanism

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
# Two trials; the second dominates the first at every Renyi order (less noise, more sampling, more steps).
WEAK, STRONG = (2.0, 0.02, 10), (1.1, 0.05, 30)
TRIALS = {"101": WEAK, "102": STRONG}
ROUNDS = 1
IDS = [bytes([i]) * 16 for i in range(20)]


def _spend(guard, run_id: str, rnd: int, mech: tuple[float, float, int]) -> None:
    eps = guard.epsilons(IDS, "rdp", new=[mech], run_id=run_id)
    guard.record_spend(
        purpose="train",
        record_ids=IDS,
        mechanism=DPMechanism(*mech, max_grad_norm=1.0, delta=DELTA, accountant="rdp"),
        run_id=run_id,
        server_round=rnd,
        dataset_fingerprint="fp-digits",
        params_fingerprint="head-v1",
        epsilon_run=eps.worst_run,
        epsilon_dataset=eps.worst,
        started_at=datetime.now(UTC),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A study's ledger folder, written once: every site spends in every trial, ROUNDS rounds each."""
    from privatune.client.privacy_guard import PrivacyGuard

    folder = tmp_path_factory.mktemp("ledgers")
    for site in ("s1", "s2"):
        guard = PrivacyGuard(folder / site_ledger_filename(site), site, max_epsilon=1000.0, delta=DELTA)
        for run_id, mech in TRIALS.items():
            for rnd in range(1, ROUNDS + 1):
                _spend(guard, run_id, rnd, mech)
    return folder


@pytest.fixture
def ledgers(built, tmp_path):
    """A fresh copy of the built folder for one test; ``ledgers(sites=...)`` keeps only those sites."""

    def copy(sites=("s1", "s2")) -> Path:
        folder = tmp_path / "ledgers"
        folder.mkdir()
        for site in sites:
            name = site_ledger_filename(site)
            shutil.copy2(built / name, folder / name)
        return folder

    return copy


def _record(folder: Path, mean: float = 4.0, distribution: str = "poisson", eta: float = 0.0, **kw):
    from privatune.simulations.tune_privacy import distribution_shape, record_selection

    return record_selection(
        folder,
        kw.pop("study_id", "study-1"),
        kw.pop("run_ids", sorted(TRIALS)),
        distribution=distribution,
        mean=mean,
        shape=distribution_shape(distribution, eta),
        delta=DELTA,
        accountant="rdp",
    )


def _independent(mech: tuple[float, float, int], mean: float, shape: float) -> float:
    """dp-accounting's own RepeatAndSelectDpEvent under its RdpAccountant, built here from the trial's mechanism."""
    sigma, q, steps = mech
    one = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc = RdpAccountant()
    acc.compose(dp_event.RepeatAndSelectDpEvent(dp_accounting.ComposedDpEvent([one] * ROUNDS), mean, shape))
    return float(acc.get_epsilon(DELTA))


def _mismatches(report) -> list[str]:
    return [v.message for v in report.violations if v.kind == "selection-mismatch"]


def _write_forged(folder: Path, site: str = "s1", **changes) -> int:
    """A record written through the ledger (its chain intact) that differs from the honest one in ``changes``."""
    path = folder / site_ledger_filename(site)
    honest = {
        "study_id": "study-1",
        "site_id": site,
        "trial_run_ids": tuple(sorted(TRIALS)),
        "study_trials": len(TRIALS),
        "distribution": "poisson",
        "mean": 4.0,
        "shape": math.inf,
        "delta": DELTA,
        "accountant": "rdp",
        "epsilon": _independent(STRONG, 4.0, math.inf),
    }
    seq, written = SelectionLedger.for_site_ledger(path).record(SelectionRecord(**{**honest, **changes}))
    assert written
    return seq


# -- the record -------------------------------------------------------------------------------------------------


def test_the_record_is_written_once_per_study_beside_each_site_ledger(ledgers, tmp_path):
    folder = ledgers()
    first = _record(folder)
    again = _record(folder)  # a resumed study: its record is found and kept
    assert sorted(first) == ["s1", "s2"]
    assert all(first[s]["written_now"] for s in first) and not any(again[s]["written_now"] for s in again)
    for site in ("s1", "s2"):
        selections = SelectionLedger.for_site_ledger(folder / site_ledger_filename(site))
        assert selections.path == folder / f"site-{site}.selections.sqlite"
        rows = selections.records()
        assert len(rows) == 1 and again[site]["row"] == rows[0][0] == first[site]["row"]
        rec = rows[0][1]
        assert (rec.study_id, rec.site_id, rec.trial_run_ids, rec.study_trials) == ("study-1", site, ("101", "102"), 2)
        assert (rec.distribution, rec.mean, rec.shape, rec.delta) == ("poisson", 4.0, math.inf, DELTA)
        assert verify_chain(selections.path) == []
    # a second study in the same folder is a second row; the site ledger itself is untouched by either
    _record(folder, study_id="study-2")
    assert len(SelectionLedger.for_site_ledger(folder / site_ledger_filename("s1")).records()) == 2
    assert verify_chain(folder / site_ledger_filename("s1")) == []


def test_the_recorded_epsilon_equals_an_independent_dp_accounting_computation(ledgers, tmp_path):
    folder = ledgers()
    for distribution, eta, mean in (("poisson", 0.0, 4.0), ("negative-binomial", 1.0, 6.0)):
        shape = math.inf if distribution == "poisson" else eta
        got = _record(folder, mean, distribution, eta, study_id=f"study-{distribution}")
        theirs = _independent(STRONG, mean, shape)  # the worst trial's curve is STRONG's at every order
        assert got["s1"]["epsilon"] == pytest.approx(theirs, rel=1e-9)
        assert theirs > _independent(WEAK, mean, shape)


def test_a_record_with_bad_fields_is_refused_in_one_line():
    from privatune.common.ledger import LedgerError

    base = {"study_id": "s", "site_id": "s1", "trial_run_ids": ("1",), "study_trials": 1, "delta": DELTA}
    base |= {"accountant": "rdp", "epsilon": 1.0}
    for bad, words in [
        ({"distribution": "poisson", "mean": 4.0, "shape": 2.0}, "infinite for poisson"),
        ({"distribution": "negative-binomial", "mean": 4.0, "shape": math.inf}, "finite for negative-binomial"),
        ({"distribution": "uniform", "mean": 4.0, "shape": math.inf}, "distribution"),
        ({"distribution": "poisson", "mean": 0.5, "shape": math.inf}, "mean"),
    ]:
        with pytest.raises(LedgerError, match=words):
            SelectionRecord(**base, **bad)


# -- the audit --------------------------------------------------------------------------------------------------


def test_the_audit_passes_on_an_honest_ledger_and_says_it_recomputed_the_selection(ledgers, tmp_path):
    folder = ledgers()
    _record(folder)
    report = audit_paths([folder])
    assert report.ok, [v.message for v in report.violations]
    kinds = {Path(f.path).name: f.kind for f in report.files}
    assert kinds["site-s1.selections.sqlite"] == "selections" and kinds["site-s1.ledger.sqlite"] == "site"
    notes = [n for n in report.notes if "private selection over 2 trial(s)" in n]
    assert len(notes) == 2 and all("study 'study-1'" in n for n in notes)
    # a selections file named on its own is audited against the site ledger beside it
    alone = audit_paths([selection_ledger_path(folder / site_ledger_filename("s1"))])
    assert alone.ok and any("private selection" in n for n in alone.notes)


def test_the_audit_fails_on_a_tampered_epsilon(ledgers, tmp_path):
    folder = ledgers()
    _record(folder)
    # edited in the file: the chain names the row
    path = selection_ledger_path(folder / site_ledger_filename("s1"))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE selections SET epsilon = epsilon / 2 WHERE seq = 1")
    report = audit_paths([folder])
    assert any(v.kind == "chain-edited" and v.file == str(path.resolve()) for v in report.violations)
    # written with the chain intact (a writer that claims less): the recomputation names ledger, study and row
    seq = _write_forged(folder, "s2", study_id="study-2", epsilon=_independent(STRONG, 4.0, math.inf) * 0.8)
    found = _mismatches(audit_paths([folder]))
    assert len(found) == 2, found  # the edited row (its epsilon halved) and the forged one
    s2 = [m for m in found if m.startswith("s2:")]
    assert s2 and f"study 'study-2' (selections row {seq})" in s2[0] and "records epsilon" in s2[0]


def test_the_audit_fails_on_a_dropped_trial(ledgers, tmp_path):
    folder = ledgers()
    # the worst trial left out of the record, its epsilon kept: the two trials left do not bear it out
    _write_forged(folder, "s1", trial_run_ids=("101",))
    # a trial run id that never spent at the site
    _write_forged(folder, "s2", trial_run_ids=("101", "102", "999"), study_trials=3)
    report = audit_paths([folder])
    found = _mismatches(report)
    assert any(m.startswith("s1: study 'study-1' (selections row 1)") and "records epsilon" in m for m in found)
    assert any(m.startswith("s2: study 'study-1'") and "999 have no spends in s2's ledger" in m for m in found)
    assert not report.ok


@pytest.mark.parametrize(
    "changes",
    [
        {"mean": 8.0},  # a mean other than the study's: the epsilon recorded is that of mean 4
        {"distribution": "negative-binomial", "shape": 1.0},
        {"delta": 1e-6},
    ],
)
def test_the_audit_fails_on_a_wrong_distribution_parameter(ledgers, changes):
    folder = ledgers(sites=("s1",))
    _write_forged(folder, "s1", **changes)
    report = audit_paths([folder])
    found = _mismatches(report)
    assert len(found) == 1 and "records epsilon" in found[0] and not report.ok, found


def test_a_selections_file_without_its_site_ledger_fails(ledgers, tmp_path):
    folder = ledgers(sites=("s1",))
    _record(folder)
    (folder / site_ledger_filename("s1")).rename(tmp_path / "elsewhere.sqlite")
    report = audit_paths([selection_ledger_path(folder / site_ledger_filename("s1"))])
    assert any("no readable site ledger beside it" in m for m in _mismatches(report))


# -- best-trial.toml and Flower ---------------------------------------------------------------------------------


def test_flowers_own_run_config_parser_takes_best_trial_toml(tmp_path):
    """flwr run --run-config FILE reads a .toml with flwr.common.config.parse_config_args: every key the file holds
    is a run-config key, typed as the run config types it, and the result is a valid RunConfig."""
    from flwr.common.config import parse_config_args

    from privatune.common.config import RunConfig
    from privatune.simulations.tune import write_best_config

    values = {"preset": "digits", "lr": 0.25, "batch-size": 32, "dp": True, "target-epsilon": 4.0, "max-records": 300}
    path = tmp_path / "best-trial.toml"
    write_best_config(path, values, ["a header line"])
    parsed = parse_config_args([str(path)])
    assert parsed == values
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(parsed) <= set(defaults)
    cfg = RunConfig.from_flower({**defaults, **parsed})
    assert (cfg.lr, cfg.batch_size, cfg.preset) == (0.25, 32, "digits")


# -- a whole study (slow) ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def select_study(tmp_path_factory):
    """A tiny private-selection study (digits, 2 clients, 1 round), run and then run again (a resume)."""
    from privatune.simulations.tune import TuneOptions, run_study
    from privatune.simulations.tune_space import build_space

    folder = tmp_path_factory.mktemp("select-study")

    def options():
        return TuneOptions(
            space=build_space(None, ["lr=0.1:0.5:log"]),
            base={"preset": "digits", "target-epsilon": 2.0, "dp": True, "max-records": 200, "num-server-rounds": 1},
            clients=2,
            study_dir=folder,
            sampler="random",
            trials=0,
            pruner="none",
            objective="central",
            privacy="select",
            trials_mean=2.0,
            distribution="negative-binomial",
            nb_shape=1.0,
            seed=5,  # K = 2 trials drawn from this seed
            say=lambda _: None,
        )

    first = run_study(options())
    again = run_study(options())
    return folder, first, again


@pytest.mark.slow
def test_a_select_study_records_its_selection_once_and_the_audit_recomputes_it(select_study):
    folder, first, again = select_study
    cost = first.summary["privacy_cost"]
    records = cost["selection_records"]
    assert first.summary["trials_run"] == 2 and len(records) == 2, records
    assert all(r["written_now"] for r in records.values())
    assert not any(r["written_now"] for r in again.summary["privacy_cost"]["selection_records"].values())
    run_ids = set(cost["trial_run_ids"])
    for site, rec in records.items():
        stored = SelectionLedger(Path(rec["file"])).records()
        assert len(stored) == 1, f"site {site}: {stored}"
        assert set(stored[0][1].trial_run_ids) <= run_ids and stored[0][1].epsilon == rec["epsilon"]
    # the study's total bounds the pointwise worst curve over every site's trials: at least each site's own bound
    assert cost["tuning_epsilon"] >= max(r["epsilon"] for r in records.values()) * (1 - 1e-12)
    report = audit_paths([folder / "ledgers"])
    assert report.ok, [v.message for v in report.violations]
    assert sum("private selection over" in n for n in report.notes) == len(records)


@pytest.mark.slow
def test_best_trial_toml_runs_through_flwr_run(select_study, tmp_path):
    """The issue's "flwr run accepts it": the best trial's file through scripts/flwr_run_local.sh, which hands it
    to Flower's run-config parser and runs `flwr run .` against a local simulation SuperLink."""
    from tests.deploy.harness import MARKER_ENV

    folder, first, _ = select_study
    # central objective, no pruner, K = 2 drawn from the seed: a finished best trial is expected, never skipped
    assert first.summary["best_trial"] is not None, first.summary["trials_by_state"]
    best = folder / "best-trial.toml"
    out = tmp_path / "flwr-out"
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "MPLCONFIGDIR", "RAY_TMPDIR", "APP_DIR")}
    env |= {"HOME": str(tmp_path), MARKER_ENV: uuid.uuid4().hex, "NUM_SUPERNODES": "2"}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "flwr_run_local.sh"), str(out), str(best)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    config = json.loads((out / "config.json").read_text())  # what the ServerApp ran: the best trial's keys
    assert config["lr"] == pytest.approx(first.summary["best_trial"]["params"]["lr"])
    assert config["max-records"] == 200 and config["preset"] == "digits"
