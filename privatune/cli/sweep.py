"""`privatune sweep`: accuracy and macro-F1 against epsilon, each point a `privatune simulate` run.

The command takes every option of ``privatune simulate`` except the ones it sweeps (``--epsilon``, ``--mode``,
``--no-dp``) or sets per point (``--out``, ``--overwrite``, ``--resume``): its signature is built from simulate's, so the two
cannot drift apart, and each point calls :func:`privatune.cli.simulation.simulate` itself.
"""

from __future__ import annotations

import inspect
import math
import typing
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from privatune.cli.inputs import UsageError, parse_kv
from privatune.cli.simulation import simulate
from privatune.cli.terminal import console

# simulate's continual options (issue 15): a sweep point is one run, never a continual one.
CONTINUAL_OFF = ("stages", "class_incremental", "rehearsal")
# simulate's options the sweep sets itself, per point.
NOT_FORWARDED = ("epsilon", "no_dp", "mode", "out", "overwrite", "resume", *CONTINUAL_OFF)


def _sweep_options(
    epsilon: str = typer.Option(
        "0.5,1,2,4,8,inf", "--epsilon", help="target epsilons per site, comma-separated; 'inf' = no DP"
    ),
    mode: str = typer.Option("", "--mode", help="fine-tuning modes, comma-separated (default: the preset's)"),
    out: Path = typer.Option(Path("runs/sweep"), help="the sweep folder (one run folder per point inside it)"),
    baseline: bool = typer.Option(
        True, "--baseline/--no-baseline", help="train the centralised non-DP baseline per mode (simulation only)"
    ),
) -> None:
    """The sweep's own options (the rest are simulate's)."""


def sweep(**options: Any) -> None:
    """Accuracy and macro-F1 against epsilon: one simulation per (mode, epsilon), with the centralised non-DP
    baseline. Writes sweep.json and sweep.png in --out and states what the sweep spent; a rerun of the same
    sweep skips its finished points."""
    from privatune.common.config import RunConfig
    from privatune.simulations.run_folder import check_writable
    from privatune.simulations.simulate import confine_writes
    from privatune.simulations.sweep import build_points, parse_epsilons, parse_modes, run_sweep

    own = {k: options.pop(k) for k in inspect.signature(_sweep_options).parameters}
    extra = parse_kv(options["run_config"])
    swept = sorted({"mode", "target-epsilon", "dp", "out-dir"} & set(extra))
    if swept:
        raise UsageError(
            f"--run-config sets {', '.join(swept)}, which the sweep sets per point: use --mode and --epsilon"
        )
    epsilons = parse_epsilons(own["epsilon"])
    model, preset = options["model"], options["preset"]
    # The mode a point gets without --mode: the preset's, or the recommended one for the model (as simulate picks).
    chosen = extra.get("model", model)
    default_mode = RunConfig.create(
        preset=extra.get("preset", preset or ("" if chosen else "sms-spam")), model=chosen
    ).mode
    modes = parse_modes(own["mode"], default_mode)
    points = build_points(modes, epsilons)
    folder = check_writable(Path(own["out"]))
    confine_writes(folder)  # every point's Flower and matplotlib files in the sweep folder
    if options.get("data") is not None:
        data = f"the records of {options['data']}, shared out to {options['clients']} simulated sites"
    elif preset or not model:
        data = f"the {preset or 'sms-spam'} preset's dataset, shared out to {options['clients']} simulated sites"
    else:
        data = f"the run's dataset, shared out to {options['clients']} simulated sites"

    def run_point(point: Any, run_dir: Path, overwrite: bool) -> None:
        try:
            simulate(
                **options,
                epsilon="inf" if not point.private else repr(point.epsilon),
                no_dp=not point.private,
                mode=point.mode,
                out=run_dir,
                overwrite=overwrite,
                resume=None,  # a point reruns whole (run_sweep skips the finished ones)
                stages=0,  # CONTINUAL_OFF: a point is one run
                class_incremental=False,
                rehearsal=0.0,
            )
        except typer.Exit as err:
            if err.exit_code not in (0, 1):  # 1: this run failed (its reasons printed); the sweep goes on
                raise

    console.print(
        f"[bold]privatune sweep[/]: {len(points)} runs ({', '.join(modes)} x epsilon "
        f"{', '.join('no DP' if math.isinf(e) else f'{e:g}' for e in epsilons)}) in {folder}/",
        highlight=False,
    )
    report = run_sweep(
        folder,
        points,
        run_point,
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        data=data,
        baseline=own["baseline"],
        say=lambda line: console.print(f"[bold cyan]{escape(line)}[/]", highlight=False),
    )
    print_report(report, folder)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.2f}"


def _eps(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    return "no DP" if math.isinf(x) else f"{x:.3g}"


def print_report(report: dict[str, Any], folder: Path) -> None:
    """The sweep's table, baselines and privacy statement on the terminal."""
    t = Table(title="accuracy against epsilon")
    for name, justify in (
        ("mode", "left"),
        ("target eps", "right"),
        ("spent eps (max site)", "right"),
        ("test acc %", "right"),
        ("macro-F1 %", "right"),
        ("status", "left"),
        ("run folder", "left"),
    ):
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for p in report["points"]:
        t.add_row(
            p["mode"],
            _eps(p["target_epsilon"]),
            _eps(p["epsilon_spent"]),
            _pct(p["accuracy"]),
            _pct(p["macro_f1"]),
            "skipped" if p["skipped"] else str(p["status"]),  # skipped: finished on an earlier run
            Path(p["run_folder"]).name,
        )
    for mode, b in (report.get("baselines") or {}).items():
        t.add_row(mode, "no DP", "-", _pct(b["accuracy"]), _pct(b["macro_f1"]), "baseline", "central")
    console.print(t)
    privacy = report["privacy"]
    per_site = privacy.get("dp_runs_composed_per_site") or {}
    if per_site:
        ts = Table(title="what the sweep's DP runs spent per site (composed over all of them)")
        ts.add_column("site")
        ts.add_column("epsilon", justify="right")
        for site, value in per_site.items():
            ts.add_row(site, _eps(value))
        console.print(ts)
    console.print(f"[yellow]privacy:[/] {escape(privacy['statement'])}", highlight=False, soft_wrap=True)
    console.print(f"results in {folder}/ (sweep.json, sweep.png, one run folder per point)", highlight=False)


def _signature() -> tuple[inspect.Signature, dict[str, Any]]:
    """The sweep's options, then simulate's less those the sweep sets (with their resolved type hints)."""
    own = inspect.signature(_sweep_options)
    hints = {**typing.get_type_hints(simulate), **typing.get_type_hints(_sweep_options)}
    params = list(own.parameters.values()) + [
        p for name, p in inspect.signature(simulate).parameters.items() if name not in NOT_FORWARDED
    ]
    params = [p.replace(annotation=hints[p.name]) for p in params]
    return inspect.Signature(params, return_annotation=None), {p.name: hints[p.name] for p in params}


sweep.__signature__, sweep.__annotations__ = _signature()  # type: ignore[attr-defined]
sweep.__annotations__["return"] = None

__all__ = ["print_report", "sweep"]
