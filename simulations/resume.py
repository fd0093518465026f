"""``privatune simulate --resume RUN_DIR``: continue a finished or interrupted simulation from its checkpoint.

Separate from simulations/simulate.py because a resume has its own rules: the run config is the run folder's own
(config.json; an option that contradicts it is refused, only the number of rounds and the round timeout may
change), the simulated sites keep their ledgers (RUN/ledgers, so every spend stays counted once), and the resumed
rounds run under the same Flower run id, so each site composes them with its earlier spends in this run. A spend
a site recorded in a round that never completed (the run was killed) stays in its ledger: it was spent; the round
is run again and ``privatune audit`` reports the two spends of that round as a retried round (docs/resume.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from privatune.common.config import ConfigError, RunConfig
from privatune.common.ledger import SERVER_LEDGER_NAME, SiteLedger
from privatune.server.checkpoint import CheckpointError, checkpoint_dir, read_commit
from privatune.server.run_record import write_json_atomic

SIMULATION_RECORD = "simulation.json"  # what only the simulation knows: how many clients it ran
CHANGEABLE = ("num_server_rounds", "round_timeout")  # what a resume may change in the run config


def write_simulation_record(out: Path, num_clients: int) -> None:
    write_json_atomic(Path(out) / SIMULATION_RECORD, {"num_clients": num_clients})


def _stored(run_dir: Path) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """The run folder's config.json, its number of clients, and its checkpoint's commit record."""
    config_path = run_dir / "config.json"
    try:
        stored = json.loads(config_path.read_text())
        clients = int(json.loads((run_dir / SIMULATION_RECORD).read_text())["num_clients"])
    except FileNotFoundError as err:
        raise ConfigError(
            f"--resume {run_dir}: {Path(str(err.filename)).name} is missing; it is not the folder of a simulation "
            "this privatune ran (or it never started): give the --out folder of an earlier `privatune simulate`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--resume {run_dir}: its run record cannot be read ({err})") from None
    try:
        commit = read_commit(checkpoint_dir(run_dir))
    except CheckpointError as err:
        raise ConfigError(f"--resume {run_dir}: {err}") from None
    return stored, clients, commit


def resume_config(run_dir: Path, given: dict[str, Any], rounds: int, clients: int | None) -> tuple[RunConfig, int]:
    """The resumed run's config and number of clients: the run folder's own, with only ``CHANGEABLE`` changed.

    ``given``: the run-config values the command line named (an option, --run-config); one that contradicts the
    stored config is refused, naming both values. ``rounds`` 0 keeps the stored number of rounds."""
    run_dir = Path(os.path.abspath(run_dir))
    stored, stored_clients, commit = _stored(run_dir)
    if clients is not None and clients != stored_clients:
        raise ConfigError(
            f"--clients {clients}: the run in {run_dir} has {stored_clients} clients (each keeps its ledger); "
            "drop --clients to resume it"
        )
    before = RunConfig.from_flower(stored)
    values = {**stored, **given, "out-dir": str(run_dir)}
    if rounds:
        values["num-server-rounds"] = rounds
    cfg = RunConfig.from_flower(values)
    for f in fields(RunConfig):
        if f.name in (*CHANGEABLE, "out_dir"):
            continue
        was, now = getattr(before, f.name), getattr(cfg, f.name)
        if was != now:
            key = f.name.replace("_", "-")
            raise ConfigError(
                f"{key}: the run in {run_dir} has {was!r} (its config.json), this command asks for {now!r}; "
                "--resume continues the run's own config: drop the option (only --rounds and round-timeout "
                "may change)"
            )
    done = int(commit["round"])
    if cfg.num_server_rounds <= done:
        raise ConfigError(
            f"--rounds: the run in {run_dir} has completed {done} round(s) and was asked for "
            f"{cfg.num_server_rounds}; pass --rounds N with N > {done} to run more"
        )
    if cfg.num_server_rounds != before.num_server_rounds and cfg.private and cfg.noise_multiplier <= 0:
        raise ConfigError(
            f"--rounds {cfg.num_server_rounds}: the noise of the run in {run_dir} was calibrated so that "
            f"{before.num_server_rounds} rounds reach target-epsilon={before.target_epsilon:g}; more rounds would "
            "pass that target and its sites would refuse them. Start a new run from this one's model instead "
            f'(--run-config "initial-checkpoint={run_dir}"), or give runs you mean to extend a noise-multiplier'
        )
    return cfg, stored_clients


def orphan_spends(run_dir: Path, run_id: str, completed: int) -> dict[str, list[int]]:
    """Site -> the rounds after the last completed one in which it recorded a spend (a killed round's: spent,
    and kept; the resumed run runs that round again)."""
    found: dict[str, list[int]] = {}
    for path in sorted((Path(run_dir) / "ledgers").glob("*.ledger.sqlite")):
        if path.name == SERVER_LEDGER_NAME:
            continue
        rounds = sorted(
            {
                r.entry.round
                for r in SiteLedger(path).entries()
                if r.entry.run_id == run_id and r.entry.round > completed
            }
        )
        if rounds:
            found[path.name] = rounds
    return found


def flower_run(run_dir: Path) -> Any:
    """A Flower ``Run`` with the checkpoint's run id: the simulated sites key their per-run accounting by it."""
    from flwr.common.constant import TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run

    commit = read_commit(checkpoint_dir(run_dir))
    try:
        run_id = int(commit["run_id"])
    except ValueError:
        raise ConfigError(f"--resume {run_dir}: run id {commit['run_id']!r} is not a simulation's") from None
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    return run


def run_simulation_as(run: Any, server_app: Any, client_app: Any, num_clients: int, backend_config: Any) -> None:
    """Flower's in-process simulation under a given run (its public ``run_simulation`` draws a fresh run id; the
    private entry point takes one, pinned by flwr's version in pyproject.toml)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    _run_simulation(
        num_supernodes=num_clients,
        client_app=client_app,
        server_app=server_app,
        backend_config=backend_config,
        run=run,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
    )
