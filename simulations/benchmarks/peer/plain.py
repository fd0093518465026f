"""The peer benchmark's plain-Flower side: a DP federation written the way Flower's own Opacus example writes it.

Flower's ``examples/opacus`` (flwr 1.42 Message API): a ClientApp that builds a fresh Opacus ``PrivacyEngine`` every
round, ``make_private`` with a fixed noise multiplier and clip, trains, and reports ``engine.get_epsilon(delta)``
(so one round's epsilon, not the composition over rounds); a ServerApp with Flower's own ``FedAvg``. What differs
from the example, so that both sides train the same thing: the data, the model and the settings are privatune's
(the run config travels in the train config, because in-process ``run_simulation`` takes no run config), the
optimiser is plain SGD at the run's learning rate, and the server evaluates centrally on the run's held-out test
set (``evaluate_fn``) instead of a federated evaluation, as privatune does.

A benchmark, not a product path: it imports flwr and opacus directly and writes no ledger.

    python -m privatune.simulations.benchmarks.peer.plain SPEC.json

``SPEC.json`` is what :func:`privatune.simulations.benchmarks.modes.bench.run_child` writes (``run_config``,
``clients``, ``out``); the run leaves ``OUT/summary.json`` (per-round times, central accuracy, each client's
reported epsilons and example counts) and ``OUT/child.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader, TensorDataset

from privatune.common.config import RunConfig
from privatune.common.federation_data import central_split, client_records
from privatune.common.models import configure_trainable, get_model_spec  # the package registers the models

warnings.filterwarnings("ignore", category=UserWarning)

RUN_CONFIG_KEY = "privatune-run-config"  # the run config (JSON) in the train config: data, model, settings
DEFAULT_DELTA = 1e-5  # the example's target-delta, and a privatune site's default


def net(cfg: RunConfig) -> torch.nn.Module:
    """The run's model, the one privatune's server starts from (same seed, same trainable parameters)."""
    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
    configure_trainable(model, cfg.fine_tuning)
    return model


def _unwrap_state_dict(model: Any) -> dict[str, torch.Tensor]:
    # NOTE: the plain module's state_dict even where Opacus wrapped it (as the example does).
    return dict(model._module.state_dict() if hasattr(model, "_module") else model.state_dict())


def _number(value: Any) -> float:
    """A number from a Message's ConfigRecord or MetricRecord (whose values flwr types as a wide union)."""
    return float(value)


def _arrays(content: RecordDict) -> dict[str, torch.Tensor]:
    """The model the server sent, as a torch state dict."""
    arrays = content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    return arrays.to_torch_state_dict()


def train(model: Any, loader: Any, engine: Any, optimizer: Any, delta: float, epochs: int) -> float:
    """The example's loop: epochs over Opacus' Poisson loader, then ``engine.get_epsilon(delta)``."""
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            criterion(model(images), labels).backward()
            optimizer.step()
    return float(engine.get_epsilon(delta=delta))


def test(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on a held-out set."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in DataLoader(TensorDataset(images, labels), batch_size=256):
            out = model(x)
            loss += float(criterion(out, y))
            correct += int((out.argmax(1) == y).sum())
    return loss / len(labels), correct / len(labels)


client_app = ClientApp()


@client_app.train()
def train_message(msg: Message, context: Context) -> Message:
    from opacus import PrivacyEngine

    config = msg.content["config"]
    cfg = RunConfig.from_flower(json.loads(str(config[RUN_CONFIG_KEY])))
    pid = int(context.node_config["partition-id"])
    records = client_records(cfg, pid, int(context.node_config["num-partitions"]))
    data = TensorDataset(torch.from_numpy(np.asarray(records.inputs)), torch.from_numpy(records.labels))
    train_loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True)
    delta, noise_multiplier, max_grad_norm = _number(config["delta"]), cfg.noise_multiplier, cfg.max_grad_norm

    model = net(cfg)
    model.load_state_dict(_arrays(msg.content), strict=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    privacy_engine = PrivacyEngine(secure_mode=False)  # a fresh engine every round, as in the example
    private_model, optimizer, private_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
    )
    epsilon = train(private_model, private_loader, privacy_engine, optimizer, delta, cfg.local_epochs)
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "epsilon": epsilon,
            "target_delta": delta,
            "noise_multiplier": float(noise_multiplier),
            "max_grad_norm": float(max_grad_norm),
            "partition-id": pid,
        }
    )
    print(f"[client {pid}] epsilon(delta={delta})={epsilon:.2f}, noise={noise_multiplier}", flush=True)
    return Message(
        content=RecordDict({"arrays": ArrayRecord(_unwrap_state_dict(private_model)), "metrics": metrics}),
        reply_to=msg,
    )


def make_server_app(cfg: RunConfig, run_config: dict[str, Any], clients: int, record: dict[str, Any]) -> ServerApp:
    """Flower's FedAvg over every client each round, central evaluation after each; ``record`` collects the
    round times, accuracies and each client's reported epsilon as the rounds go."""
    app = ServerApp()
    _, test_set = central_split(cfg)
    test_x, test_y = torch.from_numpy(np.asarray(test_set.inputs)), torch.from_numpy(test_set.labels)
    eval_model = net(cfg)
    record.update(round_seconds=[], central=[], clients=[])

    def aggregate_train(replies: list[RecordDict], weight_key: str) -> MetricRecord:
        per_client = {
            f"client-{int(_number(rd['metrics']['partition-id']))}": {
                "epsilon": _number(rd["metrics"]["epsilon"]),
                "num-examples": int(_number(rd["metrics"]["num-examples"])),
            }
            for rd in replies
        }
        record["clients"].append(per_client)
        epsilons = [c["epsilon"] for c in per_client.values()]
        return MetricRecord({"max_epsilon": max(epsilons), "mean_epsilon": sum(epsilons) / len(epsilons)})

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        loss, accuracy = test(eval_model, test_x, test_y)
        now = time.perf_counter()
        if server_round > 0:
            record["round_seconds"].append(now - record["last"])
        record["last"] = now
        record["central"].append({"round": server_round, "accuracy": accuracy, "loss": loss})
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_evaluate=0.0,
            min_train_nodes=clients,
            min_available_nodes=clients,
            train_metrics_aggr_fn=aggregate_train,
        )
        record["last"] = time.perf_counter()
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(net(cfg).state_dict()),
            num_rounds=cfg.num_server_rounds,
            train_config=ConfigRecord({RUN_CONFIG_KEY: json.dumps(run_config), "delta": cfg.delta or DEFAULT_DELTA}),
            evaluate_fn=central_evaluate,
        )

    return app


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole plain federation through Flower's in-process simulation, on a private Ray sized as privatune's."""
    from flwr.simulation import run_simulation

    from privatune.simulations.simulate import ray_init_args

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_HOME", str(out / ".flwr"))
    cfg = RunConfig.from_flower(spec["run_config"])
    clients = int(spec["clients"])
    record: dict[str, Any] = {}
    ray_tmp = tempfile.mkdtemp(prefix="pt-ray-")
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=make_server_app(cfg, spec["run_config"], clients, record),
            client_app=client_app,
            num_supernodes=clients,
            backend_config={
                "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                "init_args": ray_init_args("", ray_tmp, os.cpu_count() or 1, False),
            },
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    record.pop("last", None)
    done = len(record.get("round_seconds", []))
    record.update(
        status="completed" if done == cfg.num_server_rounds else "failed",
        rounds_completed=done,
        wall_seconds=time.perf_counter() - t0,
        test_accuracy=record["central"][-1]["accuracy"] if record.get("central") else None,
        delta=cfg.delta or DEFAULT_DELTA,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m privatune.simulations.benchmarks.peer.plain SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    out = Path(spec["out"])
    t0 = time.perf_counter()
    child: dict[str, Any] = {}
    try:
        summary = run(spec)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        child["status"] = summary["status"]
    except Exception as err:  # the parent records the failure
        child.update(status="failed", error=f"{type(err).__name__}: {err}")
        traceback.print_exc()
    child["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "child.json").write_text(json.dumps(child, indent=2, sort_keys=True) + "\n")
    return 0 if child["status"] != "failed" else 1


if __name__ == "__main__":
    # Run the module under its own name, not as __main__: Ray pickles the ClientApp of a named module by
    # reference, so each actor imports it (and privatune's model registry) instead of unpickling a copy.
    from privatune.simulations.benchmarks.peer import plain

    raise SystemExit(plain.main())
