"""The tuning benchmark (issue 14): TREC-6 at one total epsilon *including tuning*, defaults against tuned runs.

    python -m privatune.simulations.benchmarks.tuning --out DIR
    python -m privatune.simulations.benchmarks.tuning --quick --out DIR   # a smoke run: not for figures

TREC-6's questions are split once (stratified by label, seeded) into a test set (20 %, the test set of every
run), a *proxy* part, which stands for public data, and a *private* part. Three ways to reach
the same total epsilon E at every site:

1. ``defaults``: one run of the ``trec6`` preset's settings on the private part at epsilon E (nothing tuned);
2. ``select``: ``privatune tune --privacy select --total-epsilon E`` on the private part: a random number of
   trials, each at the per-trial epsilon the study calibrates, the best one released (its test accuracy);
3. ``public``: ``privatune tune --privacy public --tuning-data proxy.csv`` (free for the private part), then one
   run of the best configuration on the private part at epsilon E. The proxy is public, so its trials are scored
   centrally, on the proxy's own held-out split (``--objective central``): noised federated sums over a few
   hundred proxy records would only add noise to the choice.

Each step is the real command line in a child process (its output in ``logs/``); a finished step is read back,
so an interrupted benchmark continues.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privatune.common.sim_data import sim_data_info
from privatune.simulations.benchmarks.report import (
    bench_parser,
    environment,
    fmt_eps,
    fmt_num,
    fmt_pct,
    markdown_table,
    plan_from_options,
    print_flush,
    results_folder,
    run_header,
    write_results,
)

NAME = "tuning"
TEST_FRACTION = 0.2  # the preset's own test-fraction: TREC-6 has no official test split here
PRESET = "trec6"
# The searched keys: what moves a DP head the most (the step size, how many steps, the clip).
SPACE = ("lr=0.3:8:log", "batch-size=32,64,128", "local-epochs=2,5,10", "max-grad-norm=0.3:3:log")


@dataclass(frozen=True)
class TuningPlan:
    total_epsilon: float = 8.0
    clients: int = 10
    proxy_fraction: float = 0.2
    trials_mean: float = 6.0
    public_trials: int = 8
    seed: int = 42
    rounds: int = 0  # 0 = the preset's
    max_records: int = 0  # 0 = all (quick runs only)

    def checked(self) -> TuningPlan:
        if not (0 < self.total_epsilon < math.inf):
            raise ValueError(f"--total-epsilon must be a finite number > 0, got {self.total_epsilon}")
        if not (0 < self.proxy_fraction < 0.5):
            raise ValueError(f"--proxy-fraction must be in (0, 0.5), got {self.proxy_fraction}")
        if self.trials_mean < 1 or self.public_trials < 1 or self.clients < 1:
            raise ValueError("--trials-mean, --public-trials and --clients must be at least 1")
        return self

    def shared(self) -> str:
        """The run-config keys every run shares (the issue's federation: Dirichlet(1.0))."""
        # RDP for every run: --total-epsilon calibrates each trial's noise at every site and setting (9 here), which
        # takes seconds per calibration under PRV and milliseconds under RDP; the three approaches share it
        keys = [f"partition=dirichlet alpha=1.0 seed={self.seed} accountant=rdp"]
        if self.rounds:
            keys.append(f"num-server-rounds={self.rounds}")
        return " ".join(keys)


QUICK = {"clients": 2, "trials_mean": 2.0, "public_trials": 2, "rounds": 1, "max_records": 400}


def write_splits(plan: TuningPlan, folder: Path) -> dict[str, Path]:
    """test.csv (TEST_FRACTION of TREC-6's questions), proxy.csv and private.csv (the rest, split): stratified."""
    from privatune.common.datasets import holdout_split, load_dataset

    folder.mkdir(parents=True, exist_ok=True)
    every = load_dataset(PRESET, max_records=plan.max_records or None, seed=plan.seed)
    rest, test = holdout_split(every, TEST_FRACTION, plan.seed)  # as the preset holds out its test split
    private, proxy = holdout_split(rest, plan.proxy_fraction, plan.seed)
    paths = {}
    for name, data in (("private", private), ("proxy", proxy), ("test", test)):
        path = folder / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for text, label in zip(data.inputs, data.labels, strict=True):
                writer.writerow([text, data.label_names[int(label)]])
        paths[name] = path
    return paths


def step(argv: list[str], out: Path, name: str, done: Path) -> float:
    """Run one command line (``privatune ...``) unless ``done`` exists; its wall seconds (0 when read back)."""
    if done.exists():
        print_flush(f"  {name}: finished before ({done}), reading it back")
        return 0.0
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print_flush(f"  {name}: {' '.join(argv)}")
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(
            [sys.executable, "-m", "privatune.cli", *argv], stdout=fh, stderr=subprocess.STDOUT, check=False
        ).returncode
    if rc != 0:
        raise RuntimeError(f"{name} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def run(plan: TuningPlan, out: Path) -> dict[str, Any]:
    out = results_folder(out)
    result = run_header(NAME, plan, environment("torch", "flwr", "opacus", "optuna"))
    data = write_splits(plan, out / "data")
    eps = f"{plan.total_epsilon:g}"
    space = [a for p in SPACE for a in ("--param", p)]
    common = ["--clients", str(plan.clients), "--seed", str(plan.seed)]
    rows: list[dict[str, Any]] = []

    # 1. defaults: the preset's settings, once, at the whole budget
    own = ["--data", str(data["private"]), "--test-data", str(data["test"])]
    d_run = out / "default"
    secs = step(
        ["simulate", "--preset", PRESET, *own, "--epsilon", eps, *common, "--run-config", plan.shared(), "--out",
         str(d_run)],
        out, "default", d_run / "summary.json",
    )  # fmt: skip
    s = summary_of(d_run)
    rows.append(_row("defaults (trec6 preset)", "-", 1, plan.total_epsilon, plan.total_epsilon, s, secs))
    sim_data = d_run / "data" / "sim-data.npz"
    labels = ",".join(sim_data_info(sim_data)["label_names"])
    private_keys = f"dataset=sim-data sim-data={sim_data} labels={labels} {plan.shared()}"

    # 2. private selection on the private part
    sel = out / "select"
    secs = step(
        ["tune", "--preset", PRESET, "--privacy", "select", "--total-epsilon", eps, "--trials-mean",
         f"{plan.trials_mean:g}", *space, *common, "--run-config", private_keys, "--study", str(sel)],
        out, "select", sel / "study-summary.json",
    )  # fmt: skip
    study = json.loads((sel / "study-summary.json").read_text())
    cost = study["privacy_cost"]
    best = _best_trial_run(sel, study)
    rows.append(
        _row(
            "private selection",
            "private part",
            int(study["trials_run"]),
            cost.get("per_trial_epsilon"),
            cost["total_epsilon_including_tuning"],
            summary_of(best) if best else {},
            secs,
        )
    )

    # 3. public tuning on the proxy part, then one private run of the best configuration
    pub = out / "public"
    secs = step(
        ["tune", "--preset", PRESET, "--privacy", "public", "--tuning-data", str(data["proxy"]), "--epsilon", eps,
         "--objective", "central",
         "--trials", str(plan.public_trials), *space, *common, "--run-config", plan.shared(), "--study", str(pub)],
        out, "public", pub / "study-summary.json",
    )  # fmt: skip
    p_run = out / "public-final"
    secs += step(
        ["simulate", "--config", str(pub / "best-trial.toml"), *own, "--epsilon", eps, *common, "--out",
         str(p_run)],
        out, "public-final", p_run / "summary.json",
    )  # fmt: skip
    pstudy = json.loads((pub / "study-summary.json").read_text())
    rows.append(
        _row(
            "public tuning, then one private run",
            "proxy part (public)",
            int(pstudy["trials_run"]),
            plan.total_epsilon,
            plan.total_epsilon,
            summary_of(p_run),
            secs,
        )
    )
    result["rows"] = rows
    result["table"] = table(rows)
    write_results(out / "bench_tuning.json", result)
    print_flush("\n" + result["table"])
    print_flush(f"\nresults in {out / 'bench_tuning.json'}")
    return result


def _best_trial_run(study_dir: Path, study: dict[str, Any]) -> Path | None:
    best = study.get("best_trial")
    if not best:
        return None
    rows = json.loads((study_dir / "trials.json").read_text())
    folder = next((r.get("folder") for r in rows if r.get("number") == best["number"]), None)
    return Path(folder) if folder else None


def _row(
    approach: str,
    tuned_on: str,
    trials: int,
    per_trial: float | None,
    total: float,
    summary: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    return {
        "approach": approach,
        "tuned_on": tuned_on,
        "trials": trials,
        "per_trial_epsilon": per_trial,
        "total_epsilon": total,
        "max_client_epsilon_of_released_run": summary.get("max_client_epsilon"),
        "accuracy": summary.get("test_accuracy"),
        "macro_f1": summary.get("test_macro_f1"),
        "wall_seconds": seconds,
    }


HEADERS = (
    "approach",
    "tuned on",
    "trials",
    "epsilon per trial",
    "total epsilon (incl. tuning)",
    "test accuracy %",
    "macro-F1 %",
    "wall s",
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    return markdown_table(
        HEADERS,
        [
            [
                r["approach"],
                r["tuned_on"],
                str(r["trials"]),
                fmt_eps(r["per_trial_epsilon"]),
                fmt_eps(r["total_epsilon"]),
                fmt_pct(r["accuracy"]),
                fmt_pct(r["macro_f1"]),
                fmt_num(r["wall_seconds"], ".0f"),
            ]
            for r in rows
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(NAME, "TREC-6 at one total epsilon including tuning: defaults, private selection, public.")
    parser.add_argument("--total-epsilon", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--trials-mean", type=float, default=6.0)
    parser.add_argument("--public-trials", type=int, default=8)
    args = parser.parse_args(argv)

    plan = plan_from_options(
        parser, args, TuningPlan, ["total_epsilon", "clients", "trials_mean", "public_trials"], QUICK
    )
    run(plan, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
