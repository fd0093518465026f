"""The DP benchmark end to end: the data once, the timing part, the accuracy part, the tables and the JSON.

Apart from the parts so that the order of a run, and what it writes, read in one place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from privatune.simulations.benchmarks.dp.accuracy import AccuracyRow, accuracy_rows
from privatune.simulations.benchmarks.dp.data import prepare_data
from privatune.simulations.benchmarks.dp.plan import ACCURACY_PRESETS, BenchPlan, checked_plan, parse_overrides
from privatune.simulations.benchmarks.dp.tables import accuracy_table, goal_line, timing_table
from privatune.simulations.benchmarks.dp.timing import ROW_NAMES, timing_cases
from privatune.simulations.benchmarks.report import (
    Log,
    bench_parser,
    environment,
    load_average,
    plan_or_exit,
    print_flush,
    results_folder,
    run_header,
    write_results,
)

NAME = "dp"


def dp_environment() -> dict[str, Any]:
    """The machine facts of a DP run: torch, Flower and Opacus versions, torch's threads as the run starts."""
    return environment("torch", "flwr", "opacus", torch_threads=torch.get_num_threads())


def run(
    plan: BenchPlan, out: Path, log: Log = print, timing_only: bool = False, cases: Sequence[str] | None = None
) -> dict[str, Any]:
    """The whole benchmark; returns (and writes to ``out/bench_dp.json``) every figure it measured.

    ``timing_only``: part 1 alone (only the SMS features, which the head case trains on; no federated runs).
    ``cases``: with ``timing_only``, the timing rows to run (names of ``timing.ROW_NAMES``; default all)."""
    out = results_folder(out)
    result = run_header(NAME, plan, dp_environment())
    t_start = time.perf_counter()
    result["load_average"] = {"start": load_average()}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    presets: Sequence[str] = ACCURACY_PRESETS[:1] if timing_only else ACCURACY_PRESETS
    if timing_only and cases is not None and not any(c.startswith("head") for c in cases):
        presets = ()  # no head row: no MiniLM features needed
    prepared = {p: prepare_data(p, plan, out / "feature-cache" / p, log) for p in presets}
    result["features_seconds"] = {p: d.feature_seconds for p, d in prepared.items()}

    log(f"\n== DP vs non-DP local-epoch time (train_local, medians, {plan.timing_threads} torch thread(s)) ==")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(plan.timing_threads)
    try:
        timings = timing_cases(plan, prepared, log, cases if timing_only else None)
    finally:
        torch.set_num_threads(threads_before)
    result["timing"] = [t.to_json() for t in timings]
    result["load_average"]["after_timing"] = load_average()
    log(timing_table(timings))
    if timing_only:
        result["load_average"]["end"] = load_average()
        result["total_seconds"] = time.perf_counter() - t_start
        path = out / "bench_dp.json"
        write_results(path, result)
        log(f"\nresults in {path} (timing only); total {result['total_seconds']:.0f} s")
        return result

    log(
        f"\n== federated vs centralised accuracy (head mode, Dirichlet alpha {plan.alpha:g}, {plan.clients} clients) =="
    )
    acc: list[AccuracyRow] = []
    for preset in ACCURACY_PRESETS:
        acc.extend(accuracy_rows(prepared[preset], plan, out / "runs", log))
    result["accuracy"] = [asdict(r) | {"label": r.label} for r in acc]
    result["configs"] = {p: d.cfg.to_flower() for p, d in prepared.items()}
    result["goal"] = goal_line(acc)
    result["load_average"]["end"] = load_average()
    result["total_seconds"] = time.perf_counter() - t_start

    log("\n" + timing_table(timings))
    log("")
    log(accuracy_table(acc))
    log(result["goal"])
    path = out / "bench_dp.json"
    write_results(path, result)
    log(f"\nresults in {path} (per-run folders in {out / 'runs'}); total {result['total_seconds']:.0f} s")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(NAME, "DP vs non-DP training time, and federated DP accuracy vs a centralised head.")
    parser.add_argument("--run-config", default="", help='overrides for every run, e.g. "lr=1.0 local-epochs=3"')
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the timing part (default 1, what a simulated client gets)",
    )
    parser.add_argument(
        "--timing-only", action="store_true", help="part 1 only: DP vs non-DP local-epoch time (a few minutes)"
    )
    parser.add_argument(
        "--cases",
        default="",
        help=f"with --timing-only, the timing rows to run, comma-separated (of {','.join(ROW_NAMES)}; default all)",
    )
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] or None
    unknown = sorted(set(cases or ()) - set(ROW_NAMES))
    if unknown or (cases and not args.timing_only):
        parser.error(f"--cases: unknown {', '.join(unknown)}" if unknown else "--cases needs --timing-only")
    plan = plan_or_exit(parser, lambda: checked_plan(args.quick, parse_overrides(args.run_config), args.threads))
    run(plan, args.out, log=print_flush, timing_only=args.timing_only, cases=cases)
    return 0
