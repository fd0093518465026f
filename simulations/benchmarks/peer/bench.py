"""The peer comparison: one DP federation through plain Flower (as Flower's Opacus example) and through privatune.

Both sides get the same run config: data and partitions (privatune's seeded split, no local validation hold-out so
both train every local record), model and trainable parameters, noise multiplier (fixed, not calibrated), clip,
batch size, local epochs, learning rate, rounds and clients. Each runs in a child process of its own, one after the
other. Reported per side: seconds per round (median) and in total, central test accuracy, the epsilon each one
reports, and the true epsilon composed over all rounds (:mod:`.epsilon`, from the clients' data sizes alone).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privatune.common.accounting import TARGET_EPSILON_MAX
from privatune.simulations.benchmarks.modes.bench import run_child
from privatune.simulations.benchmarks.peer.epsilon import true_epsilons
from privatune.simulations.benchmarks.report import (
    Log,
    bench_parser,
    environment,
    fmt_eps,
    fmt_num,
    fmt_pct,
    load_average,
    markdown_table,
    median,
    plan_from_options,
    print_flush,
    ratio,
    results_folder,
    run_header,
    write_results,
)

NAME = "peer"
PLAIN_CHILD = "privatune.simulations.benchmarks.peer.plain"
AIM_RATIO = 1.2  # the aim: privatune's time per round within 1.2x of the plain example's
QUICK = {"clients": 2, "rounds": 2, "max_records": 200, "local_epochs": 1}


@dataclass(frozen=True)
class PeerPlan:
    """The shared setting. Defaults: the digits preset's CNN trained in full (both sides compute the same
    per-sample gradients; privatune's head mode would train on cached features, which the example cannot)."""

    preset: str = "digits"
    mode: str = "full"
    clients: int = 5
    rounds: int = 3
    local_epochs: int = 0  # 0 = the mode's (full: 3)
    batch_size: int = 0  # 0 = the mode's (full: 64)
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    max_records: int = 0
    seed: int = 42

    def checked(self) -> PeerPlan:
        from privatune.common.config import RunConfig

        if self.clients < 2:
            raise ValueError("--clients must be at least 2 (Flower's FedAvg waits for 2)")
        if self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if self.noise_multiplier <= 0:
            raise ValueError("--noise-multiplier must be > 0 (both sides run DP at the same sigma)")
        RunConfig.from_flower(self.run_config())  # a bad setting fails before anything runs
        return self

    def run_config(self) -> dict[str, Any]:
        """The run config both sides read (kebab-case, as ``privatune simulate --run-config`` takes it)."""
        rc: dict[str, Any] = {
            "preset": self.preset,
            "mode": self.mode,
            "num-server-rounds": self.rounds,
            "noise-multiplier": self.noise_multiplier,
            # sigma is fixed, so nothing is calibrated to a target; privatune still stops a client whose run would
            # pass target-epsilon (the plain side has no such stop): the largest target, so both train every round
            "target-epsilon": TARGET_EPSILON_MAX,
            "max-grad-norm": self.max_grad_norm,
            "delta": self.delta,
            "val-fraction": 0.0,  # every local record trains, as in plain Flower
            "backbone-lr-scale": 1.0,  # one learning rate for every parameter, as the example's SGD
            "seed": self.seed,
            "max-records": self.max_records,
        }
        if self.local_epochs:
            rc["local-epochs"] = self.local_epochs
        if self.batch_size:
            rc["batch-size"] = self.batch_size
        return rc


def privatune_side(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Figures of the privatune run from its summary and ``metrics.jsonl`` (cumulative seconds per round)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = sorted(rows, key=lambda r: r["round"])
    seconds = [float(r["seconds"]) for r in rows]
    clients: dict[str, dict[str, Any]] = {}
    for r in rows:
        for name, c in (r.get("clients") or {}).items():
            entry = clients.setdefault(name, {"rounds": 0})
            entry.update(num_examples=int(c["num-examples"]), reported=float(c["epsilon"]))
            entry["rounds"] += 1
    return {
        "round_seconds": [b - a for a, b in itertools.pairwise(seconds)],
        "test_accuracy": summary.get("test_accuracy"),
        "status": summary.get("status"),
        "clients": clients,
    }


def plain_side(summary: dict[str, Any]) -> dict[str, Any]:
    """Figures of the plain run: each client's last reported epsilon (one round's, as the example reports)."""
    clients: dict[str, dict[str, Any]] = {}
    for per_round in summary.get("clients", []):
        for name, c in per_round.items():
            entry = clients.setdefault(name, {"rounds": 0})
            entry.update(num_examples=int(c["num-examples"]), reported=float(c["epsilon"]))
            entry["rounds"] += 1
    return {
        "round_seconds": list(summary.get("round_seconds", [])),
        "test_accuracy": summary.get("test_accuracy"),
        "status": summary.get("status"),
        "clients": clients,
    }


def add_figures(side: dict[str, Any], cfg: Any, plan: PeerPlan, wall: float) -> dict[str, Any]:
    """Median and total round time, the wall time of its process, and the true epsilons of its clients."""
    rounds = side["round_seconds"]
    clients = side["clients"]
    true = true_epsilons(
        {k: c["num_examples"] for k, c in clients.items()},
        {k: c["rounds"] for k, c in clients.items()},
        cfg.batch_size,
        cfg.local_epochs,
        plan.noise_multiplier,
        plan.delta,
    )
    for name, row in true.items():
        clients[name].update(row)
    side.update(
        median_round_seconds=median(rounds) if rounds else float("nan"),
        total_round_seconds=sum(rounds),
        wall_seconds=wall,
        max_reported_epsilon=max((c["reported"] for c in clients.values()), default=float("nan")),
        max_composed_pld=max((c["composed_pld"] for c in clients.values()), default=float("nan")),
        max_composed_rdp=max((c["composed_rdp"] for c in clients.values()), default=float("nan")),
    )
    return side


def render(result: dict[str, Any]) -> str:
    """The side-by-side table, the per-client epsilons and the time ratio."""
    sides = result["sides"]
    head = ["side", "s/round (median)", "s (rounds)", "s (process)", "accuracy %", "reported eps", "true eps PLD"]
    rows = [
        [
            name,
            fmt_num(s["median_round_seconds"]),
            fmt_num(s["total_round_seconds"], ".1f"),
            fmt_num(s["wall_seconds"], ".1f"),
            fmt_pct(s["test_accuracy"]),
            fmt_eps(s["max_reported_epsilon"]),
            fmt_eps(s["max_composed_pld"]),
        ]
        for name, s in sides.items()
    ]
    per_client = [
        [
            name,
            str(c["num_examples"]),
            fmt_eps(sides["plain"]["clients"].get(name, {}).get("reported")),
            fmt_eps(sides["privatune"]["clients"].get(name, {}).get("reported")),
            fmt_eps(c["one_round_pld"]),
            fmt_eps(c["composed_pld"]),
            fmt_eps(c["composed_rdp"]),
        ]
        for name, c in sorted(sides["privatune"]["clients"].items())
    ]
    client_head = ["client", "records", "plain reports", "privatune reports", "1 round PLD", "all rounds PLD", "RDP"]
    return "\n\n".join(
        [
            markdown_table(head, rows),
            markdown_table(client_head, per_client),
            f"time per round privatune / plain: {fmt_num(result['ratio_median_round'])}x median, "
            f"{fmt_num(result['ratio_total_rounds'])}x over all rounds (aim <= {AIM_RATIO}x)",
        ]
    )


def run(plan: PeerPlan, out: Path, log: Log = print) -> dict[str, Any]:
    """Both sides, plain first; writes ``out/bench_peer.json``."""
    from privatune.common.config import RunConfig

    out = results_folder(out)
    rc = plan.run_config()
    cfg = RunConfig.from_flower(rc)
    result = run_header(NAME, plan, environment("torch", "flwr", "opacus", load_before=load_average()))
    result["run_config"] = rc
    result["sides"] = {}
    for tag, child_module, figures in (
        ("plain", PLAIN_CHILD, lambda s, _o: plain_side(s)),
        ("privatune", "privatune.simulations.benchmarks.modes.child", privatune_side),
    ):
        log(f"{tag}: {plan.clients} clients, {plan.rounds} rounds ...")
        load = load_average()  # the machine is shared: each side's load (1, 5, 15 min) as it starts and ends
        t0 = time.perf_counter()
        child, summary, log_text = run_child(rc, plan.clients, out, tag, log, child_module=child_module)
        wall = float(child.get("seconds") or time.perf_counter() - t0)
        if child.get("status") != "completed":
            raise RuntimeError(f"{tag} side did not complete: {child.get('error') or log_text[-2000:]}")
        result["sides"][tag] = add_figures(figures(summary, out / "runs" / tag), cfg, plan, wall)
        result["sides"][tag].update(load_start=load, load_end=load_average())
        log(f"{tag}: done in {wall:.0f} s")
    plain, priv = result["sides"]["plain"], result["sides"]["privatune"]
    result["ratio_median_round"] = ratio(priv["median_round_seconds"], plain["median_round_seconds"])
    result["ratio_total_rounds"] = ratio(priv["total_round_seconds"], plain["total_round_seconds"])
    result["load_after"] = load_average()
    result["tables"] = render(result)
    write_results(out / "bench_peer.json", result)
    log("\n" + result["tables"])
    log(f"\nresults in {out / 'bench_peer.json'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(NAME, "The same DP federation through plain Flower (Opacus example) and privatune.")
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--mode", default="full")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=0, help="0 = the mode's")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the mode's")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-records", type=int, default=0, help="0 = the whole dataset")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    names = [
        "preset",
        "mode",
        "clients",
        "rounds",
        "local_epochs",
        "batch_size",
        "noise_multiplier",
        "max_grad_norm",
        "delta",
        "max_records",
        "seed",
    ]
    plan = plan_from_options(parser, args, PeerPlan, names, QUICK)
    run(plan, args.out, log=print_flush)
    return 0
