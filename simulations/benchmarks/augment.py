"""The augmentation benchmark (issue 16): accuracy and time per round with augmentation multiplicity K under DP.

    python -m privatune.simulations.benchmarks.augment --out DIR            # the whole grid
    python -m privatune.simulations.benchmarks.augment --only image --quick # a smoke run: not for figures

The grid: each image preset (digits, Fashion-MNIST) at epsilon 4 with K = 1 (no augmentation), 4 and 8 views of the
image ops; TREC-6 at epsilon 8 without and with the text ops (K views). Every cell is a real federated simulation
in a child process (``modes.child``, through ``simulations.simulate.run_simulation``), read back with the modes
benchmark's records, so a finished cell is reused and an interrupted benchmark continues.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from privatune.common.config import RunConfig
from privatune.simulations.benchmarks.modes.bench import run_child
from privatune.simulations.benchmarks.modes.records import cell_result, read_metrics, round_seconds
from privatune.simulations.benchmarks.report import (
    Log,
    bench_parser,
    environment,
    fmt_eps,
    fmt_num,
    fmt_pct,
    markdown_table,
    median,
    plan_or_exit,
    print_flush,
    results_folder,
    run_header,
    write_results,
)

NAME = "augment"
IMAGE_AUGMENT = "shift=2,rotate=10,erase=0.25"
TEXT_AUGMENT = "swap=0.1,delete=0.1,synonym=0.1,dropout=0.1"


@dataclass(frozen=True)
class AugCell:
    """One federation of the grid: a preset and mode at one epsilon, with ``views`` augmented views (1 = none)."""

    preset: str
    mode: str
    epsilon: float
    views: int
    augment: str

    @property
    def tag(self) -> str:
        what = "noaug" if not self.augment else f"k{self.views}"
        return f"{self.preset}-{self.mode}-eps{self.epsilon:g}-{what}"


@dataclass(frozen=True)
class AugmentPlan:
    """The grid and the sizes its cells share; the defaults are the issue's settings at a size this machine runs."""

    image_presets: tuple[str, ...] = ("digits", "fashion-mnist")
    image_mode: str = "last-k"
    image_epsilon: float = 4.0
    image_views: tuple[int, ...] = (1, 4, 8)
    image_augment: str = IMAGE_AUGMENT
    text_preset: str = "trec6"
    text_mode: str = "lora"
    text_epsilon: float = 8.0
    text_views: int = 2
    text_augment: str = TEXT_AUGMENT
    # the modes benchmark's LoRA settings (docs/benchmarks.md), at its reduced size: the trec6 preset's own values
    # are the head's (lr 2, batch 64, 5 local epochs, 5 rounds)
    text_settings: Mapping[str, Any] = field(
        default_factory=lambda: {
            "lr": 1.0,
            "batch-size": 32,
            "local-epochs": 2,
            "num-server-rounds": 3,
            "max-length": 32,
        }
    )
    only: str = ""  # "", "image" or "text"
    clients: int = 10
    alpha: float = 1.0
    rounds: int = 0  # 0 = the preset's
    seed: int = 42
    max_records: Mapping[str, int] = field(default_factory=lambda: {"fashion-mnist": 4000, "trec6": 2000})
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def cells(self) -> list[AugCell]:
        out: list[AugCell] = []
        if self.only in ("", "image"):
            for p in self.image_presets:
                for k in self.image_views:
                    out.append(AugCell(p, self.image_mode, self.image_epsilon, k, self.image_augment if k > 1 else ""))
        if self.only in ("", "text"):
            out.append(AugCell(self.text_preset, self.text_mode, self.text_epsilon, 1, ""))
            out.append(AugCell(self.text_preset, self.text_mode, self.text_epsilon, self.text_views, self.text_augment))
        return out

    def run_config(self, cell: AugCell) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.overrides)
        values.update(
            {
                "preset": cell.preset,
                "mode": cell.mode,
                "dp": True,
                "target-epsilon": cell.epsilon,
                "partition": "dirichlet",
                "alpha": self.alpha,
                "seed": self.seed,
                "augment": cell.augment,
                "augment-views": cell.views,
            }
        )
        if cell.preset == self.text_preset:
            values.update(self.text_settings)
        if self.max_records.get(cell.preset):
            values["max-records"] = self.max_records[cell.preset]
        if self.rounds:
            values["num-server-rounds"] = self.rounds
        return values

    def checked(self) -> AugmentPlan:
        """The plan once every cell's run config validates (an unknown op or a bad K fails before anything runs)."""
        if self.only not in ("", "image", "text"):
            raise ValueError(f"--only must be image or text, got {self.only!r}")
        if self.clients < 1:
            raise ValueError(f"--clients must be at least 1, got {self.clients}")
        for cell in self.cells():
            RunConfig.from_flower(self.run_config(cell))
        return self


QUICK = {"clients": 2, "rounds": 1, "image_presets": ("digits",), "image_views": (1, 2)}


def measure(plan: AugmentPlan, cell: AugCell, out: Path, log: Log) -> dict[str, Any]:
    rc = plan.run_config(cell)
    child, summary, log_text = run_child(rc, plan.clients, out, cell.tag, log)
    cfg = RunConfig.from_flower(rc)
    figures = cell_result(summary, child, log_text, cfg.local_epochs)
    rounds = round_seconds(read_metrics(out / "runs" / cell.tag / "metrics.jsonl"))
    return {
        "tag": cell.tag,
        "preset": cell.preset,
        "mode": cell.mode,
        "epsilon": cell.epsilon,
        "views": cell.views,
        "augment": cell.augment,
        "run_config": rc,
        "error": child.get("error"),
        "round_seconds": rounds,
        "seconds_per_round": median(rounds) if rounds else math.nan,
        **figures,
    }


HEADERS = (
    "preset (mode)",
    "augmentation",
    "K",
    "epsilon",
    "accuracy %",
    "macro-F1 %",
    "max client epsilon",
    "s / round",
    "s / local epoch (all sites)",
)


def table(cells: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [
            f"{c['preset']} ({c['mode']})",
            f"`{c['augment']}`" if c["augment"] else "none",
            str(c["views"]),
            f"{c['epsilon']:g}",
            fmt_pct(c.get("accuracy")),
            fmt_pct(c.get("macro_f1")),
            fmt_eps(c.get("max_client_epsilon")),
            fmt_num(c.get("seconds_per_round"), ".1f"),
            fmt_num(c.get("epoch_seconds"), ".1f"),
        ]
        if c.get("status") != "failed"
        else [
            f"{c['preset']} ({c['mode']})",
            f"`{c['augment']}`" if c["augment"] else "none",
            str(c["views"]),
            f"{c['epsilon']:g}",
            f"failed: {c.get('error') or 'see its log'}",
            "",
            "",
            "",
            "",
        ]
        for c in cells
    ]
    return markdown_table(HEADERS, rows)


def run(plan: AugmentPlan, out: Path, log: Log = print) -> dict[str, Any]:
    out = results_folder(out)
    result = run_header(NAME, plan, environment("torch", "flwr", "opacus", "kornia"))
    result["cells"] = []
    todo = plan.cells()
    for i, cell in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {cell.tag} ...")
        res = measure(plan, cell, out, log)
        result["cells"].append(res)
        acc = res.get("accuracy")
        log(
            f"[{i}/{len(todo)}] {cell.tag}: {res['status']}, accuracy "
            f"{'-' if acc is None else format(100 * acc, '.2f')} %, {res.get('wall_seconds') or math.nan:.0f} s"
        )
        write_results(out / "bench_augment.json", result)
    result["table"] = table(result["cells"])
    write_results(out / "bench_augment.json", result)
    log("\n" + result["table"])
    log(f"\nresults in {out / 'bench_augment.json'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(NAME, "Augmentation multiplicity under DP: accuracy and time per round, K = 1, 4, 8.")
    parser.add_argument("--only", default="", help="image or text (default: both)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=0, help="0 = the preset's")
    parser.add_argument("--image-augment", default=IMAGE_AUGMENT)
    parser.add_argument("--text-augment", default=TEXT_AUGMENT)
    parser.add_argument("--text-views", type=int, default=2)
    args = parser.parse_args(argv)

    def build() -> AugmentPlan:
        plan = AugmentPlan(
            only=args.only,
            clients=args.clients,
            rounds=args.rounds,
            image_augment=args.image_augment,
            text_augment=args.text_augment,
            text_views=args.text_views,
        )
        if args.quick:
            plan = replace(plan, **QUICK)  # type: ignore[arg-type]
        return plan.checked()

    plan = plan_or_exit(parser, build)
    run(plan, Path(args.out), log=print_flush)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
