"""privatune tune --total-epsilon and --jobs (issue 14): the calibrated per-trial target reaches the total,
recomputed here with dp-accounting; the refusals; (slow) two trials at once on one study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from privatune.common.accounting import calibrate_noise
from privatune.simulations.tune import TuneOptions
from privatune.simulations.tune_privacy import distribution_shape
from privatune.simulations.tune_space import build_space
from privatune.simulations.tune_total import TotalEpsilonError, apply_total_epsilon, check_trial

ROUNDS, EPOCHS, DELTA, METRICS_NOISE = 2, 2, 1e-5, 20.0
# batch-size above every site's records: sample rate 1 and one step per epoch at every site, so the mechanism a
# trial runs is known here without the sites' data (the calibration itself still asks every site)
BASE = {
    "preset": "digits",
    "dp": True,
    "target-epsilon": 8.0,
    "max-records": 300,
    "num-server-rounds": ROUNDS,
    "local-epochs": EPOCHS,
    "batch-size": 1024,
    "accountant": "rdp",
}


def _opts(tmp_path: Path, privacy: str, total: float, **kw) -> TuneOptions:
    return TuneOptions(
        space=build_space(None, kw.pop("params", ["lr=0.1:0.5:log"])),
        base=dict(BASE),
        clients=2,
        study_dir=tmp_path,
        privacy=privacy,
        total_epsilon=total,
        say=lambda _line: None,
        **kw,
    )


def _trial_event(per_trial: float) -> dp_event.DpEvent:
    """What one trial runs at a site, rebuilt here: training noise from the project's calibration for the whole
    run (ROUNDS x EPOCHS steps at sample rate 1), and one noised metric release (three Gaussian sums) per round."""
    sigma = calibrate_noise(per_trial, DELTA, 1.0, ROUNDS * EPOCHS, "rdp")
    train = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), ROUNDS * EPOCHS)
    release = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(METRICS_NOISE), 3 * ROUNDS)
    return dp_accounting.ComposedDpEvent([train, release])


@pytest.mark.parametrize(("distribution", "eta"), [("poisson", 0.0), ("negative-binomial", 1.0)])
def test_the_per_trial_epsilon_makes_the_selection_bound_the_total(tmp_path, distribution, eta):
    total, mean = 6.0, 5.0
    opts = _opts(tmp_path, "select", total, trials_mean=mean, distribution=distribution, nb_shape=eta)
    apply_total_epsilon(opts)
    cal = opts.calibration
    per_trial = opts.base["target-epsilon"]
    assert per_trial == cal["per_trial_epsilon"] and 0 < per_trial < total
    acc = RdpAccountant()
    acc.compose(dp_event.RepeatAndSelectDpEvent(_trial_event(per_trial), mean, distribution_shape(distribution, eta)))
    independent = float(acc.get_epsilon(DELTA))
    assert independent == pytest.approx(total, rel=1e-3)
    assert independent <= total * (1 + 1e-9)  # never above the total
    assert cal["bound"] == pytest.approx(independent, rel=1e-6)


def test_the_per_trial_epsilon_makes_the_composition_of_the_planned_trials_the_total(tmp_path):
    total, trials = 8.0, 3
    opts = _opts(tmp_path, "compose", total, trials=trials)
    apply_total_epsilon(opts)
    per_trial = opts.base["target-epsilon"]
    acc = RdpAccountant()
    acc.compose(_trial_event(per_trial), trials)
    assert float(acc.get_epsilon(DELTA)) == pytest.approx(total, rel=1e-3)
    one = RdpAccountant()
    one.compose(_trial_event(per_trial))
    assert float(one.get_epsilon(DELTA)) < total * 0.75  # one trial alone costs well under the total
    assert per_trial < total and opts.calibration["trials_counted"] == trials


def test_a_resumed_study_reuses_its_calibration(tmp_path, monkeypatch):
    import privatune.simulations.tune_total as tune_total
    from privatune.simulations.tune import open_study

    first = _opts(tmp_path, "compose", 8.0, trials=3)
    apply_total_epsilon(first)
    open_study(first)  # the study keeps its calibration in study.db
    monkeypatch.setattr(tune_total, "calibrate", lambda *a: pytest.fail("a resumed study calibrated again"))
    again = _opts(tmp_path, "compose", 8.0, trials=3)
    apply_total_epsilon(again)
    assert again.base["target-epsilon"] == first.base["target-epsilon"]
    assert open_study(again).user_attrs["calibration"]["per_trial_epsilon"] == first.calibration["per_trial_epsilon"]


def test_public_tuning_gives_the_total_to_the_final_private_run(tmp_path):
    opts = _opts(tmp_path, "public", 3.0, tuning_data="proxy.npz")
    apply_total_epsilon(opts)
    assert opts.base["target-epsilon"] == 3.0 and opts.calibration["per_trial_epsilon"] == 3.0


def test_a_trial_costing_more_than_the_calibrated_worst_is_refused(tmp_path):
    from dataclasses import replace

    from privatune.simulations.tune import trial_config

    opts = _opts(tmp_path, "compose", 8.0, trials=2)
    apply_total_epsilon(opts)
    cfg = trial_config(opts, {"lr": 0.2}, 0, "s")
    assert check_trial(opts.calibration, cfg, 2) == ""
    more = replace(cfg, num_server_rounds=ROUNDS + 2)  # a key the calibration did not enumerate, changed
    assert "costs more than the worst one" in check_trial(opts.calibration, more, 2)


def test_sites_that_differ_are_bounded_by_the_worst_of_their_curves():
    """Two sites of 100 and 40 training records at batch 32: other sample rates and steps; the bound is the pointwise
    largest of their curves, each rebuilt here from the project's calibration with dp-accounting."""
    from privatune.client.privacy_guard import plan_noise
    from privatune.common.config import RunConfig
    from privatune.simulations.tune_privacy import ORDERS
    from privatune.simulations.tune_total import worst_curve

    cfg = RunConfig.from_flower({**BASE, "batch-size": 32, "release-metrics": False, "target-epsilon": 1.0})
    ours = worst_curve([(cfg, [(DELTA, 100), (DELTA, 40)])], 1.0)
    curves = []
    for n in (100, 40):
        q, steps = 1 / math.ceil(n / 32), ROUNDS * EPOCHS * math.ceil(n / 32)
        sigma = plan_noise(cfg, n, DELTA)  # the site's own calibration (calibrate_noise, memoised)
        acc = RdpAccountant(list(ORDERS))
        acc.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
        )
        curves.append(acc._rdp)
    theirs = [max(a, b) for a, b in zip(*curves, strict=True)]
    assert list(ours) == pytest.approx(theirs, rel=1e-12)
    assert any(a > b for a, b in zip(*curves, strict=True)) and any(a < b for a, b in zip(*curves, strict=True))


def test_the_terminal_says_the_per_trial_epsilon_and_the_total(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import privatune.simulations.tune as tune
    from privatune.cli import app

    seen = {}

    def fake_study(opts):
        seen["opts"] = opts
        cost = {
            "privacy": "select",
            "total_epsilon_including_tuning": 7.9991,
            "delta": 1e-5,
            "how": "h",
            "total_epsilon_given": 8.0,
            "per_trial_epsilon": 3.2109,
            "calibrated_bound": 7.9991,
            "calibration": "c",
        }
        summary = {"study_id": "s", "trials_run": 0, "trials_planned": 0, "trials_by_state": {}}
        return tune.StudyResult({**summary, "best_trial": None, "privacy_cost": cost, "stopped_for_budget": ""})

    monkeypatch.setattr(tune, "run_study", fake_study)
    args = ["tune", "--study", str(tmp_path / "s"), "--param", "lr=0.1:1", "--total-epsilon", "8", "--jobs", "2"]
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, [*args, "--privacy", "select"])
    assert result.exit_code == 0, result.output
    opts = seen["opts"]
    assert opts.total_epsilon == 8.0 and opts.jobs == 2 and opts.base["dp"] is True
    assert "each trial ran at target epsilon 3.2109" in result.output
    assert "total epsilon including tuning 7.999" in result.output


@pytest.mark.parametrize(
    ("privacy", "kw", "words"),
    [
        ("compose", {"trials": 0}, "needs a planned number of trials"),
        ("compose", {"trials": 2, "params": ["target-epsilon=1,2"]}, "cannot search target-epsilon"),
        ("compose", {"trials": 2, "params": ["num-server-rounds=1:100"]}, "are over 64 to bound"),
        ("compose", {"trials": 50}, "raise --total-epsilon, or plan fewer trials"),
    ],
)
def test_a_total_that_cannot_be_calibrated_is_one_clear_error(tmp_path, privacy, kw, words):
    total = 0.05 if kw.get("trials") == 50 else 8.0
    with pytest.raises(TotalEpsilonError, match="--total-epsilon") as err:
        apply_total_epsilon(_opts(tmp_path, privacy, total, **kw))
    assert words in str(err.value)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--total-epsilon", "8", "--epsilon", "4"], "--total-epsilon and --epsilon: give one"),
        (["--total-epsilon", "-1"], "--total-epsilon must be a finite number > 0"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--jobs", "2", "--run-config", "sim-max-epsilon=5"], "--jobs 2 with a site budget"),
    ],
)
def test_bad_total_epsilon_and_jobs_options_are_one_line_errors(args, words, tmp_path):
    from typer.testing import CliRunner

    from privatune.cli import app

    result = CliRunner(env={"COLUMNS": "300"}).invoke(
        app, ["tune", "--study", str(tmp_path / "s"), "--param", "lr=0.1:1", *args]
    )
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not (tmp_path / "s").exists()  # refused before the study folder is made


# -- two trials at once (slow) ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_trials_run_at_once_and_each_spends_once_in_the_ledgers(tmp_path):
    from privatune.simulations.tune import run_study
    from privatune.simulations.tune_privacy import trial_spends

    said: list[str] = []
    opts = TuneOptions(
        space=build_space(None, ["lr=0.1,0.3"]),
        base={"preset": "digits", "target-epsilon": 4.0, "dp": True, "max-records": 120, "num-server-rounds": 1},
        clients=2,
        study_dir=tmp_path / "study",
        sampler="grid",
        trials=2,
        pruner="none",
        objective="central",
        jobs=2,
        say=said.append,
    )
    result = run_study(opts)
    rows = result.trials
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows), rows
    assert sorted(r["param:lr"] for r in rows) == [0.1, 0.3]  # the grid's two points, one each
    run_ids = {r["run_id"] for r in rows}
    assert len(run_ids) == 2 and None not in run_ids
    spends = trial_spends(opts.study_dir / "ledgers")
    assert sorted(spends) == ["client-0", "client-1"]
    for site, runs in spends.items():
        assert set(runs) == run_ids, site
        for rid, entries in runs.items():  # one round, one training spend per trial and site: recorded once
            assert [e.round for e in entries] == [1], (site, rid)
    for path in (opts.study_dir / "ledgers").glob("*.ledger.sqlite"):
        from privatune.common.ledger import SiteLedger

        assert SiteLedger(path).verify() == [], path  # both trials' appends left one whole chain
    table = json.loads((opts.study_dir / "trials.json").read_text())
    assert {r["number"] for r in table} == {0, 1}
    assert math.isfinite(result.summary["privacy_cost"]["total_epsilon_including_tuning"])
