"""A whole federation on one machine: Flower's simulation engine, the real ServerApp and ClientApp.

Everything the run writes goes to ``out_dir`` (results, ledgers, keys, feature cache); Ray's
session files go to a temporary folder that is removed afterwards, and Ray is shut down, so no
process outlives the command.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privatune.client.site_config import sim_ledger_dir
from privatune.client.site_secret import default_key_path, write_site_key
from privatune.common.config import DATASET_LABELS, ConfigError, RunConfig
from privatune.common.federation_data import check_federation_size
from privatune.common.ledger import site_ledger_filename
from privatune.common.offline import set_offline_env
from privatune.server.run_record import RoundReport, write_json_atomic

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues

log = logging.getLogger("privatune.simulate")


#: summary.json's ``federated_evaluation`` when a simulation skips it (see :func:`skip_unseen_evaluation`).
UNSEEN_EVALUATION = (
    "off: no site releases metrics (release-metrics=false) and the sites' logs are not shown (--verbose), so its "
    "results would reach no one; set either, or fraction-evaluate, to run it"
)


def skip_unseen_evaluation(cfg: RunConfig, verbose: bool) -> tuple[RunConfig, str]:
    """The run config without the federated evaluation when nobody could see its results, and what summary.json
    says about it.

    Without ``release-metrics`` a site's evaluation sends the server only its status; its accuracy and loss stay
    in the site's log, which a simulation shows only with ``--verbose``. Skipping it then saves a message per
    client and round (a fifth of the default run's wall time) and changes no figure: training, aggregation, the
    central evaluation and every epsilon are the same. A ``fraction-evaluate`` other than the default and
    personalisation (which runs in the last evaluation) keep it."""
    default = next(f.default for f in fields(RunConfig) if f.name == "fraction_evaluate")
    if cfg.fraction_evaluate == 0:
        return cfg, "off: fraction-evaluate=0"
    if verbose or cfg.release_metrics or cfg.personalise_epochs > 0 or cfg.fraction_evaluate != default:
        return cfg, f"on: fraction-evaluate={cfg.fraction_evaluate:g}"
    return replace(cfg, fraction_evaluate=0.0), UNSEEN_EVALUATION


def prepare_config(cfg: RunConfig, num_clients: int, out_dir: Path) -> RunConfig:
    """Validate what can be validated before any training, and fill in paths."""
    if num_clients < 1:
        raise ValueError("--clients must be at least 1")
    if cfg.min_clients > num_clients:
        cfg = replace(cfg, min_clients=num_clients)
    if cfg.sim_data:
        from privatune.common.sim_data import check_kind

        check_kind(cfg.sim_data, cfg.model)  # text data needs a text model, images an image model
    elif not cfg.dataset:
        raise ConfigError(
            f"dataset: a run without a preset (model={cfg.model}) has no dataset to simulate on; pass --data FILE "
            "(your own data), or give a preset"
        )
    check_federation_size(cfg, num_clients)
    check_labels(cfg)
    out_dir = Path(os.path.abspath(out_dir))
    cfg = replace(cfg, out_dir=str(out_dir))
    if cfg.sim_ledger_dir:  # the clients run in Ray's workers: give them an absolute path
        cfg = replace(cfg, sim_ledger_dir=os.path.abspath(os.path.expanduser(cfg.sim_ledger_dir)))
    if cfg.reproducible_noise:
        write_seeded_site_keys(sim_ledger_dir(cfg), num_clients, cfg.seed)
    if cfg.secure_aggregation == "he" and cfg.he_public_context:
        check_public_context(Path(cfg.he_public_context))
    if cfg.secure_aggregation == "he" and not cfg.he_public_context:
        from privatune.common import he

        keys = out_dir / "keys"
        public = keys / "public.ctx"
        if not public.exists():
            public = he.write_keys(keys, he.HEParams()).public
        cfg = replace(cfg, he_public_context=str(Path(public).resolve()))
    return cfg


def seeded_site_key(seed: int, site_id: str) -> bytes:
    """A simulated site's key as a function of the run seed (HMAC-SHA256), for reproducible-noise runs only."""
    return hmac.new(f"privatune-simulated-site-key:{seed}".encode(), site_id.encode(), hashlib.sha256).digest()


def write_seeded_site_keys(ledgers: Path, num_clients: int, seed: int) -> None:
    """With reproducible-noise=true the noise already follows the seed; the site keys (which key the record ids and
    so the validation split) follow it too, so the same seed gives the same run, figure for figure. Like seeded
    noise, this gives no privacy against whoever knows the seed: a simulation-only choice, recorded as such."""
    for pid in range(num_clients):
        site_id = f"client-{pid}"  # the simulated clients' ids (client/site_config.py)
        key_path = default_key_path(ledgers / site_ledger_filename(site_id))
        write_site_key(key_path, seeded_site_key(seed, site_id))


def check_labels(cfg: RunConfig) -> None:
    """A simulation trains on the preset's dataset, so an explicit label set must be that dataset's."""
    if not cfg.labels.strip() or cfg.dataset not in DATASET_LABELS:
        return
    have = DATASET_LABELS[cfg.dataset]
    if set(cfg.label_names) != set(have):
        raise ConfigError(
            f"labels: dataset '{cfg.dataset}' has the labels {','.join(have)}, not {','.join(cfg.label_names)}; "
            f'leave labels empty or give labels="{",".join(have)}"'
        )


def check_public_context(path: Path) -> None:
    """Before any simulation starts: the server's public context must be a readable file."""
    try:
        if path.is_dir():
            raise ConfigError(
                f"he-public-context: {path} is a folder; give the public.ctx file `privatune keygen` wrote"
            )
        with open(path, "rb") as fh:
            fh.read(1)
    except ConfigError:
        raise
    except OSError as err:
        why = "symlink loop" if err.errno == errno.ELOOP else (err.strerror or str(err))
        raise ConfigError(
            f"he-public-context: cannot read {path} ({why}); make the keys with `privatune keygen --out DIR` "
            "and pass DIR/public.ctx, or leave he-public-context empty to make fresh keys in the run folder"
        ) from None
    from privatune.common import he

    try:  # the server loads it the same way once the federation has started: fail now instead
        he.load_context(path, require_secret=False)
    except he.HEError as err:
        raise ConfigError(f"he-public-context: {path}: {err}") from None


def confine_writes(out: Path) -> None:
    """Keep Flower's and matplotlib's per-user files inside the run folder (set before they load)."""
    os.environ.setdefault("FLWR_HOME", str(out / ".flwr"))
    os.environ.setdefault("MPLCONFIGDIR", str(out / ".cache" / "matplotlib"))


#: Ray's own variable for the cluster a driver joins (``privatune simulate --ray-address`` sets it): with it, the
#: simulated clients run on that cluster's nodes (docs/ray-cluster.md) instead of a Ray started for this run.
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def ray_init_args(address: str, temp_dir: str, cpus: int, verbose: bool) -> dict[str, ConfigRecordValues]:
    """``ray.init`` arguments (Flower's ``init_args``): a private local Ray sized to this machine, or, with an
    ``address``, a connection to that running cluster, which owns its CPUs, GPUs and temp folder (Ray refuses
    num_cpus, num_gpus and a temp folder from a driver that joins)."""
    args: dict[str, ConfigRecordValues] = {
        "logging_level": logging.WARNING if not verbose else logging.INFO,
        # Client logs stay in the actors unless asked for: the server already reports every refused or dropped
        # client with its reason.
        "log_to_driver": verbose,
    }
    if address:
        return {"address": address, **args}
    return {"_temp_dir": temp_dir, "num_cpus": cpus, "include_dashboard": False, **args}


def run_simulation(
    cfg: RunConfig,
    num_clients: int,
    out_dir: Path,
    observer: Callable[[RoundReport], None] | None = None,
    verbose: bool = False,
    client_gpus: float = 0.0,
    client_cpus: float = 1.0,
    stop_on_signal: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the federation and return its summary (also in ``out_dir/summary.json``).

    ``stop_on_signal`` (the CLI sets it): SIGINT/SIGTERM end the run within seconds as ``interrupted``.
    ``resume``: continue the run in ``out_dir`` from its checkpoint, under its run id (simulations/resume.py).
    """
    confine_writes(out_dir.resolve())
    from flwr.simulation import run_simulation as flwr_run_simulation

    from privatune.client.app import app as client_app
    from privatune.server.app import make_server_app

    if not verbose:
        # The round printer shows progress; keep privatune's own INFO lines for --verbose and sites.
        logging.getLogger("privatune").setLevel(logging.WARNING)
    cfg = prepare_config(cfg, num_clients, out_dir)
    cfg, federated_evaluation = skip_unseen_evaluation(cfg, verbose)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from privatune.simulations.resume import flower_run, write_simulation_record

    run = flower_run(out) if resume else None  # the sites record the resumed rounds under the same run id
    write_simulation_record(out, num_clients)
    from privatune.server.app import SEEDED_NOISE_WARNING, noise_source_of

    if cfg.reproducible_noise:
        print(f"warning: {SEEDED_NOISE_WARNING}", file=sys.stderr, flush=True)
    set_offline_env()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        # Flower warns that run_simulation is deprecated: we use it on purpose (in-process, no
        # per-run dependency install); `flwr run .` works too (docs/deploy-coordinator.md).
        # CRITICAL: Flower logs a client's exception as a multi-line Ray traceback at ERROR; the server
        # already reports every client that did not train with its reason on one line (server/reasons.py),
        # and an exception that ends the run reaches the CLI, which logs its traceback to a file.
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
    address = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    ray_tmp = tempfile.mkdtemp(prefix="pt-ray-")
    backend_config: dict[str, dict[str, ConfigRecordValues]] = {  # Flower's BackendConfig
        # A GPU share per client (e.g. 0.5 = two clients per GPU); 0 without a GPU, or Ray makes no actors.
        "client_resources": {"num_cpus": float(client_cpus), "num_gpus": float(client_gpus)},
        "init_args": ray_init_args(address, ray_tmp, os.cpu_count() or 1, verbose),
    }
    if client_gpus > 0 and not address:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--client-gpus > 0 but this machine has no CUDA GPU; Flower would start no clients")
        backend_config["init_args"]["num_gpus"] = torch.cuda.device_count()
    stopper = None
    undo_patch: Callable[[], None] = _nothing_to_undo
    if stop_on_signal:
        from privatune.simulations.stopping import StopOnSignal

        stopper = StopOnSignal(out, cleanup_dirs=[ray_tmp])
        stopper.install()
        undo_patch = _reinstall_after_ray_init(stopper.install)
    t0 = time.perf_counter()
    try:
        server_app = make_server_app(cfg, observer, on_recorder=stopper.attach if stopper else None, resume=resume)
        if run is None:
            flwr_run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config=backend_config,
            )
        else:
            from privatune.simulations.resume import run_simulation_as

            run_simulation_as(run, server_app, client_app, num_clients, backend_config)
    except Exception as err:
        mark_failed(out, err)
        raise
    finally:
        undo_patch()
        if stopper is not None:
            stopper.restore()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    summary_path = out / "summary.json"
    import json

    summary = json.loads(summary_path.read_text())
    if cfg.secure_aggregation == "he" and summary.get("status") != "failed":
        from privatune.server.central_plan import central_eval_plan

        # The server cannot read the encrypted model, but the simulation holds the sites' key: the same rule on
        # the task's own test data, applied to the decrypted final model.
        plan = central_eval_plan(replace(cfg, secure_aggregation="none"))
        if plan.on:
            summary.update(he_central_evaluation(cfg, out))
            summary["central_eval"] = {"on": True, "test_data": f"{plan.test_data}, on the decrypted final model"}
    if cfg.personalise_epochs > 0 and summary.get("status") != "failed":  # issue 15: the sites' final personalisation
        from privatune.simulations.personalise import collect_final_personalisation, summary_entry

        summary["personalisation"] = summary_entry(collect_final_personalisation(cfg, str(summary.get("run_id", ""))))
    summary["num_clients"] = num_clients
    summary["federated_evaluation"] = federated_evaluation
    summary["noise_source"] = noise_source_of(cfg)
    summary["ray_temp_dir"] = ray_tmp  # removed; named so a check can prove no Ray process still uses it
    summary["simulation_seconds"] = time.perf_counter() - t0
    write_json_atomic(summary_path, summary)
    return summary


def innermost(err: BaseException) -> BaseException:
    """Flower wraps a ServerApp's exception in RuntimeError("An error was encountered..."): unwrap it."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


def mark_failed(out: Path, err: BaseException) -> None:
    """A run that raised says so in summary.json (status failed, the reason on one line)."""
    import json

    from privatune.server.reasons import one_line

    path = out / "summary.json"
    try:
        summary = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        summary = {}
    summary["status"] = "failed"
    summary["failure_reasons"] = {"server": one_line(str(innermost(err)))}
    with contextlib.suppress(OSError):
        write_json_atomic(path, summary)


def _nothing_to_undo() -> None:
    """The undo of a patch that was not made (no stop on signal)."""


def _reinstall_after_ray_init(install: Callable[[], None]) -> Callable[[], None]:
    """``ray.init`` replaces the driver's SIGTERM handler with ``sys.exit``; put ours back right after it."""
    import ray

    original = ray.init

    def init(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            install()

    ray.init = init

    def undo() -> None:
        ray.init = original

    return undo


def he_central_evaluation(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """Decrypt the final encrypted global model with the clients' key (simulation holds it) and test it."""
    from privatune.common import he
    from privatune.server.app import HE_CHECKPOINT_NAME
    from privatune.server.central_eval import CentralEvaluator

    secret = Path(cfg.he_public_context).parent / "secret.ctx"
    decrypted = out / "global.decrypted.safetensors"
    he.decrypt_checkpoint_to_safetensors(secret, out / HE_CHECKPOINT_NAME, decrypted)
    from safetensors.numpy import load_file

    from privatune.common.cache import resolve_cache_dir

    res = CentralEvaluator(cfg, resolve_cache_dir(cfg.cache_dir))(load_file(str(decrypted)))
    return {
        "test_accuracy": res.accuracy,
        "test_macro_f1": res.macro_f1,
        "test_loss": res.loss,
        "test_evaluated": "decrypted final model (clients' key)",
    }
