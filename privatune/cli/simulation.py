"""`privatune simulate`: a whole federation on this machine. Separate because it alone drives Ray and the
round printer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from privatune.cli.inputs import UsageError, check_resources, parse_kv, read_run_config_file
from privatune.cli.terminal import console
from privatune.common.config import PRESETS
from privatune.common.models import FINE_TUNING_MODES

if TYPE_CHECKING:
    from privatune.common.config import RunConfig


def simulate(
    preset: str = typer.Option("", help=f"{' | '.join(PRESETS)} (default: sms-spam, or none with --model)"),
    model: str = typer.Option(
        "",
        "--model",
        help="minilm | digits-cnn | hf:FOLDER | torch:module:function; without --preset: your own task, on --data",
    ),
    clients: int = typer.Option(10, help="number of simulated clients"),
    rounds: int = typer.Option(0, help="server rounds (0 = the preset's)"),
    epsilon: str = typer.Option("8", help="target epsilon per client over the whole run; 'inf' = no DP"),
    no_dp: bool = typer.Option(False, "--no-dp", help="train without DP (a baseline)"),
    mode: str = typer.Option("", help=f"{' | '.join(FINE_TUNING_MODES)} (default: the preset's)"),
    partition: str = typer.Option("dirichlet", help="iid | dirichlet"),
    alpha: float = typer.Option(1.0, help="Dirichlet concentration (smaller = more label skew)"),
    seed: int = typer.Option(42, help="simulation seed (>= 0)"),
    secure_aggregation: str = typer.Option("none", "--secure-aggregation", help="none | he"),
    out: Path = typer.Option(Path("runs/latest"), help="output folder (one run per folder)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete the run already in --out first"),
    run_config: str = typer.Option("", "--run-config", help='extra overrides, e.g. "lr=0.5 batch-size=32"'),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="a TOML file of run-config keys (e.g. privatune tune's best-trial.toml); options given and --run-config win",
    ),
    client_cpus: float = typer.Option(1.0, "--client-cpus", help="CPU cores per simulated client"),
    client_gpus: float = typer.Option(0.0, "--client-gpus", help="GPU share per simulated client (0.5 = two per GPU)"),
    verbose: bool = typer.Option(False, "--verbose", help="show Flower's and Ray's logs"),
    ray_address: str = typer.Option(
        "",
        "--ray-address",
        envvar="RAY_ADDRESS",
        help="run the clients on this running Ray cluster (HOST:PORT of its head; docs/ray-cluster.md)",
    ),
    data: Path | None = typer.Option(None, "--data", help="your own data: csv, jsonl, npz or an image folder"),
    test_data: Path | None = typer.Option(
        None, "--test-data", help="your own test file (default: hold out test-fraction of --data)"
    ),
    data_format: str = typer.Option(
        "", "--data-format", help="csv | jsonl | npz | image-folder (default: from the name)"
    ),
    text_column: str = typer.Option("text", "--text-column", help="csv/jsonl: the column holding the text"),
    label_column: str = typer.Option("label", "--label-column", help="csv/jsonl: the column holding the label"),
    labels: str = typer.Option(
        "", "--labels", help='the label set in index order, e.g. "neg,pos" (default: the sorted labels found)'
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="continue the run in this folder from its last completed round (docs/resume.md)"
    ),
    stages: int = typer.Option(
        0, "--stages", help="continual: each client's data arrives in S stages (docs/continual.md)"
    ),
    class_incremental: bool = typer.Option(
        False, "--class-incremental", help="with --stages: stage s brings the s-th group of labels (in label order)"
    ),
    rehearsal: float = typer.Option(
        0.0, "--rehearsal", help="with --stages: fraction of earlier stages' records trained again (costs budget)"
    ),
) -> None:
    """Run a simulated federation on this machine and report accuracy against epsilon.

    Exit codes: 0 completed (or stopped early after training), 1 failed (no round aggregated: the
    reasons are printed), 2 bad input, 130/143 interrupted by SIGINT/SIGTERM.
    """
    from privatune.common.config import RunConfig

    try:
        eps = math.inf if epsilon.strip().lower() in ("inf", "infinity") else float(epsilon)
    except ValueError:
        raise UsageError(f"--epsilon must be a number or 'inf', got {epsilon!r}") from None
    if clients < 1:
        raise UsageError(f"--clients must be at least 1, got {clients}")
    if rounds < 0:
        raise UsageError(f"--rounds must be >= 1 (or 0 for the preset's), got {rounds}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    check_resources(client_cpus, client_gpus, ray_address)
    if ray_address:  # Ray's own variable: run_simulation joins that cluster (simulations/simulate.py)
        import os

        from privatune.simulations.simulate import RAY_ADDRESS_ENV

        os.environ[RAY_ADDRESS_ENV] = ray_address
    extra = parse_kv(run_config)
    check_stage_options(stages, class_incremental, rehearsal, resume is not None, set(extra))
    if resume is not None:
        named = {
            "preset": preset,
            "model": model,
            "target-epsilon": None if epsilon == "8" else eps,
            "dp": False if no_dp else None,
            "mode": mode,
            "partition": None if partition == "dirichlet" else partition,
            "alpha": None if alpha == 1.0 else alpha,
            "seed": None if seed == 42 else seed,
            "secure-aggregation": None if secure_aggregation == "none" else secure_aggregation,
        }
        theirs = [
            o
            for o, v in (("--data", data), ("--test-data", test_data), ("--labels", labels), ("--config", config))
            if v
        ]
        if theirs or overwrite or out != Path("runs/latest"):
            bad = [*theirs, *(["--overwrite"] if overwrite else []), *(["--out"] if out != Path("runs/latest") else [])]
            raise UsageError(f"--resume RUN_DIR is the run's folder and data: drop {', '.join(bad)}")
        given = {k: v for k, v in named.items() if v not in (None, "")}
        _resume(
            resume, {**given, **extra}, rounds, None if clients == 10 else clients, verbose, client_cpus, client_gpus
        )
        return
    if model and extra.get("model", model) != model:
        raise UsageError(f"--model {model} and --run-config model={extra['model']} disagree; give the model once")
    values: dict[str, object] = {
        "preset": preset or ("" if model else "sms-spam"),  # --model alone: no preset (docs/fine-tuning.md)
        "target-epsilon": eps,
        "dp": not no_dp and not math.isinf(eps),
        "partition": partition,
        "alpha": alpha,
        "seed": seed,
        "secure-aggregation": secure_aggregation,
        "out-dir": str(out),
    }
    if rounds:
        values["num-server-rounds"] = rounds
    if mode:
        values["mode"] = mode
    if model:
        values["model"] = model
    if config is not None:
        typed = _given_options()
        for key, value in read_run_config_file(config).items():
            if _OPTION_OF.get(key) not in typed:  # an option typed on the command line wins over the file
                values[key] = value
        values["dp"] = values["dp"] is True and not math.isinf(float(str(values["target-epsilon"])))
    values.update(extra)
    if not values["preset"] and data is None and not {"dataset", "sim-data"} & set(extra):
        who = f"--model {model} without --preset" if model else 'preset="" (no preset)'
        raise UsageError(
            f"{who} is a task of your own: pass --data FILE (and --test-data FILE), "
            "or add --preset NAME to train on that preset's dataset"
        )
    # With --data the label set comes from the file: a stand-in one lets the rest be checked before it is read.
    cfg = RunConfig.from_flower({**values, "labels": "label-0,label-1"} if data is not None else values)
    own = None
    if data is not None:
        from privatune.cli.own_data import load_own_data

        model_option = (
            f"--model {model}" if model else "--run-config model" if "model" in extra else f"--preset {cfg.preset}"
        )
        own = load_own_data(
            data,
            test_data,
            fmt=data_format,
            text_column=text_column,
            label_column=label_column,
            labels=labels,
            model=cfg.model,
            model_option=model_option,
        )  # read and checked before --out is claimed: bad data leaves the old run in place
    elif test_data is not None or labels or data_format:
        raise UsageError("--test-data, --labels and --data-format go with --data FILE (your own data)")
    from privatune.simulations.run_folder import claim
    from privatune.simulations.simulate import confine_writes, prepare_config

    out = claim(out, overwrite)  # one run per folder; a probe file proves it is writable
    confine_writes(out)
    if own is not None:
        from privatune.cli.own_data import describe, write_copy

        values.update({"sim-data": str(write_copy(own, out)), "labels": ",".join(own.data.label_names)})
        cfg = RunConfig.from_flower(values)
        console.print(describe(own), highlight=False, soft_wrap=True)
    cfg = prepare_config(cfg, clients, out)  # refuse bad sizes and missing keys before Ray starts
    if stages:
        from privatune.cli.continual import run_stages

        run_stages(cfg, clients, out, stages, class_incremental, rehearsal, verbose, client_cpus, client_gpus)
        return
    _run_and_report(cfg, clients, out, verbose, client_cpus, client_gpus)


STAGE_KEYS = ("sim-stages", "sim-stage", "sim-stage-split", "sim-rehearsal")


def check_stage_options(
    stages: int, class_incremental: bool, rehearsal: float, resume: bool, run_config_keys: set[str] | None = None
) -> None:
    """--stages and its options, before anything is read; the stage keys are --stages' to set, per stage."""
    given = sorted(set(run_config_keys or ()) & set(STAGE_KEYS))
    if given:
        raise UsageError(
            f"--run-config {', '.join(given)}: set per stage by --stages S (with --class-incremental, --rehearsal F)"
        )
    if stages < 0 or (stages == 0 and (class_incremental or rehearsal)):
        raise UsageError("--class-incremental and --rehearsal go with --stages S (S >= 1, the number of arrivals)")
    if stages and resume:
        raise UsageError("--resume continues one run; a continual run (--stages) cannot be resumed, run it again")
    if not (0.0 <= rehearsal <= 1.0):
        raise UsageError(f"--rehearsal is a fraction of the earlier stages' records in [0, 1], got {rehearsal}")


def _run_and_report(
    cfg: RunConfig,
    clients: int,
    out: Path,
    verbose: bool,
    client_cpus: float,
    client_gpus: float,
    *,
    resume: bool = False,
) -> None:
    """Run the simulation with round lines on the terminal; exit 1 if it failed (a fresh run or a resume)."""
    from privatune.simulations.progress import RoundPrinter
    from privatune.simulations.simulate import run_simulation

    printer = RoundPrinter(console, cfg, clients)
    printer.header()
    summary = run_simulation(
        cfg,
        clients,
        out,
        observer=printer,
        verbose=verbose,
        client_gpus=client_gpus,
        client_cpus=client_cpus,
        stop_on_signal=True,
        resume=resume,
    )
    printer.final(summary, out)
    if summary.get("status") == "failed":
        raise typer.Exit(1)


def _resume(
    run_dir: Path,
    given: dict[str, object],
    rounds: int,
    clients: int | None,
    verbose: bool,
    client_cpus: float,
    client_gpus: float,
) -> None:
    """``--resume``: the run folder's own config, its sites' ledgers, its round numbers continuing."""
    from privatune.server.checkpoint import checkpoint_dir, read_commit
    from privatune.simulations.resume import orphan_spends, resume_config
    from privatune.simulations.simulate import confine_writes

    cfg, num_clients = resume_config(run_dir, given, rounds, clients)
    out = Path(cfg.out_dir)
    confine_writes(out)
    commit = read_commit(checkpoint_dir(out))
    done = int(commit["round"])
    console.print(
        f"resuming run {commit['run_id']} in {out}: round {done} of {cfg.num_server_rounds} completed", highlight=False
    )
    for site, spent in orphan_spends(out, str(commit["run_id"]), done).items():
        console.print(
            f"{site}: spent in round(s) {', '.join(map(str, spent))}, which did not complete; those spends stay "
            "counted (they were spent) and the round is run again",
            highlight=False,
        )
    _run_and_report(cfg, num_clients, out, verbose, client_cpus, client_gpus, resume=True)


# Run-config keys that simulate's own options also set (the option's parameter name).
_OPTION_OF = {
    "preset": "preset",
    "model": "model",
    "num-server-rounds": "rounds",
    "target-epsilon": "epsilon",
    "dp": "no_dp",
    "mode": "mode",
    "partition": "partition",
    "alpha": "alpha",
    "seed": "seed",
    "secure-aggregation": "secure_aggregation",
}


def _given_options() -> set[str]:
    """The options typed on the command line (not left at their defaults); none when called from Python."""
    import click
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return set()
    return {n for n in ctx.params if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}
