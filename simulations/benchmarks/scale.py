"""The scale benchmark (issue 13): one dataset split between more and more simulated clients, a fraction sampled.

    python -m privatune.simulations.benchmarks.scale --out DIR
    python -m privatune.simulations.benchmarks.scale --quick --out DIR   # a smoke run: not for figures

Fashion-MNIST's 60,000 training images split iid between 100, 300 and 1,000 clients (600, 200 and 60 each), 10 %
of them sampled to train each round and 10 % (their own draw) to run the federated evaluation, DP at a target
epsilon of 4 per client over a fixed number of rounds (3 by default: each cell takes minutes on 2 cores), the
preset's model, mode and hyperparameters. Per cell: seconds per round (train, federated evaluation and the
central test score; round 1 apart, as it also starts the client actors), the peak resident memory of the whole process tree (the driver, Ray's processes and every
client actor, summed at each sample), accuracy on the official test set after the rounds, the largest client
epsilon, and how many rounds each client that exists trained (min / median / max, never-sampled clients count 0).

Each cell is a real ``privatune simulate`` federation in a child process (modes/bench.py ``run_child``); a cell
whose run folder already holds its result from the same run config is read back, so an interrupted benchmark
continues where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privatune.simulations.benchmarks.modes.bench import run_child
from privatune.simulations.benchmarks.report import (
    Log,
    bench_parser,
    environment,
    fmt_eps,
    fmt_num,
    fmt_pct,
    markdown_table,
    plan_from_options,
    print_flush,
    ratio,
    results_folder,
    run_header,
    write_results,
)

NAME = "scale"


@dataclass(frozen=True)
class ScalePlan:
    clients: tuple[int, ...] = (100, 300, 1000)
    rounds: int = 3
    fraction: float = 0.1  # fraction-train and fraction-evaluate
    epsilon: float = 4.0
    preset: str = "fashion-mnist"
    partition: str = "iid"
    max_records: int = 0  # 0 = all of the preset's training records (Fashion-MNIST: 60,000)
    seed: int = 42
    run_config: str = ""  # extra keys for every cell, e.g. "batch-size=32"

    def checked(self) -> ScalePlan:
        if not self.clients or min(self.clients) < 2:
            raise ValueError(f"--clients: give client counts of at least 2, got {list(self.clients)}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {self.rounds}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not 0 < self.epsilon < math.inf:
            raise ValueError(f"--epsilon must be a finite number > 0, got {self.epsilon}")
        return self

    def cell_config(self) -> dict[str, Any]:
        """The run config every cell shares (kebab-case keys, as ``privatune simulate`` builds them)."""
        rc: dict[str, Any] = {
            "preset": self.preset,
            "num-server-rounds": self.rounds,
            "target-epsilon": self.epsilon,
            "fraction-train": self.fraction,
            "fraction-evaluate": self.fraction,
            "partition": self.partition,
            "seed": self.seed,
            "max-records": self.max_records,
        }
        for item in self.run_config.split():
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--run-config: {item!r} is not key=value")
            rc[key] = value
        return rc


QUICK: dict[str, Any] = {"clients": (20, 40), "rounds": 2, "max_records": 2000}


def parse_clients(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--clients: a comma-separated list of client counts, got {text!r}") from None


# -- one cell ----------------------------------------------------------------------------------------------------


def round_seconds(metrics_jsonl: Path) -> list[float]:
    """Each training round's seconds, from metrics.jsonl (its ``seconds`` run from the start of the run)."""
    if not metrics_jsonl.exists():
        return []
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    stamps = sorted((int(r["round"]), float(r["seconds"])) for r in rows)
    return [b - a for (_, a), (r, b) in itertools.pairwise(stamps) if r > 0]


def rounds_trained(participation: Mapping[str, Sequence[int]], clients: int) -> list[int]:
    """How many rounds each of the ``clients`` simulated clients trained (``client-0`` .. ; never sampled: 0)."""
    return [len(participation.get(f"client-{i}", ())) for i in range(clients)]


def actor_peak_mib(child: Mapping[str, Any]) -> float | None:
    """The highest peak (``VmHWM``) of any one client actor (Ray titles them ``ray::ClientAppActor``), MiB."""
    peaks = [kib for title, kib in (child.get("peak_kib_by_title") or {}).items() if "ClientAppActor" in title]
    return max(peaks) / 1024 if peaks else None


def cell_figures(summary: Mapping[str, Any], child: Mapping[str, Any], clients: int, run_dir: Path) -> dict[str, Any]:
    """A cell's row: its figures from the run's summary.json, metrics.jsonl and the child's memory watch."""
    per_round = round_seconds(run_dir / "metrics.jsonl")
    counts = rounds_trained(summary.get("participation") or {}, clients)
    tree_kib = child.get("tree_peak_rss_kib")
    return {
        "clients": clients,
        "status": summary.get("status") or child.get("status") or "failed",
        "error": child.get("error"),
        "round_seconds": per_round,
        # Round 1 also starts the actors and loads the data and model in each: the steady figure is the mean of
        # the later rounds (round 1's alone when there is one round), round 1 is reported beside it.
        "seconds_per_round": statistics.mean(per_round[1:] or per_round) if per_round else None,
        "first_round_seconds": per_round[0] if per_round else None,
        "peak_tree_mib": tree_kib / 1024 if tree_kib else None,
        "peak_client_actor_mib": actor_peak_mib(child),
        "processes": child.get("max_descendants"),
        "accuracy": summary.get("test_accuracy"),
        "max_client_epsilon": summary.get("max_client_epsilon"),
        "sampled_per_round": summary.get("clients_sampled_per_round"),
        "clients_trained": sum(1 for c in counts if c),
        "rounds_trained_min": min(counts) if counts else None,
        "rounds_trained_median": statistics.median(counts) if counts else None,
        "rounds_trained_max": max(counts) if counts else None,
        "wall_seconds": child.get("seconds"),
    }


def measure(plan: ScalePlan, clients: int, out: Path, log: Log) -> dict[str, Any]:
    tag = f"clients-{clients}"
    child, summary, _ = run_child(plan.cell_config(), clients, out, tag, log)
    return cell_figures(summary, child, clients, out / "runs" / tag)


# -- the table ---------------------------------------------------------------------------------------------------

HEADERS = (
    "clients",
    "records/client",
    "s/round (after round 1)",
    "round 1 s",
    "peak memory, tree (MiB)",
    "peak client actor (MiB)",
    "test accuracy",
    "max client epsilon",
    "rounds trained min/median/max",
    "clients trained",
)


def table(cells: Sequence[Mapping[str, Any]], records: int) -> str:
    rows = []
    for c in cells:
        spread = "-"
        if c.get("rounds_trained_min") is not None:
            spread = f"{c['rounds_trained_min']}/{c['rounds_trained_median']:g}/{c['rounds_trained_max']}"
        rows.append(
            [
                str(c["clients"]),
                f"{records / c['clients']:.0f}" if records else "-",
                fmt_num(c.get("seconds_per_round"), ".1f"),
                fmt_num(c.get("first_round_seconds"), ".1f"),
                fmt_num(c.get("peak_tree_mib"), ",.0f"),
                fmt_num(c.get("peak_client_actor_mib"), ",.0f"),
                fmt_pct(c.get("accuracy")),
                fmt_eps(c.get("max_client_epsilon")),
                spread,
                f"{c.get('clients_trained', 0)} of {c['clients']}",
            ]
        )
    return markdown_table(HEADERS, rows)


def growth(cells: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The largest cell's seconds per round and tree memory against the smallest's (the issue aims at <= 2x)."""
    done = [c for c in cells if c.get("seconds_per_round")]
    if len(done) < 2:
        return {}
    small, large = min(done, key=lambda c: c["clients"]), max(done, key=lambda c: c["clients"])
    return {
        "seconds_per_round": ratio(large["seconds_per_round"], small["seconds_per_round"]),
        "peak_tree_memory": ratio(large.get("peak_tree_mib") or math.nan, small.get("peak_tree_mib") or math.nan),
    }


def pool_size(plan: ScalePlan) -> int:
    """The training records split between the clients (0 when unknown: the table leaves the column blank)."""
    if plan.max_records:
        return plan.max_records
    return 60_000 if plan.preset == "fashion-mnist" else 0


def run(plan: ScalePlan, out: Path, log: Log = print_flush) -> dict[str, Any]:
    out = results_folder(out)
    result = run_header(NAME, plan, environment("torch", "flwr", "opacus", "ray"))
    result["cells"] = []
    for i, clients in enumerate(plan.clients, 1):
        log(f"[{i}/{len(plan.clients)}] {clients} clients, {plan.rounds} rounds ...")
        cell = measure(plan, clients, out, log)
        result["cells"].append(cell)
        log(
            f"[{i}/{len(plan.clients)}] {clients} clients: {cell['status']}, "
            f"{fmt_num(cell['seconds_per_round'], '.1f')} s/round, {fmt_num(cell['peak_tree_mib'], ',.0f')} MiB"
        )
        write_results(out / "bench_scale.json", result)
    result["growth"] = growth(result["cells"])
    result["table"] = table(result["cells"], pool_size(plan))
    write_results(out / "bench_scale.json", result)
    log("\n" + result["table"])
    if result["growth"]:
        g = result["growth"]
        log(f"\nlargest / smallest: {g['seconds_per_round']:.2f}x s/round, {g['peak_tree_memory']:.2f}x memory")
    log(f"\nresults in {out / 'bench_scale.json'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(NAME, "Many simulated clients, a fraction sampled: s/round, memory, accuracy, epsilon.")
    parser.add_argument("--clients", default="100,300,1000", help="client counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction-train and fraction-evaluate")
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--max-records", type=int, default=0, help="0 = all training records")
    parser.add_argument("--run-config", default="", help='extra keys for every cell, e.g. "batch-size=32"')
    args = parser.parse_args(argv)
    try:
        args.clients = parse_clients(args.clients)
    except ValueError as err:
        parser.error(str(err))
    names = ["clients", "rounds", "fraction", "epsilon", "max_records", "run_config"]
    plan = plan_from_options(parser, args, ScalePlan, names, QUICK)
    run(plan, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
