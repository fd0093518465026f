"""`privatune simulate --stages S`: the terminal side of a continual run (round lines per stage, the table after
each stage). The stages themselves run in simulations/continual.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from privatune.cli.terminal import console

if TYPE_CHECKING:
    from privatune.common.config import RunConfig


def run_stages(
    cfg: RunConfig,
    clients: int,
    out: Path,
    stages: int,
    class_incremental: bool,
    rehearsal: float,
    verbose: bool,
    client_cpus: float,
    client_gpus: float,
) -> None:
    """Run the stages with each stage's round lines, then the continual table; exit 1 if a stage failed."""
    import json

    from privatune.simulations.continual import CONTINUAL_JSON, CONTINUAL_PLOT, run_continual, stage_dir
    from privatune.simulations.progress import RoundPrinter

    printers: dict[int, RoundPrinter] = {}

    def observer_for(stage: int, one: RunConfig) -> RoundPrinter:
        console.rule(f"stage {stage} of {stages}", style="bold")
        printers[stage] = RoundPrinter(console, one, clients)
        printers[stage].header()
        return printers[stage]

    def after_stage(stage: int, summary: dict[str, Any]) -> None:
        printers[stage].final(summary, stage_dir(out, stage))

    summary = run_continual(
        cfg,
        clients,
        out,
        stages=stages,
        split="class" if class_incremental else "iid",
        rehearsal=rehearsal,
        observer_for=observer_for,
        after_stage=after_stage,
        verbose=verbose,
        client_cpus=client_cpus,
        client_gpus=client_gpus,
        stop_on_signal=True,
    )
    result = json.loads((out / CONTINUAL_JSON).read_text())
    console.print(continual_table(result))
    console.print(f"results: {out / CONTINUAL_JSON}, plot: {out / CONTINUAL_PLOT}", highlight=False)
    if summary["status"] != "completed":
        console.print(f"[bold red]continual run {summary['status']}[/] after {summary['stages_completed']} stage(s)")
        raise typer.Exit(1)


def continual_table(result: dict[str, Any]) -> Table:
    """Accuracy on every stage's test set after each stage, with the average, forgetting and backward transfer."""
    n = int(result["stages"])
    t = Table(title=f"continual: accuracy per stage's test set ({result['split']}, rehearsal {result['rehearsal']:g})")
    t.add_column("after stage")
    for j in range(1, n + 1):
        t.add_column(f"test {j}", justify="right")
    for name in ("average", "forgetting", "BWT"):
        t.add_column(name, justify="right")
    for row in result["per_stage"]:
        if "accuracy" not in row:
            continue
        acc = [f"{a:.3f}" for a in row["accuracy"]] + [""] * (n - len(row["accuracy"]))
        signed = ["-" if v is None else f"{v:+.3f}" for v in (row["forgetting"], row["backward_transfer"])]
        t.add_row(str(row["stage"]), *acc, f"{row['average_accuracy']:.3f}", *signed)
    return t
