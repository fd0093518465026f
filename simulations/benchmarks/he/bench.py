"""The HE benchmark end to end: each case's runs, records and comparisons, then the tables and the JSON.

Apart from the parts so that the order of a run, and what it writes, read in one place.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from privatune.simulations.benchmarks.he.plan import ACCURACY_GOAL_POINTS, BYTES_RATIO_GOAL, BenchPlan, Case
from privatune.simulations.benchmarks.he.records import measure_records, modelled_he_extra, parameter_alternatives
from privatune.simulations.benchmarks.he.runs import RunResult, federated_run, seed_feature_cache
from privatune.simulations.benchmarks.he.tables import render
from privatune.simulations.benchmarks.report import (
    Log,
    bench_parser,
    environment,
    finite_median,
    load_average,
    plan_or_exit,
    print_flush,
    ratio,
    results_folder,
    run_header,
    write_results,
)

NAME = "he"


def run_case(case: Case, plan: BenchPlan, out: Path, log: Log) -> dict[str, Any]:
    from safetensors.numpy import load_file

    from privatune.server.app import PLAIN_WEIGHTS_NAME
    from privatune.server.central_eval import CentralEvaluator

    case_dir = out / "runs" / case.name
    cache_dir = case_dir / "_seed" / "cache"
    if cache_dir.parent.exists():
        shutil.rmtree(cache_dir.parent)
    cache_dir.mkdir(parents=True)
    cfg = case.config()
    log(
        f"\n== {case.name}: preset {cfg.preset}, mode {cfg.mode}, {case.clients} clients, {case.rounds} rounds, "
        f"DP {'eps=' + format(cfg.target_epsilon, 'g') if cfg.private else 'off'}, "
        f"max-records {case.max_records or 'all'}, {case.repeats} repeat(s) =="
    )
    weights = seed_feature_cache(case, cache_dir, log)
    evaluator = CentralEvaluator(cfg, out / "runs" / "_test-cache")

    results: list[RunResult] = []
    for r in range(case.repeats):
        arms = ("plain", "he") if r % 2 == 0 else ("he", "plain")
        for arm in arms:
            results.append(federated_run(case, arm, r, out / "runs", cache_dir, evaluator, log))
    ok = {arm: [x for x in results if x.arm == arm and not x.error] for arm in ("plain", "he")}
    result: dict[str, Any] = {"case": asdict(case), "config": cfg.to_flower(), "runs": [asdict(x) for x in results]}
    if not ok["plain"] or not ok["he"]:
        result["error"] = "a plaintext or HE run failed: no comparison"
        return result

    steady = {arm: [s for x in ok[arm] for s in x.steady] for arm in ok}
    first = {arm: [x.rounds.get(1, math.nan) for x in ok[arm]] for arm in ok}
    rounds: dict[str, dict[str, Any]] = {
        arm: {
            "steady_median_s": finite_median(steady[arm]),
            "steady_samples": len(steady[arm]),
            "steady_all_s": steady[arm],
            "first_round_median_s": finite_median(first[arm]),
            "simulation_median_s": finite_median([x.simulation_seconds for x in ok[arm]]),
            "steady_slowest_training_median_s": finite_median(
                [s for x in ok[arm] for r, s in x.max_train_seconds.items() if r >= 2]
            ),
        }
        for arm in ok
    }
    acc = {arm: [x.test_accuracy for x in ok[arm]] for arm in ok}
    pairs = [(p.test_accuracy, h.test_accuracy) for p in ok["plain"] for h in ok["he"] if p.repeat == h.repeat]
    result["round_time"] = rounds | {
        "ratio_steady": ratio(rounds["he"]["steady_median_s"], rounds["plain"]["steady_median_s"]),
        "ratio_first_round": ratio(rounds["he"]["first_round_median_s"], rounds["plain"]["first_round_median_s"]),
        "goal": case.round_goal,
    }
    result["accuracy"] = {
        "plain": acc["plain"],
        "he": acc["he"],
        "he_minus_plain_points": [100 * (h - p) for p, h in pairs],
        "median_he_minus_plain_points": finite_median([100 * (h - p) for p, h in pairs]),
        "goal_points": ACCURACY_GOAL_POINTS,
    }

    log(f"[ops] {case.name}: building records and timing HE operations ({plan.op_repeats} repeats)")
    base_state = load_file(str(Path(ok["plain"][0].out_dir) / PLAIN_WEIGHTS_NAME))
    rec = measure_records(case, Path(ok["he"][0].out_dir), base_state, weights, plan.op_repeats)
    states = rec.pop("states")
    result["records"] = rec
    workers = os.cpu_count() or 1
    extra = modelled_he_extra(rec["ops_cpu_seconds"], case.clients, workers)
    result["round_time"]["modelled_he_extra_s"] = extra
    result["round_time"]["modelled_ratio"] = ratio(
        rounds["plain"]["steady_median_s"] + extra, rounds["plain"]["steady_median_s"]
    )
    b = rec["bytes"]
    result["bytes_ratio"] = {
        "upload": ratio(b["upload_he"]["proto"], b["upload_plain"]["proto"]),
        "download": ratio(b["download_he"]["proto"], b["download_plain"]["proto"]),
        "per_round": ratio(
            b["upload_he"]["proto"] + 2 * b["download_he"]["proto"],
            b["upload_plain"]["proto"] + 2 * b["download_plain"]["proto"],
        ),
        "goal": BYTES_RATIO_GOAL,
    }
    result["alternatives"] = parameter_alternatives(states, weights)
    result["alternatives_plain_bytes"] = {
        "upload": b["upload_plain"]["proto"],
        "download": b["download_plain"]["proto"],
    }
    return result


def run(plan: BenchPlan, out: Path, log: Log = print) -> dict[str, Any]:
    """The whole benchmark; returns (and writes to ``out/bench_he.json``) every figure it measured."""
    from privatune.simulations.simulate import confine_writes

    out = results_folder(out)
    confine_writes(out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()
    result = run_header(NAME, plan, environment("flwr", "tenseal"))
    result["load_average"] = {"start": load_average()}
    result["cases"] = []
    for case in plan.cases:
        result["cases"].append(run_case(case, plan, out, log))
        result["load_average"][f"after_{case.name}"] = load_average()
    result["total_seconds"] = time.perf_counter() - t_start
    path = out / "bench_he.json"
    write_results(path, result)  # figures first, tables next
    result["tables"] = render(result)
    log("\n" + result["tables"])
    for c in result["cases"]:
        if "error" in c:
            log(f"\n[error] {c['case']['name']}: {c['error']}")
    write_results(path, result)
    log(
        f"\nresults in {path} (run folders in {out / 'runs'}); total {result['total_seconds']:.0f} s; "
        f"load average {result['load_average']['start'][0]:.1f} at the start on {os.cpu_count()} CPUs"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(
        NAME, "HE vs plaintext aggregation: round time, bytes on the wire, HE seconds per million parameters."
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="plaintext/HE run pairs per config (default: 2 text, 3 digits)"
    )
    parser.add_argument(
        "--op-repeats", type=int, default=None, help="repetitions of each timed HE operation (default 5)"
    )
    args = parser.parse_args(argv)
    plan = plan_or_exit(parser, lambda: BenchPlan.make(args.quick, args.repeats, args.op_repeats).checked())
    run(plan, args.out, log=print_flush)
    return 0
