"""The modes benchmark end to end: each cell as a child process (a real federated simulation), then tables and plot.

Resumable: a cell whose run folder already holds ``child.json`` from the same run config is read back, not rerun,
so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privatune.simulations.benchmarks.modes.plan import (
    NAME,
    QUICK,
    Cell,
    ModesPlan,
    checked_plan,
    parse_epsilons,
    parse_list,
    parse_overrides,
    parse_settings,
)
from privatune.simulations.benchmarks.modes.records import cell_result
from privatune.simulations.benchmarks.modes.tables import plot, render
from privatune.simulations.benchmarks.report import (
    Log,
    bench_parser,
    environment,
    plan_or_exit,
    print_flush,
    results_folder,
    run_header,
    write_results,
)

#: The child process that runs one privatune federation (``modes.child``).
CHILD = "privatune.simulations.benchmarks.modes.child"


def run_child(
    run_config: dict[str, Any], clients: int, out: Path, tag: str, log: Log, child_module: str = CHILD
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Run (or read back) one simulation as a child process: its ``child.json``, ``summary.json`` and output.

    Shared by the benchmarks that run one federation per cell (modes, augmentation, peer). ``child_module`` is the
    ``python -m`` module run on the spec (the peer benchmark's plain-Flower side has its own)."""
    run_dir, spec_path, log_path = (out / "runs" / tag, out / "specs" / f"{tag}.json", out / "logs" / f"{tag}.log")
    spec = {"run_config": run_config, "clients": clients, "out": str(run_dir)}
    reuse = (
        (run_dir / "child.json").exists()
        and spec_path.exists()
        and json.loads(spec_path.read_text()) == spec
        and json.loads((run_dir / "child.json").read_text()).get("status") != "failed"  # a failed cell runs again
    )
    if reuse:
        log(f"  {tag}: finished before, reading it back")
    else:
        if run_dir.exists():  # a cell stopped part-way (or run with another spec): start it again from nothing
            shutil.rmtree(run_dir)
        for p in (spec_path, log_path):
            p.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=1) + "\n")
        with log_path.open("w") as fh:
            subprocess.run(
                [sys.executable, "-m", child_module, str(spec_path)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                check=False,
            )
    child = json.loads((run_dir / "child.json").read_text()) if (run_dir / "child.json").exists() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return child, summary, log_path.read_text(errors="replace") if log_path.exists() else ""


def measure_cell(plan: ModesPlan, cell: Cell, out: Path, log: Log) -> dict[str, Any]:
    """Run (or read back) one cell; its figures with its tag, setting, privacy level and run config."""
    rc = plan.run_config(cell)
    child, summary, log_text = run_child(rc, plan.clients, out, cell.tag, log)
    figures = cell_result(summary, child, log_text, plan.resolved(cell).local_epochs)
    return {
        "tag": cell.tag,
        "setting": cell.setting,
        "preset": cell.preset,
        "epsilon": cell.epsilon,
        "dp": cell.dp,
        "privacy": cell.privacy,
        "run_config": rc,
        "error": child.get("error"),
        **figures,
    }


def run(plan: ModesPlan, out: Path, cells: Sequence[str] = (), log: Log = print) -> dict[str, Any]:
    """Every cell of ``plan`` (or only the tags in ``cells``); writes ``out/bench_modes.json`` and the plot."""
    out = results_folder(out)
    todo = [c for c in plan.cells() if not cells or c.tag in cells]
    unknown = sorted(set(cells) - {c.tag for c in plan.cells()})
    if unknown:
        raise ValueError(
            f"--cells: {', '.join(unknown)} not in the plan; cells: {', '.join(c.tag for c in plan.cells())}"
        )
    result = run_header(NAME, plan, environment("torch", "flwr", "opacus", "peft"))
    result["cells"] = []
    t0 = time.perf_counter()
    for i, cell in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {cell.tag} ({cell.privacy}) ...")
        res = measure_cell(plan, cell, out, log)
        result["cells"].append(res)
        acc = res.get("accuracy")
        log(
            f"[{i}/{len(todo)}] {cell.tag}: {res['status']}, accuracy "
            f"{'-' if acc is None else format(100 * acc, '.2f')} %, {res.get('wall_seconds') or math.nan:.0f} s"
        )
        write_results(out / "bench_modes.json", result)
    result["total_seconds"] = time.perf_counter() - t0
    result["tables"] = render(result)
    if result["cells"]:
        result["plot"] = str(plot(result["cells"], out / "modes_accuracy.png"))
    write_results(out / "bench_modes.json", result)
    log("\n" + result["tables"])
    log(f"\nresults in {out / 'bench_modes.json'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(NAME, "Fine-tuning modes under DP: accuracy, epsilon, time per epoch, client peak memory.")
    parser.add_argument("--modes", default="", help="settings, comma-separated (default: every available one)")
    parser.add_argument("--epsilons", default="1,8,inf", help="privacy levels, comma-separated; inf = no DP")
    parser.add_argument("--cells", default="", help="only these cells (tags such as lora-eps8,head-nodp)")
    parser.add_argument("--preset", default="trec6", help="the dataset preset (trec6, sms-spam)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=0, help="0 = the setting's, else the preset's")
    parser.add_argument("--local-epochs", type=int, default=0, help="0 = each setting's")
    parser.add_argument("--max-records", type=int, default=0, help="0 = the whole dataset")
    parser.add_argument("--max-length", type=int, default=0, help="tokens; 0 = the preset's")
    parser.add_argument("--run-config", default="", help='overrides for every cell, e.g. "lr=0.5"')
    args = parser.parse_args(argv)

    def build() -> ModesPlan:
        kw: dict[str, Any] = {
            "clients": args.clients,
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "max_records": args.max_records,
            "max_length": args.max_length,
            "preset": args.preset,
        }
        if args.quick:
            kw.update(QUICK)
        if args.modes:
            kw["settings"] = parse_settings(args.modes)
        return checked_plan(
            ModesPlan(
                epsilons=parse_epsilons(args.epsilons),
                overrides=parse_overrides(args.run_config),
                quick=args.quick,
                **kw,
            )
        )

    plan = plan_or_exit(parser, build)
    cells = parse_list(args.cells, "cells") if args.cells else []
    try:
        run(plan, args.out, cells, log=print_flush)
    except ValueError as err:
        parser.error(str(err))
    return 0
