"""A minimal Flower app written into a temp folder, to test deployment plumbing on its own.

Its run config mirrors the keys scripts/deploy_local.sh and `privatune site check` pass
(``preset``, ``out-dir``), which it ignores.

It exercises exactly what the transport needs (ServerApp -> SuperLink -> SuperNode ->
ClientApp and back, node_config reaching the ClientApp) in seconds, independent of the
project's models. It is generated at test time, never kept in the repository.
"""

from __future__ import annotations

from pathlib import Path

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tinyapp"
version = "0.1.0"
description = "deployment smoke-test app"
license = "Apache-2.0"
dependencies = ["flwr==1.42.0", "numpy"]

[tool.flwr.app]
publisher = "trial"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
num-server-rounds = 2
min-clients = 2
client-sleep = 0.0
preset = "digits"
out-dir = ""
"""

SERVER = """\
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    n = int(context.run_config["min-clients"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]),
        train_config=ConfigRecord({"lr": 0.1}),
        num_rounds=int(context.run_config["num-server-rounds"]),
    )
    print("TINYAPP FINAL", result.arrays.to_numpy_ndarrays()[0].tolist(), flush=True)
"""

CLIENT = """\
import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_numpy_ndarrays()[0]
    time.sleep(float(context.run_config["client-sleep"]))
    print(f"TINYAPP TRAIN site={context.node_config.get('site-id', '?')}", flush=True)
    reply = RecordDict(
        {
            "arrays": ArrayRecord([weights + 1.0]),
            "metrics": MetricRecord({"num-examples": 10, "loss": 0.5}),
        }
    )
    return Message(reply, reply_to=msg)
"""


def write_tiny_app(dest: Path) -> Path:
    """Write the app into ``dest`` (created) and return it: after R rounds every weight is R."""
    package = dest / "tinyapp"
    package.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "server.py").write_text(SERVER, encoding="utf-8")
    (package / "client.py").write_text(CLIENT, encoding="utf-8")
    return dest
