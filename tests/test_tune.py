"""privatune tune (issue 14): the search space, the private-selection epsilon, pruning, and (slow) a whole study:
its spends in the sites' ledgers, resuming, the best-trial config through simulate --config, the budget stop."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from privatune.cli.inputs import UsageError, read_run_config_file
from privatune.server.run_record import RoundReport
from privatune.server.stop_policy import FederationStopped
from privatune.simulations.tune_privacy import distribution_shape, dp_event_of, draw_trial_count, selection_epsilon
from privatune.simulations.tune_space import SpaceError, build_space, grid_space, param_from_cli, space_from_toml

ROOT = Path(__file__).resolve().parents[1]


# -- the search space -------------------------------------------------------------------------------------------


def test_a_toml_space_takes_each_keys_run_config_type(tmp_path):
    f = tmp_path / "space.toml"
    f.write_text(
        '[lr]\nlow = 1e-3\nhigh = 1\nlog = true\n[batch-size]\nchoices = [16, 32, 64]\n[mode]\nchoices = ["head", "lora"]\n'
    )
    lr, bs, mode = space_from_toml(f)
    assert (lr.key, lr.kind, lr.low, lr.high, lr.log) == ("lr", "float", 1e-3, 1.0, True)
    assert bs.choices == (16, 32, 64) and all(type(c) is int for c in bs.choices)
    assert mode.choices == ("head", "lora")
    assert grid_space([bs, mode]) == {"batch-size": [16, 32, 64], "mode": ["head", "lora"]}


def test_cli_params_read_ranges_and_choices_typed():
    lr = param_from_cli("lr=1e-3:1:log")
    assert (lr.low, lr.high, lr.log, lr.is_range) == (1e-3, 1.0, True, True)
    epochs = param_from_cli("local-epochs=1:4")
    assert epochs.kind == "int" and epochs.grid() == [1, 2, 3, 4]
    freeze = param_from_cli("lora-freeze-a=true,false")
    assert freeze.choices == (True, False)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("learning-rate=1e-3:1", "learning-rate: not a run-config key"),
        ("mode=head:lora", "a str key takes choices, not a range"),
        ("lr=1:0.1", "low must be below high"),
        ("lr=0:1:log", "a log range needs low > 0"),
        ("batch-size=16.5,32", "cannot read '16.5' as int"),
        ("lr=1e-3:1:linear", "LOW:HIGH or LOW:HIGH:log"),
        ("lr", "write KEY=LOW:HIGH[:log] or KEY=A,B,C"),
        ("out-dir=a,b", "the study sets it for every trial"),
    ],
)
def test_a_bad_cli_param_is_one_clear_error(text, words):
    with pytest.raises(SpaceError, match="--param") as err:
        param_from_cli(text)
    assert words in str(err.value)


def test_bad_toml_spaces_name_the_file_and_key(tmp_path):
    f = tmp_path / "s.toml"
    for text, words in [
        ("lr = 0.5\n", "lr: write a table per key"),
        ("[lr]\nlow = 0.1\nhigh = 1\nchoices = [0.1]\n", "either choices or low/high"),
        ("[lr]\nlow = 0.1\n", "needs both low and high"),
        ("[lr]\nlow = 0.1\nhigh = 1\nlog = 'yes'\n", "log must be true or false"),
        ("[batch-size]\nchoices = []\n", "non-empty list"),
        ("[lr]\nlow = 0.1\nhigh = 1\nmean = 3\n", "unknown field(s) mean"),
        ("[lr\n", "not valid TOML"),
    ]:
        f.write_text(text)
        with pytest.raises(SpaceError) as err:
            space_from_toml(f)
        assert str(f) in str(err.value) and words in str(err.value), str(err.value)


def test_a_key_searched_twice_or_an_empty_space_is_refused(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[lr]\nlow = 0.1\nhigh = 1\n")
    with pytest.raises(SpaceError, match="lr: searched twice"):
        build_space(f, ["lr=0.2,0.3"])
    with pytest.raises(SpaceError, match="the search space is empty"):
        build_space(None, [])
    with pytest.raises(SpaceError, match="grid sampler needs a finite set"):
        grid_space(build_space(f, []))


def test_a_run_config_file_is_flat_run_config_keys(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("lr = 0.25\nbatch-size = 16\n")
    assert read_run_config_file(f) == {"lr": 0.25, "batch-size": 16}
    f.write_text("[tool]\nx = 1\n")
    with pytest.raises(UsageError, match="tables \\[tool\\] are not run-config keys"):
        read_run_config_file(f)
    f.write_text('out-dir = "x"\n')
    with pytest.raises(UsageError, match="out-dir cannot come from a file"):
        read_run_config_file(f)


# -- private selection ------------------------------------------------------------------------------------------


def _spends(sigma: float, q: float, steps: int, rounds: int = 2) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(noise_multiplier=sigma, sample_rate=q, steps=steps, run_id="r", round=r + 1)
        for r in range(rounds)
    ]


def _independent(sigma: float, q: float, steps: int, rounds: int, mean: float, shape: float, delta: float) -> float:
    """dp-accounting's own RepeatAndSelectDpEvent under its RDP accountant, built here from the mechanism."""
    one = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    trial = dp_accounting.ComposedDpEvent([one] * rounds)
    acc = RdpAccountant()
    acc.compose(dp_event.RepeatAndSelectDpEvent(trial, mean, shape))  # not exported at the top in 0.6.0
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(
    ("distribution", "eta"), [("poisson", 0.0), ("negative-binomial", 1.0), ("negative-binomial", 0.5)]
)
def test_the_selection_epsilon_equals_dp_accountings_repeat_and_select(distribution, eta):
    shape = distribution_shape(distribution, eta)
    sigma, q, steps, rounds, mean, delta = 1.1, 0.05, 40, 2, 8.0, 1e-5
    ours = selection_epsilon([dp_event_of(_spends(sigma, q, steps, rounds))], mean, shape, delta)
    theirs = _independent(sigma, q, steps, rounds, mean, shape, delta)
    assert ours == pytest.approx(theirs, rel=1e-9)
    # the selection costs more than one trial and (for these means) less than composing the mean number of trials
    acc = RdpAccountant()
    acc.compose(dp_event_of(_spends(sigma, q, steps, rounds)))
    single = float(acc.get_epsilon(delta))
    acc8 = RdpAccountant()
    acc8.compose(dp_event_of(_spends(sigma, q, steps, rounds * 8)))
    assert single < ours < float(acc8.get_epsilon(delta))


def test_the_selection_bound_takes_the_worst_trial():
    """Trials with other hyperparameters: the bound is that of the trial with the largest RDP curve."""
    shape = distribution_shape("poisson", 0)
    weak, strong = _spends(2.0, 0.02, 20), _spends(1.2, 0.05, 40)
    both = selection_epsilon([dp_event_of(weak), dp_event_of(strong)], 5.0, shape, 1e-5)
    assert both == pytest.approx(_independent(1.2, 0.05, 40, 2, 5.0, shape, 1e-5), rel=1e-9)
    assert both > _independent(2.0, 0.02, 20, 2, 5.0, shape, 1e-5)


def test_a_non_private_trial_has_no_selection_epsilon():
    with pytest.raises(ValueError, match="non-private spend"):
        dp_event_of(_spends(0.0, 0.1, 5))


@pytest.mark.parametrize(
    ("distribution", "eta"), [("poisson", 0.0), ("negative-binomial", 1.0), ("negative-binomial", 2.0)]
)
def test_the_number_of_trials_has_the_mean_asked_for(distribution, eta):
    shape = distribution_shape(distribution, eta)
    draws = np.array([draw_trial_count(6.0, shape, seed) for seed in range(3000)])
    assert abs(draws.mean() - 6.0) < 0.3
    if not math.isinf(shape):
        assert draws.min() >= 1  # truncated: at least one trial
    assert draw_trial_count(6.0, shape, 11) == draw_trial_count(6.0, shape, 11)  # the study's seed fixes it


def test_bad_selection_settings_are_refused():
    with pytest.raises(ValueError, match="--nb-shape"):
        distribution_shape("negative-binomial", 0)
    with pytest.raises(ValueError, match="--trials-distribution"):
        distribution_shape("binomial", 1)
    with pytest.raises(ValueError, match="--trials-mean"):
        draw_trial_count(0.5, math.inf, 1)


# -- pruning ----------------------------------------------------------------------------------------------------


class _Trial:
    def __init__(self, prune_at: int):
        self.number, self.prune_at, self.reported = 3, prune_at, []

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return len(self.reported) >= self.prune_at


def test_each_rounds_validation_figure_goes_to_the_trial_and_pruning_stops_the_run():
    from privatune.common.protocol import KEY_FED_ACCURACY
    from privatune.simulations.tune import _Pruning

    trial, said = _Trial(prune_at=2), []
    obs = _Pruning(trial, KEY_FED_ACCURACY, said.append)
    obs(RoundReport(round=0))  # before training: nothing to report
    obs(RoundReport(round=1, federated={KEY_FED_ACCURACY: 0.4}))
    with pytest.raises(FederationStopped, match="pruned by privatune tune after round 2"):
        obs(RoundReport(round=2, federated={KEY_FED_ACCURACY: 0.3}))
    assert trial.reported == [(1, 0.4), (2, 0.3)] and obs.pruned_at == 2


def test_the_median_pruner_waits_for_three_trials_and_a_second_round():
    import optuna

    from privatune.simulations.tune import _pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def slow_starter_pruned_at(finished_trials: int) -> int | None:
        study = optuna.create_study(direction="maximize", pruner=_pruner("median"))
        for values in [(0.8, 0.9), (0.7, 0.85), (0.75, 0.8)][:finished_trials]:
            trial = study.ask()
            for step, value in enumerate(values, start=1):
                trial.report(value, step)
            study.tell(trial, values[-1])
        trial = study.ask()
        for step, value in enumerate((0.1, 0.2), start=1):
            trial.report(value, step)
            if trial.should_prune():
                return step
        return None

    assert slow_starter_pruned_at(1) is None  # one finished trial is no median
    assert slow_starter_pruned_at(2) is None  # two are not either
    assert slow_starter_pruned_at(3) == 2  # three are; round 1 alone never prunes


# -- a whole study (slow) ---------------------------------------------------------------------------------------

BUDGET = 6.0  # two trials at epsilon 4 compose to about 5.4; a third would pass it


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study interrupted after its first trial (and with a trial left running), then resumed; the site budget
    stops it before the trial that would pass it."""
    from privatune.simulations.tune import TuneOptions, run_study

    folder = tmp_path_factory.mktemp("study")
    base = {
        "preset": "digits",
        "target-epsilon": 4.0,
        "dp": True,
        "max-records": 300,
        "num-server-rounds": 1,
        "sim-max-epsilon": BUDGET,
    }
    said: list[str] = []

    def options(hook=None):
        return TuneOptions(
            space=build_space(None, ["lr=0.1:0.5:log", "batch-size=16,32"]),
            base=dict(base),
            clients=2,
            study_dir=folder,
            sampler="random",
            trials=4,
            pruner="none",
            # the server's central score: the sites' noised validation count (a few dozen records, noise multiplier
            # 20) can come out <= 0, which leaves a trial with no figure; this study tests resume and budgets
            objective="central",
            after_trial=hook,
            say=said.append,
        )

    def interrupt(st):
        st.ask()  # a trial left RUNNING, as a study killed in the middle of one leaves it
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(options(interrupt))
    first = json.loads((folder / "trials" / "trial-0000" / "summary.json").read_text())
    first_mtime = (folder / "trials" / "trial-0000" / "summary.json").stat().st_mtime_ns
    result = run_study(options())
    return SimpleNamespace(folder=folder, result=result, first=first, first_mtime=first_mtime, said=said)


@pytest.mark.slow
def test_an_interrupted_study_resumes_without_rerunning_finished_trials(study):
    rows = {r["number"]: r for r in study.result.trials}
    assert rows[0]["state"] == "COMPLETE" and rows[0]["run_id"] == study.first["run_id"]
    assert (study.folder / "trials" / "trial-0000" / "summary.json").stat().st_mtime_ns == study.first_mtime
    assert rows[1]["state"] == "FAIL" and rows[1]["status"] == "interrupted"
    assert rows[2]["state"] == "COMPLETE"
    assert sorted(p.name for p in (study.folder / "trials").iterdir()) == ["trial-0000", "trial-0002"]
    assert any("2 of 4 trial(s) already run" in line for line in study.said)  # one finished, one interrupted


@pytest.mark.slow
def test_every_trials_spend_is_in_the_site_ledgers_with_its_study(study):
    from privatune.simulations.tune_privacy import trial_spends

    ran = {r["run_id"] for r in study.result.trials if r["run_id"]}
    assert len(ran) == 2
    spends = trial_spends(study.folder / "ledgers")
    assert sorted(spends) == ["client-0", "client-1"]
    for site, runs in spends.items():
        assert set(runs) == ran, site  # every trial spent at every site, and nothing else is in the study's ledgers
    cost = study.result.summary["privacy_cost"]
    assert cost["privacy"] == "compose" and set(cost["trial_run_ids"]) == ran
    # the study's total is the sites' ledger composition, and it composes both trials (more than either alone)
    per_trial = [r["max_client_epsilon"] for r in study.result.trials if r["run_id"]]
    assert cost["total_epsilon_including_tuning"] == max(cost["ledger_composition_per_site"].values())
    assert cost["total_epsilon_including_tuning"] > max(per_trial)
    assert (study.folder / "trials.csv").read_text().count("\n") == 5  # header + four trials
    assert {p.name for p in study.folder.glob("*.png")} >= {"optimization-history.png", "parallel-coordinate.png"}


@pytest.mark.slow
def test_a_study_stops_before_a_site_budget_is_passed(study):
    rows = {r["number"]: r for r in study.result.trials}
    refused = study.result.summary["stopped_for_budget"]
    assert refused.startswith("trial 3 ") and "would pass a site's budget" in refused
    assert rows[3]["state"] == "FAIL" and rows[3]["budget_refused"] and rows[3]["run_id"] is None
    assert max(study.result.summary["privacy_cost"]["ledger_composition_per_site"].values()) <= BUDGET


@pytest.mark.slow
def test_the_best_trial_config_runs_through_simulate_config(study, tmp_path):
    best = study.result.summary["best_trial"]
    toml = Path(best["config"])
    text = toml.read_text()
    assert "out-dir" not in text and "sim-ledger-dir" not in text and "release-metrics" not in text
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "final"
    proc = subprocess.run(
        [sys.executable, "-m", "privatune.cli", "simulate", "--config", str(toml), "--clients", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == pytest.approx(best["params"]["lr"]) and cfg["batch-size"] == best["params"]["batch-size"]
    assert cfg["preset"] == "digits" and cfg["num-server-rounds"] == 1 and cfg["target-epsilon"] == 4.0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--privacy", "public"], "--tuning-data PATH goes with --privacy public"),
        (["--privacy", "secret", "--param", "lr=0.1:1"], "--privacy must be one of public, select, compose"),
        (["--param", "lr=1:0.1"], "low must be below high"),
        (["--privacy", "select", "--trials-mean", "0.5", "--param", "lr=0.1:1"], "--trials-mean must be >= 1"),
    ],
)
def test_bad_tune_options_are_one_line_errors(args, words, tmp_path):
    from typer.testing import CliRunner

    from privatune.cli import app

    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["tune", "--study", str(tmp_path / "s"), *args])
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not (tmp_path / "s").exists()  # refused before the study folder is made


def test_public_tuning_costs_the_private_data_only_its_final_run(tmp_path):
    from privatune.simulations.tune import TuneOptions, best_config, privacy_totals

    opts = TuneOptions(
        space=build_space(None, ["lr=0.1:1"]),
        base={
            "preset": "digits",
            "target-epsilon": 3.0,
            "dp": True,
            "max-records": "300",
            "sim-data": "p.npz",
            "labels": "a,b",
        },
        clients=2,
        study_dir=tmp_path,
        privacy="public",
        tuning_data="proxy.npz",
    )
    best = best_config(opts, {"lr": 0.3}, opts.added)
    # the final run trains on the private data: no tuning data, no study-added release, numbers typed
    assert best == {"preset": "digits", "target-epsilon": 3.0, "dp": True, "max-records": 300, "lr": 0.3}
    cost = privacy_totals(SimpleNamespace(user_attrs={}), opts, [], best)
    assert cost["tuning_epsilon_on_private_data"] == 0.0
    assert cost["total_epsilon_including_tuning"] == cost["final_private_run_epsilon"] == 3.0
