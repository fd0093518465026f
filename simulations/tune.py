"""``privatune tune``: an Optuna study whose trials are simulated federations, and what the study cost in privacy.

Each trial is one ``run_simulation`` (the code path of ``privatune simulate``) in STUDY/trials/trial-NNNN, with its
sites' ledgers in STUDY/ledgers: one ledger folder for the whole study, so every trial's spend composes there, a
site budget (sim-max-epsilon) stops the study, and each spend row carries the trial's run id (kept with the trial
in the study). The study itself lives in STUDY/study.db (Optuna's SQLite storage): run the command again on the
same folder and it goes on from the trials already finished.

Pruning: the round printer's hook (the observer each finished round is handed to) reports the round's validation
figure to the trial; a trial its pruner prunes ends the simulation there (``FederationStopped``, the run's own clean
early stop: status "stopped", the last global model stands), and what it spent so far stays in the ledgers.
"""

from __future__ import annotations

import csv
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.config import ConfigError, RunConfig
from privatune.common.protocol import KEY_CENTRAL_ACCURACY, KEY_FED_ACCURACY
from privatune.server.run_record import RoundReport, write_json_atomic
from privatune.server.stop_policy import FederationStopped
from privatune.simulations.tune_privacy import (
    composed_epsilon,
    distribution_shape,
    dp_event_of,
    draw_trial_count,
    record_selection,
    selection_epsilon,
    trial_spends,
)
from privatune.simulations.tune_space import STUDY_KEYS, Param, grid_space

SAMPLERS = ("grid", "random", "tpe", "gp")
PRUNERS = ("median", "none")
# What a trial is scored on: the sites' released, noised validation accuracy (release-metrics=true: the release
# is a spend in their ledgers), or the server's test accuracy where it holds the task's test data (selecting on a
# test set makes that set's figure optimistic).
OBJECTIVES = {"federated": KEY_FED_ACCURACY, "central": KEY_CENTRAL_ACCURACY}
STUDY_NAME = "privatune"
BEST_CONFIG = "best-trial.toml"


class TuneError(ValueError):
    """A study that cannot go on; the message names the folder or option and the fix."""


@dataclass
class TuneOptions:
    space: list[Param]
    base: dict[str, Any]  # run-config values every trial shares (kebab-case keys)
    clients: int
    study_dir: Path
    sampler: str = "tpe"
    trials: int = 10  # public and compose: trials in all (0 with grid: the whole grid)
    privacy: str = "compose"
    trials_mean: float = 10.0  # select: the mean of the random number of trials
    distribution: str = "poisson"
    nb_shape: float = 1.0
    pruner: str = "median"
    objective: str = "federated"
    seed: int = 42
    client_cpus: float = 1.0
    tuning_data: str = ""  # public: what the trials trained on (for the summary)
    after_trial: Callable[[Any], None] | None = None  # tests: a hook after each finished trial
    say: Callable[[str], None] = print
    added: set[str] = field(default_factory=set)  # keys the study set in base itself (not in the best config)
    # issue 14, --total-epsilon and --jobs (simulations/tune_total.py, tune_parallel.py)
    total_epsilon: float = 0.0  # 0: each trial runs at base's target-epsilon; else the study's total, calibrated
    calibration: dict[str, Any] | None = None  # what tune_total.calibrate found (set once, before the study)
    jobs: int = 1  # trials at once, each in its own worker process
    worker: int = 0  # which worker (its sampler's seed is seed + worker)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise TuneError(f"--objective must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'")
        if self.objective == "federated" and "release-metrics" not in self.base:
            # the sites release noised validation sums each round: the score pruning and selection use
            self.base = {**self.base, "release-metrics": True}
            self.added.add("release-metrics")
        if self.privacy == "public":
            self.added |= {"sim-data", "labels"}  # the final run trains on the private data (simulate --data)

    def settings(self) -> dict[str, Any]:
        """What a resumed study must share with the one it resumes."""
        return {
            "space": [vars(p) | {"choices": list(p.choices)} for p in self.space],
            "base": self.base,
            "clients": self.clients,
            "sampler": self.sampler,
            "privacy": self.privacy,
            "trials_mean": self.trials_mean if self.privacy == "select" else None,
            "distribution": self.distribution if self.privacy == "select" else None,
            "nb_shape": self.nb_shape if self.privacy == "select" else None,
            "objective": self.objective,
            "seed": self.seed,
            "total_epsilon": self.total_epsilon or None,
        }


@dataclass
class StudyResult:
    summary: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)


def _sampler(opts: TuneOptions) -> Any:
    import optuna

    if opts.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(opts.space), seed=opts.seed)
    if opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=opts.seed + opts.worker)
    if opts.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=opts.seed + opts.worker)
    if opts.sampler == "gp":
        return optuna.samplers.GPSampler(seed=opts.seed + opts.worker)
    raise TuneError(f"--sampler must be one of {', '.join(SAMPLERS)}, got '{opts.sampler}'")


# The median pruner compares a trial's round with the median of finished trials at that round. With one start-up
# trial and no warm-up it stopped most trials after round 1 of a small study (docs/benchmarks.md, TREC-6 tuning):
# a DP round-1 figure is noisy and slow starters never got a second round. Three finished trials and one round of
# warm-up before any pruning.
PRUNER_STARTUP_TRIALS = 3
PRUNER_FIRST_ROUND = 2  # rounds are Optuna's steps, from 1; it prunes from step n_warmup_steps on


def _pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_FIRST_ROUND)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise TuneError(f"--pruner must be one of {', '.join(PRUNERS)}, got '{name}'")


def open_study(opts: TuneOptions) -> Any:
    """Create the study in STUDY/study.db, or load it (refused when it was made with other settings)."""
    import optuna

    opts.study_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(opts.study_dir / 'study.db').resolve()}"
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=_sampler(opts),
        pruner=_pruner(opts.pruner),
    )
    settings = json.loads(json.dumps(opts.settings(), default=str))
    attrs = study.user_attrs
    if "study_id" not in attrs:
        study.set_user_attr("study_id", uuid.uuid4().hex[:12])
        study.set_user_attr("settings", settings)
        if opts.calibration is not None:
            study.set_user_attr("calibration", opts.calibration)
        if opts.privacy == "select":
            shape = distribution_shape(opts.distribution, opts.nb_shape)
            study.set_user_attr("trials_drawn", draw_trial_count(opts.trials_mean, shape, opts.seed))
    elif attrs.get("settings") != settings:
        raise TuneError(
            f"--study {opts.study_dir}: this study was made with other settings (space, base run config, clients, "
            "sampler, privacy or objective); resume it with the same ones, or give a new --study folder"
        )
    return study


def planned_trials(study: Any, opts: TuneOptions) -> int:
    if opts.privacy == "select":
        return int(study.user_attrs["trials_drawn"])
    if opts.trials > 0:
        return opts.trials
    if opts.sampler == "grid":
        return math.prod(len(v) for v in grid_space(opts.space).values())
    raise TuneError("--trials must be >= 1 (0 means the whole grid, with --sampler grid only)")


def _counted(t: Any) -> bool:
    """A trial that ran (finished, pruned, failed or interrupted); one its budget refused did not."""
    return t.state.name != "RUNNING" and not t.user_attrs.get("budget_refused")


def settle_interrupted(study: Any, say: Callable[[str], None]) -> None:
    """A trial left RUNNING by an interrupted study ran (and spent) but has no result: mark it failed."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        say(f"trial {t.number}: was interrupted; counted as run (its spends are in the ledgers), not re-run")


def trial_config(opts: TuneOptions, params: dict[str, Any], number: int, study_id: str) -> RunConfig:
    values = {**opts.base, **params}
    values.update(
        {
            "out-dir": str((opts.study_dir / "trials" / f"trial-{number:04d}").resolve()),
            "sim-ledger-dir": str((opts.study_dir / "ledgers").resolve()),
            "run-name": f"{study_id}/trial-{number}",
        }
    )
    return RunConfig.from_flower(values)


def budget_refusal(cfg: RunConfig, clients: int) -> str:
    """Before a trial: whether any simulated site's budget would refuse part of it, projected as the site's own
    guard plans it (client/budget.py project_run); "" when it fits or no site has a budget. The simulation holds
    every site's ledger, so the study can ask each one, as ``privatune site check`` does at a real site."""
    if cfg.sim_max_epsilon <= 0:
        return ""
    from privatune.client.budget import project_run
    from privatune.client.privacy_guard import ledger_spends, run_delta
    from privatune.client.round import load_local_data
    from privatune.client.site_config import SiteConfig
    from privatune.common.ledger import SiteLedger

    for pid in range(clients):
        site = SiteConfig.from_node_config({"partition-id": pid, "num-partitions": clients}, cfg)
        ledger = SiteLedger(site.ledger_path) if site.ledger_path.exists() else None
        local = load_local_data(cfg, site)
        proj = project_run(
            cfg,
            local.train_ids,
            ledger.cohorts() if ledger else {},
            ledger_spends(ledger.entries()) if ledger else [],
            max_epsilon=site.max_epsilon,
            on_exhausted=site.on_exhausted,
            delta=run_delta(cfg, site.delta),
            val_ids=local.val_ids,
        )
        # A metric release that would not fit is refused by the site's guard itself (the trial then has no score).
        if not proj.fits or any(r.excluded for r in proj.per_round):
            return f"site {site.site_id}: {proj.summary()}"
    return ""


class _Pruning:
    """The run's observer: each round's validation figure goes to the trial; a pruned trial stops the run."""

    def __init__(self, trial: Any, key: str, say: Callable[[str], None]) -> None:
        self.trial, self.key, self.say = trial, key, say
        self.pruned_at = 0
        self.last: float | None = None

    def __call__(self, report: RoundReport) -> None:
        if report.round <= 0:
            return
        value = (report.federated or {}).get(self.key, (report.central or {}).get(self.key))
        if value is None:
            self.say(f"  trial {self.trial.number} round {report.round}: no {self.key} this round")
            return
        self.last = float(value)
        self.trial.report(self.last, report.round)
        self.say(f"  trial {self.trial.number} round {report.round}: {self.key} {self.last:.4f}")
        if self.trial.should_prune():
            self.pruned_at = report.round
            raise FederationStopped(f"pruned by privatune tune after round {report.round} ({self.key} {value:.4f})")


def _tell(study: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
    """study.tell; the grid sampler's stop once the grid is used up is meant for study.optimize and raises here
    after the trial is stored: the study's own count of planned trials ends it."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def run_trial(study: Any, opts: TuneOptions, study_id: str) -> str:
    """Ask, run and tell one trial. Returns "" or, when a site's budget refuses it, why (the study stops)."""
    import optuna

    from privatune.simulations.run_folder import claim
    from privatune.simulations.simulate import run_simulation

    trial = study.ask()
    params = {p.key: p.suggest(trial) for p in opts.space}
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    try:
        cfg = trial_config(opts, params, trial.number, study_id)
    except ConfigError as err:
        trial.set_user_attr("status", f"refused: {err}")
        _tell(study, trial, state=optuna.trial.TrialState.FAIL)
        opts.say(f"trial {trial.number} ({shown}): not a valid run config ({err}); skipped")
        return ""
    if opts.calibration is not None:
        from privatune.simulations.tune_total import check_trial

        over = check_trial(opts.calibration, cfg, opts.clients)
        if over:
            trial.set_user_attr("status", f"refused: {over}")
            _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            opts.say(f"trial {trial.number} ({shown}): refused, {over}")
            return ""
    refusal = budget_refusal(cfg, opts.clients)
    if refusal:
        trial.set_user_attr("budget_refused", refusal)
        _tell(study, trial, state=optuna.trial.TrialState.FAIL)
        return f"trial {trial.number} ({shown}) would pass a site's budget: {refusal}"
    opts.say(f"trial {trial.number} ({shown}) ...")
    out = claim(Path(cfg.out_dir), overwrite=False)
    trial.set_user_attr("folder", str(out))
    obs = _Pruning(trial, OBJECTIVES[opts.objective], opts.say)
    summary = run_simulation(cfg, opts.clients, out, observer=obs, client_cpus=opts.client_cpus, stop_on_signal=True)
    trial.set_user_attr("run_id", str(summary.get("run_id")))
    trial.set_user_attr("status", summary.get("status"))
    trial.set_user_attr("max_client_epsilon", summary.get("max_client_epsilon"))
    trial.set_user_attr("test_accuracy", summary.get("test_accuracy"))
    value = summary.get("federated_accuracy" if opts.objective == "federated" else "test_accuracy")
    if obs.pruned_at:
        _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
        opts.say(f"trial {trial.number}: pruned after round {obs.pruned_at}")
    elif summary.get("status") == "failed" or value is None:
        why = "; ".join(f"{k}: {v}" for k, v in (summary.get("failure_reasons") or {}).items()) or "no figure"
        _tell(study, trial, state=optuna.trial.TrialState.FAIL)
        opts.say(f"trial {trial.number}: failed ({why})")
    else:
        _tell(study, trial, float(value))
        opts.say(f"trial {trial.number}: {opts.objective} accuracy {float(value):.4f}")
    return ""


def run_study(opts: TuneOptions) -> StudyResult:
    """Run trials until the planned number have run (or a site's budget stops the study); write the outputs."""
    import optuna

    from privatune.simulations.simulate import confine_writes

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    confine_writes(opts.study_dir.resolve())
    if opts.total_epsilon and opts.calibration is None:
        from privatune.simulations.tune_total import apply_total_epsilon

        apply_total_epsilon(opts)
    study = open_study(opts)
    study_id = str(study.user_attrs["study_id"])
    settle_interrupted(study, opts.say)
    planned = planned_trials(study, opts)
    done = sum(_counted(t) for t in study.get_trials(deepcopy=False))
    opts.say(f"study {study_id} in {opts.study_dir}: {done} of {planned} trial(s) already run")
    stopped = ""
    if opts.jobs > 1:
        from privatune.simulations.tune_parallel import run_parallel

        run_parallel(opts, study_id, planned - done)
    while opts.jobs == 1 and sum(_counted(t) for t in study.get_trials(deepcopy=False)) < planned:
        stopped = run_trial(study, opts, study_id)
        if stopped:
            opts.say(f"study stopped before the trial that would pass a site's budget: {stopped}")
            break
        if opts.after_trial is not None:
            opts.after_trial(study)
    return write_outputs(study, opts, planned, stopped)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                **{f"param:{k}": v for k, v in t.params.items()},
                "status": t.user_attrs.get("status"),
                "max_client_epsilon": t.user_attrs.get("max_client_epsilon"),
                "test_accuracy": t.user_attrs.get("test_accuracy"),
                "run_id": t.user_attrs.get("run_id"),
                "folder": t.user_attrs.get("folder"),
                "budget_refused": t.user_attrs.get("budget_refused"),
            }
        )
    return rows


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return ("inf" if value > 0 else "-inf") if isinstance(value, float) and math.isinf(value) else repr(value)
    return json.dumps(str(value))  # a TOML basic string


def best_config(opts: TuneOptions, params: dict[str, Any], added: set[str]) -> dict[str, Any]:
    """The best trial as run-config keys: the shared ones and its own, without the study's folders."""
    from dataclasses import fields

    from privatune.common.config import _coerce

    kinds = {f.name.replace("_", "-"): str(f.type) for f in fields(RunConfig)}
    values = {**opts.base, **params}
    drop = set(STUDY_KEYS) | added
    # typed as the run config types them (--run-config hands strings), so the TOML holds numbers as numbers
    return {k: _coerce(k, kinds[k], v) if k in kinds else v for k, v in values.items() if k not in drop}


def write_best_config(path: Path, values: dict[str, Any], header: list[str]) -> None:
    lines = [f"# {h}" for h in header] + [f"{k} = {_toml_value(v)}" for k, v in sorted(values.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def privacy_totals(study: Any, opts: TuneOptions, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> dict:
    """The study's privacy cost, the way --privacy says, with the total epsilon including tuning."""
    cfg = RunConfig.from_flower({k: v for k, v in opts.base.items()})
    delta = cfg.delta or 1e-5  # simulated sites: the run's delta, else the sites' default (client/privacy_guard)
    ledgers = opts.study_dir / "ledgers"
    composed = composed_epsilon(ledgers, delta, cfg.accountant) if ledgers.exists() else {}
    run_ids = {r["run_id"] for r in rows if r["run_id"]}
    out: dict[str, Any] = {
        "privacy": opts.privacy,
        "delta": delta,
        "ledgers": str(ledgers),
        "ledger_composition_per_site": composed,
        "trial_run_ids": sorted(run_ids),
    }
    if opts.calibration is not None:  # --total-epsilon: what each trial was given, and the bound it reaches
        out["total_epsilon_given"] = opts.calibration["total_epsilon"]
        out["per_trial_epsilon"] = opts.calibration["per_trial_epsilon"]
        out["calibrated_bound"] = opts.calibration["bound"]
        out["calibration"] = opts.calibration["how"]
    if opts.privacy == "compose":
        out["tuning_epsilon"] = max(composed.values(), default=0.0)
        out["total_epsilon_including_tuning"] = out["tuning_epsilon"]
        out["how"] = (
            f"every trial released; each site's ledger composes all trials' spends ({cfg.accountant} accountant); "
            "the total is the worst site's composition"
        )
    elif opts.privacy == "select":
        shape = distribution_shape(opts.distribution, opts.nb_shape)
        spends = trial_spends(ledgers) if ledgers.exists() else {}
        events = [dp_event_of(entries) for site in spends.values() for rid, entries in site.items() if rid in run_ids]
        eps = selection_epsilon(events, opts.trials_mean, shape, delta)
        # each site's ledger folder gets the record privatune audit recomputes (once per study: resume keeps it)
        records = record_selection(
            ledgers,
            str(study.user_attrs["study_id"]),
            sorted(run_ids),
            distribution=opts.distribution,
            mean=opts.trials_mean,
            shape=shape,
            delta=delta,
            accountant=cfg.accountant,
        )
        out.update(
            {
                "trials_distribution": opts.distribution,
                "trials_mean": opts.trials_mean,
                "shape": shape,
                "trials_drawn": int(study.user_attrs["trials_drawn"]),
                "tuning_epsilon": eps,
                "total_epsilon_including_tuning": eps,
                "selection_records": records,
                "how": (
                    "Papernot and Steinke 2022: a random number of trials, only the best released (its config and "
                    "model); dp-accounting's repeat-and-select RDP bound on the worst single trial at any site. The "
                    "trials table and plots are the study owner's working files: releasing them is outside this "
                    "bound. The ledgers compose every trial (an over-statement of this cost); beside each site ledger, "
                    "site-<id>.selections.sqlite records this selection for privatune audit to recompute."
                ),
            }
        )
    else:
        final_cfg = RunConfig.from_flower(best) if best else None
        final_eps = final_cfg.target_epsilon if final_cfg is not None and final_cfg.private else 0.0
        out.update(
            {
                "tuning_data": opts.tuning_data,
                "tuning_epsilon_on_private_data": 0.0,
                "spent_on_tuning_data": max(composed.values(), default=0.0),
                "final_private_run_epsilon": final_eps,
                "total_epsilon_including_tuning": final_eps,
                "how": (
                    "the trials trained on --tuning-data (public or proxy data), nothing on the private data; the "
                    f"final private run of {BEST_CONFIG} spends its target epsilon"
                ),
            }
        )
    return out


def write_outputs(study: Any, opts: TuneOptions, planned: int, stopped: str) -> StudyResult:
    rows = trial_rows(study)
    folder = opts.study_dir
    write_json_atomic(folder / "trials.json", rows)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(folder / "trials.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = max(done, key=lambda t: t.value) if done else None
    best_values: dict[str, Any] | None = None
    if best is not None:
        best_values = best_config(opts, best.params, opts.added)
        write_best_config(
            folder / BEST_CONFIG,
            best_values,
            [
                f"privatune tune: the best trial ({best.number}, {opts.objective} accuracy {best.value:.4f}) of study "
                f"{study.user_attrs['study_id']}",
                f"run it: privatune simulate --config {BEST_CONFIG} --clients {opts.clients} --out RUN  (or flwr run "
                f". --run-config {BEST_CONFIG})",
            ],
        )
    summary: dict[str, Any] = {
        "study_id": study.user_attrs["study_id"],
        "study": str(folder),
        "sampler": opts.sampler,
        "pruner": opts.pruner,
        "objective": opts.objective,
        "trials_planned": planned,
        "trials_run": sum(_counted(t) for t in study.get_trials(deepcopy=False)),
        "trials_by_state": {s: sum(r["state"] == s for r in rows) for s in sorted({r["state"] for r in rows})},
        "stopped_for_budget": stopped,
        "best_trial": None
        if best is None
        else {"number": best.number, "value": best.value, "params": best.params, "config": str(folder / BEST_CONFIG)},
        "privacy_cost": privacy_totals(study, opts, rows, best_values),
        "space": [p.describe() for p in opts.space],
    }
    from privatune.simulations.tune_plots import write_plots

    summary["plots"] = write_plots(study, folder)
    write_json_atomic(folder / "study-summary.json", summary)
    return StudyResult(summary, rows)
