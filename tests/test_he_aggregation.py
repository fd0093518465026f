"""HE aggregation in the server strategy: bad replies are dropped with a reason, the round goes on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from privatune.common import he
from privatune.common.config import RunConfig
from privatune.common.he.records import arrayrecord_to_state, update_to_arrayrecord
from privatune.server.strategy import PrivatuneFedAvg
from tests.helpers.messages import make_context, make_message, set_task_identity

SHAPES = {"head.weight": (4, 8), "head.bias": (4,)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    other = tmp_path_factory.mktemp("other-keys")
    return he.write_keys(d), he.write_keys(other)


def _state(rng, scale):
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _reply(request_node: int, arrays, n: int, client: str, status: str = "trained") -> Message:
    set_task_identity()
    request = Message(content=RecordDict({}), dst_node_id=request_node, message_type="train")
    content = {
        "metrics": MetricRecord(
            {
                "num-examples": n,
                "train-loss": 0.5,
                "epsilon": 1.0,
                "epsilon-dataset": 1.0,
                "noise-multiplier": 1.0,
                "sample-rate": 0.1,
                "steps": 10,
                "delta": 1e-5,
                "max-grad-norm": 1.0,
            }
        ),
        "status": ConfigRecord({"status": status, "client-id": client, "accountant": "rdp"}),
    }
    if arrays is not None:
        content["arrays"] = arrays
    return Message(RecordDict(content), reply_to=request)


def test_bad_encrypted_replies_are_dropped_and_the_round_goes_on(keys, caplog):
    (mine, other) = keys
    secret = he.load_context(mine.secret, require_secret=True)
    public = he.load_context(mine.public, require_secret=False)
    foreign = he.load_context(other.secret, require_secret=True)
    rng = np.random.default_rng(0)
    good = [(_state(rng, 0.3), 120), (_state(rng, 1e-3), 300)]
    replies = [
        _reply(i + 1, update_to_arrayrecord(he.encrypt_update(secret, s, weight=float(n))), n, f"site-{i}")
        for i, (s, n) in enumerate(good)
    ]
    wrong_key = update_to_arrayrecord(he.encrypt_update(foreign, _state(rng, 1.0), weight=50.0))
    replies.append(_reply(3, wrong_key, 50, "wrong-key"))
    upd = he.encrypt_update(secret, _state(rng, 1.0), weight=50.0)
    truncated = dataclasses.replace(upd, chunks=[upd.chunks[0][: len(upd.chunks[0]) // 2]])
    replies.append(_reply(4, update_to_arrayrecord(truncated), 50, "truncated"))
    extra_chunk = dataclasses.replace(upd, chunks=upd.chunks + upd.chunks)
    replies.append(_reply(5, update_to_arrayrecord(extra_chunk), 50, "two-many-chunks"))
    corrupted = bytearray(upd.chunks[0])
    corrupted[len(corrupted) // 2] ^= 0xFF
    replies.append(
        _reply(6, update_to_arrayrecord(dataclasses.replace(upd, chunks=[bytes(corrupted)])), 50, "corrupted")
    )
    replies.append(_reply(7, None, 0, "non-finite", status="refused"))

    cfg = RunConfig.create(preset="digits", secure_aggregation="he", min_clients=2)
    strategy = PrivatuneFedAvg(cfg, "run-1", SHAPES, he_context=public)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["num-clients"] == 2
    assert set(strategy.current.dropped) == {"wrong-key", "truncated", "two-many-chunks", "corrupted", "non-finite"}
    assert "fingerprint" in strategy.current.dropped["wrong-key"] or "key" in strategy.current.dropped["wrong-key"]
    total = sum(n for _, n in good)
    decrypted = he.decrypt_state(secret, arrayrecord_to_state(arrays))
    for k in SHAPES:
        expected = sum(s[k].astype(np.float64) * n for s, n in good) / total
        rel = np.linalg.norm(decrypted[k] - expected) / np.linalg.norm(expected)
        assert rel < 1e-6, (k, rel)


def test_server_given_a_secret_context_stops_at_start(keys, tmp_path):
    from privatune.server.app import run_federation

    (mine, _) = keys
    cfg = RunConfig.create(
        preset="digits",
        secure_aggregation="he",
        he_public_context=str(mine.secret),
        out_dir=str(tmp_path),
        central_eval=False,
    )
    with pytest.raises(he.HEKeyError, match="secret key"):
        run_federation(grid=None, cfg=cfg, run_id="r")  # refused before any message is sent


def test_client_given_the_public_context_refuses_and_says_so(keys, tmp_path):
    from privatune.client.app import train
    from privatune.common.models import configure_trainable, get_model_spec, trainable_state

    (mine, _) = keys
    public = he.load_context(mine.public, require_secret=False)
    cfg = RunConfig.create(
        preset="digits",
        secure_aggregation="he",
        he_public_context=str(mine.public),
        out_dir=str(tmp_path),
        max_records=200,
        num_server_rounds=1,
    )
    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
    configure_trainable(model, cfg.mode)
    msg = make_message(cfg, {})
    msg.content["arrays"] = __import__("privatune.common.he.records", fromlist=["x"]).state_to_arrayrecord(
        he.encrypt_state(public, trainable_state(model))
    )
    ctx = make_context({"partition-id": 0, "num-partitions": 2})
    # Point the simulated site at the public context instead of its secret one.
    (tmp_path / "keys").mkdir()
    import shutil

    shutil.copy(mine.public, tmp_path / "keys" / "secret.ctx")
    cfg2 = dataclasses.replace(cfg, he_public_context=str(tmp_path / "keys" / "public.ctx"))
    msg.content["config"] = ConfigRecord({**cfg2.to_flower(), "server-round": 1, "run-id": "r"})
    reply = train(msg, ctx).content
    assert reply["status"]["status"] == "refused"
    assert "public context" in reply["status"]["reason"]
    assert "arrays" not in reply


def test_client_refuses_to_encrypt_a_non_finite_update(keys, tmp_path):
    from privatune.client.app import encode_update
    from privatune.client.site_config import SiteConfig

    (mine, _) = keys
    cfg = RunConfig.create(
        preset="digits", secure_aggregation="he", he_public_context=str(mine.public), out_dir=str(tmp_path)
    )
    site = SiteConfig.from_node_config({"partition-id": 0, "num-partitions": 2}, cfg)
    bad = {"head.weight": np.full((4, 8), np.nan, np.float32), "head.bias": np.zeros(4, np.float32)}
    with pytest.raises(he.HEInputError, match=r"head.weight"):
        encode_update(bad, 10, cfg, site)
