"""Build Flower messages, contexts and small run configs for the ClientApp without any transport."""

from __future__ import annotations

import numpy as np


def set_task_identity(run_id: int = 7) -> None:
    """Flower 1.42 stamps messages with the identity of the running task; tests play the server."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = 0


def make_message(cfg, state, server_round: int = 1, message_type: str = "train"):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    set_task_identity()

    config = {**cfg.to_flower(), "server-round": server_round, "run-id": "test-run"}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()}),
            "config": ConfigRecord(config),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=message_type)


def make_context(node_config: dict, run_id: int = 7):
    from flwr.app import Context, RecordDict

    return Context(run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def digits_config(out_dir, **overrides):
    """A small, fast digits run config for ClientApp-level tests (300 records, 1 local epoch)."""
    from privatune.common.config import RunConfig

    values = dict(preset="digits", local_epochs=1, max_records=300, out_dir=str(out_dir))
    values.update(overrides)
    return RunConfig.create(**values)


def initial_state(cfg):
    """The global model's trainable weights before round 1, as the server builds them."""
    from privatune.common.models import configure_trainable, get_model_spec, trainable_state

    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
    configure_trainable(model, cfg.mode)
    return trainable_state(model)
