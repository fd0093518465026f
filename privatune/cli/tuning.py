"""`privatune tune`: a hyperparameter study of simulated federations that accounts its privacy cost
(privatune/simulations/tune.py; docs/tuning.md)."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from privatune.cli.inputs import UsageError, check_resources, parse_kv, read_run_config_file
from privatune.cli.terminal import console


def tune(
    space: Path | None = typer.Option(None, "--space", help="a TOML search space: [lr] low=1e-3 high=1 log=true ..."),
    param: list[str] = typer.Option(
        [], "--param", help="a searched key: KEY=LOW:HIGH[:log] or KEY=A,B,C (repeat the option)"
    ),
    study: Path = typer.Option(Path("runs/study"), "--study", help="the study folder (study.db: run again to resume)"),
    sampler: str = typer.Option("tpe", "--sampler", help="grid | random | tpe | gp"),
    trials: int = typer.Option(10, "--trials", help="trials in all (public, compose; 0 with grid = the whole grid)"),
    privacy: str = typer.Option("compose", "--privacy", help="public | select | compose: how tuning's cost counts"),
    trials_mean: float = typer.Option(10.0, "--trials-mean", help="select: the mean of the random number of trials"),
    trials_distribution: str = typer.Option(
        "poisson", "--trials-distribution", help="select: poisson | negative-binomial (truncated)"
    ),
    nb_shape: float = typer.Option(1.0, "--nb-shape", help="select, negative-binomial: its shape eta (1 = geometric)"),
    tuning_data: Path | None = typer.Option(
        None, "--tuning-data", help="public: the public or proxy data the trials train on (as simulate --data)"
    ),
    pruner: str = typer.Option("median", "--pruner", help="median | none: stop weak trials by round"),
    objective: str = typer.Option(
        "federated", "--objective", help="federated (sites' noised validation accuracy) | central (server's test)"
    ),
    preset: str = typer.Option("sms-spam", help="the preset every trial starts from"),
    clients: int = typer.Option(10, help="simulated clients per trial"),
    epsilon: str = typer.Option("", help="each trial's target epsilon per client (default 8); 'inf' = no DP"),
    total_epsilon: float = typer.Option(
        0.0, "--total-epsilon", help="the study's total epsilon including tuning: each trial's target is calibrated"
    ),
    jobs: int = typer.Option(1, "--jobs", help="trials at once, each in its own process (no site budget)"),
    seed: int = typer.Option(42, help="study and simulation seed (>= 0)"),
    config: Path | None = typer.Option(None, "--config", help="a TOML file of run-config keys every trial shares"),
    run_config: str = typer.Option(
        "", "--run-config", help='run-config keys every trial shares, e.g. "max-records=200"'
    ),
    client_cpus: float = typer.Option(1.0, "--client-cpus", help="CPU cores per simulated client"),
) -> None:
    """Search hyperparameters with Optuna, each trial a simulated federation, and report what tuning cost in
    privacy: the trials table (CSV, JSON), the best trial as a run-config TOML, Optuna's plots, study-summary.json."""
    from privatune.simulations.tune import TuneOptions, run_study
    from privatune.simulations.tune_privacy import PRIVACY_MODES
    from privatune.simulations.tune_space import build_space

    if privacy not in PRIVACY_MODES:
        raise UsageError(f"--privacy must be one of {', '.join(PRIVACY_MODES)}, got '{privacy}'")
    if (tuning_data is not None) != (privacy == "public"):
        raise UsageError("--tuning-data PATH goes with --privacy public (and public tuning needs it)")
    if clients < 1 or seed < 0:
        raise UsageError("--clients must be >= 1 and --seed >= 0")
    if privacy == "select" and not trials_mean >= 1:
        raise UsageError(f"--trials-mean must be >= 1, got {trials_mean}")
    check_resources(client_cpus, 0.0)
    if total_epsilon and epsilon:
        raise UsageError("--total-epsilon and --epsilon: give one (with the total, the study calibrates each trial's)")
    if total_epsilon and not 0 < total_epsilon < math.inf:
        raise UsageError(f"--total-epsilon must be a finite number > 0, got {total_epsilon:g}")
    try:
        eps = total_epsilon or (math.inf if epsilon.strip().lower() in ("inf", "infinity") else float(epsilon or 8))
    except ValueError:
        raise UsageError(f"--epsilon must be a number or 'inf', got {epsilon!r}") from None
    base: dict[str, object] = {"preset": preset, "target-epsilon": eps, "dp": not math.isinf(eps), "seed": seed}
    if config is not None:
        base.update(read_run_config_file(config))
    base.update(parse_kv(run_config))
    from privatune.simulations.tune_parallel import check_jobs

    refused = check_jobs(jobs, float(str(base.get("sim-max-epsilon", 0)) or 0))
    if refused:
        raise UsageError(refused)
    params = build_space(space, list(param))
    if tuning_data is not None:
        from privatune.cli.own_data import load_own_data, write_copy
        from privatune.common.config import RunConfig

        model = RunConfig.from_flower({**base, "labels": "label-0,label-1"}).model
        own = load_own_data(
            tuning_data,
            None,
            fmt="",
            text_column="text",
            label_column="label",
            labels="",
            model=model,
            model_option=f"--preset {preset}",
        )
        study.mkdir(parents=True, exist_ok=True)
        base.update({"sim-data": str(write_copy(own, study)), "labels": ",".join(own.data.label_names)})
    opts = TuneOptions(
        space=params,
        base=base,
        clients=clients,
        study_dir=study,
        sampler=sampler,
        trials=trials,
        privacy=privacy,
        trials_mean=trials_mean,
        distribution=trials_distribution,
        nb_shape=nb_shape,
        pruner=pruner,
        objective=objective,
        seed=seed,
        client_cpus=client_cpus,
        tuning_data=str(tuning_data or ""),
        total_epsilon=total_epsilon,
        jobs=jobs,
        say=lambda line: console.print(line, highlight=False, soft_wrap=True),
    )
    result = run_study(opts)
    s = result.summary
    cost = s["privacy_cost"]
    console.print(
        f"study {s['study_id']}: {s['trials_run']} of {s['trials_planned']} trial(s) run "
        f"({', '.join(f'{n} {k.lower()}' for k, n in s['trials_by_state'].items())})",
        highlight=False,
    )
    if s["best_trial"]:
        b = s["best_trial"]
        console.print(
            f"best: trial {b['number']} ({objective} accuracy {b['value']:.4f}) -> {b['config']}", highlight=False
        )
    if "per_trial_epsilon" in cost:
        console.print(
            f"--total-epsilon {cost['total_epsilon_given']:g}: each trial ran at target epsilon "
            f"{cost['per_trial_epsilon']:.4f} (calibrated bound {cost['calibrated_bound']:.4f}; {cost['calibration']})",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"privacy ({cost['privacy']}): total epsilon including tuning {cost['total_epsilon_including_tuning']:.3f} "
        f"at delta {cost['delta']:g}; {cost['how']}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"outputs: {study}/trials.csv, trials.json, study-summary.json, *.png", highlight=False)
    if s["stopped_for_budget"]:
        raise typer.Exit(1)
