"""What leaves a site, key by key: only an allow-list (each key named in docs/privacy.md), no unnoised
loss or metric, no example count under HE; released metrics are noised and paid for first; evaluation
never runs on training records; the server copes with all of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from privatune.client.app import evaluate_global, train
from privatune.common import he
from privatune.common.he.records import META_KEY, arrayrecord_to_state, state_to_arrayrecord, update_to_arrayrecord
from privatune.common.ledger import PURPOSE_METRICS, SiteLedger
from privatune.common.protocol import (
    EVAL_RELEASE_KEYS,
    KEY_EVAL_COUNT,
    KEY_METRICS_EPSILON,
    KEY_NUM_EXAMPLES,
    STATUS_KEYS,
    STATUS_NO_VALIDATION,
    TRAINED_STATUS_KEYS,
    allowed_train_metric_keys,
)
from tests.helpers.messages import digits_config, initial_state, make_context, make_message, set_task_identity

PRIVACY_DOC = Path(__file__).resolve().parents[1] / "docs" / "privacy.md"
HE_META_FIELDS = {"format", "kind", "fingerprint", "layout", "num_summands", "num_chunks", "digest"}


@pytest.fixture(scope="module")
def he_keys(tmp_path_factory):
    return he.write_keys(tmp_path_factory.mktemp("keys"))


def _cfg(tmp_path, aggregation="none", he_keys=None, **kw):
    extra = {"secure_aggregation": aggregation, "central_eval": False}
    if aggregation == "he":
        extra["he_public_context"] = str(he_keys.public)  # the simulated site finds secret.ctx beside it
    return digits_config(tmp_path, num_server_rounds=2, **extra, **kw)


def _message(cfg, he_keys, message_type="train", server_round=1):
    state = initial_state(cfg)
    msg = make_message(cfg, state, server_round=server_round, message_type=message_type)
    if cfg.secure_aggregation == "he":
        public = he.load_context(he_keys.public, require_secret=False)
        msg.content["arrays"] = state_to_arrayrecord(he.encrypt_state(public, state))
    return msg


def _documented(key: str) -> bool:
    return f"`{key}`" in PRIVACY_DOC.read_text()


@pytest.mark.parametrize("aggregation", ["none", "he"])
def test_by_default_only_allow_listed_keys_leave_a_site(tmp_path, he_keys, aggregation):
    cfg = _cfg(tmp_path, aggregation, he_keys)
    ctx = make_context({"partition-id": 0, "num-partitions": 3})
    content = train(_message(cfg, he_keys), ctx).content
    assert content["status"]["status"] == "trained"
    assert set(content.keys()) == {"arrays", "metrics", "status"}
    metric_keys = set(content["metrics"].keys())
    assert metric_keys == allowed_train_metric_keys(aggregation, "examples")
    assert not {"train-loss", "train-seconds", "loss"} & metric_keys
    assert set(content["status"].keys()) <= set(TRAINED_STATUS_KEYS)
    if aggregation == "he":
        assert KEY_NUM_EXAMPLES not in metric_keys
        arrays = content["arrays"]
        assert all(k == META_KEY or k.startswith("he.ct.") for k in arrays)
        meta = json.loads(arrays[META_KEY].numpy().tobytes())
        assert set(meta) == HE_META_FIELDS and meta["num_summands"] == 1  # no count in the clear
    else:
        assert content["metrics"][KEY_NUM_EXAMPLES] > 0
    for key in metric_keys | set(content["status"].keys()):
        assert _documented(key), f"{key} leaves the site but docs/privacy.md does not name it"

    reply = evaluate_global(_message(cfg, he_keys, "evaluate"), ctx).content
    assert set(reply.keys()) == {"status"}  # no metrics record at all
    assert reply["status"]["status"] == "evaluated" and set(reply["status"].keys()) <= set(STATUS_KEYS)
    assert SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite").entries()[-1].entry.purpose == "train"


def test_equal_weighting_sends_no_count(tmp_path):
    cfg = _cfg(tmp_path, weighting="equal")
    content = train(_message(cfg, None), make_context({"partition-id": 1, "num-partitions": 3})).content
    assert set(content["metrics"].keys()) == allowed_train_metric_keys("none", "equal")
    assert KEY_NUM_EXAMPLES not in content["metrics"]


def test_released_metrics_are_noised_and_paid_for_before_they_exist(tmp_path, monkeypatch):
    import privatune.client.round as client_round

    cfg = _cfg(tmp_path, release_metrics=True)
    ledger_path = tmp_path / "ledgers" / "site-client-0.ledger.sqlite"
    seen_at_noise: list[int] = []
    real = client_round.noised_sums

    def spy(sums, noise, randomness):
        # The spend must already be on disk when the noised numbers are made.
        seen_at_noise.append(sum(r.entry.purpose == PURPOSE_METRICS for r in SiteLedger(ledger_path).entries()))
        assert type(randomness).__name__ == "SiteRandomness"
        return real(sums, noise, randomness)

    monkeypatch.setattr(client_round, "noised_sums", spy)
    ctx = make_context({"partition-id": 0, "num-partitions": 3})
    first = evaluate_global(_message(cfg, None, "evaluate", 1), ctx).content
    second = evaluate_global(_message(cfg, None, "evaluate", 1), ctx).content
    assert seen_at_noise == [1, 2]
    m1, m2 = first["metrics"], second["metrics"]
    assert set(m1.keys()) == set(EVAL_RELEASE_KEYS)
    assert all(_documented(k) for k in m1)
    assert any(m1[k] != m2[k] for k in EVAL_RELEASE_KEYS[:3]), "two releases of the same model must differ"
    metrics_rows = [r.entry for r in SiteLedger(ledger_path).entries() if r.entry.purpose == PURPOSE_METRICS]
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in metrics_rows] == [(20.0, 1.0, 3)] * 2
    assert m2[KEY_METRICS_EPSILON] == pytest.approx(metrics_rows[-1].epsilon_run)
    assert m2[KEY_METRICS_EPSILON] > m1[KEY_METRICS_EPSILON] > 0
    # Noise of std 20 on the count of about 10 % of 100 records.
    assert abs(m1[KEY_EVAL_COUNT] - 10) < 20 * 6


def test_release_is_withheld_when_the_budget_cannot_pay_for_it(tmp_path):
    cfg = _cfg(tmp_path, release_metrics=True, metrics_noise_multiplier=0.05)
    ctx = make_context({"partition-id": 0, "num-partitions": 3, "max-epsilon": 1.0})
    reply = evaluate_global(_message(cfg, None, "evaluate"), ctx).content
    assert set(reply.keys()) == {"status"}
    assert reply["status"]["status"] == "budget-exhausted" and "metrics withheld" in reply["status"]["reason"]
    assert SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite").entries() == []


def test_no_validation_split_never_touches_training_records(tmp_path, monkeypatch):
    import privatune.client.round as client_round

    def forbidden(*a, **k):
        raise AssertionError("evaluation ran a model on this site's records")

    monkeypatch.setattr(client_round, "per_record_outcomes", forbidden)
    monkeypatch.setattr(client_round, "module_and_inputs", forbidden)
    cfg = _cfg(tmp_path, val_fraction=0.0, release_metrics=True)
    reply = evaluate_global(_message(cfg, None, "evaluate"), make_context({"partition-id": 0, "num-partitions": 3}))
    assert set(reply.content.keys()) == {"status"}
    assert reply.content["status"]["status"] == STATUS_NO_VALIDATION
    assert (
        not (tmp_path / "ledgers" / "site-client-0.ledger.sqlite").exists()
        or SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite").entries() == []
    )


# ------------------------------------------------------------------------------------------------ server side


def _reply(node: int, content: dict, message_type: str = "train") -> Message:
    set_task_identity()
    request = Message(content=RecordDict({}), dst_node_id=node, message_type=message_type)
    return Message(RecordDict(content), reply_to=request)


MECH = {
    "epsilon": 1.0,
    "epsilon-dataset": 1.0,
    "noise-multiplier": 1.0,
    "sample-rate": 0.1,
    "steps": 10,
    "delta": 1e-5,
    "max-grad-norm": 1.0,
}


def test_he_server_aggregates_without_any_plaintext_count(he_keys):
    from privatune.common.config import RunConfig
    from privatune.server.strategy import PrivatuneFedAvg

    cfg = RunConfig.create(
        preset="digits", secure_aggregation="he", he_public_context=str(he_keys.public), min_clients=2
    )
    shapes = {"head.weight": (3, 4), "head.bias": (3,)}
    secret = he.load_context(he_keys.secret, require_secret=True)
    public = he.load_context(he_keys.public, require_secret=False)
    rng = np.random.default_rng(1)
    states = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(2)]
    weights = [30.0, 90.0]
    replies = [
        _reply(
            i + 1,
            {
                "arrays": update_to_arrayrecord(he.encrypt_update(secret, st, weight=w)),
                "metrics": MetricRecord(dict(MECH)),
                "status": ConfigRecord({"status": "trained", "client-id": f"site-{i}", "accountant": "rdp"}),
            },
        )
        for i, (st, w) in enumerate(zip(states, weights, strict=True))
    ]
    strategy = PrivatuneFedAvg(cfg, "r", shapes, he_context=public)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert dict(metrics) == {"num-clients": 2}  # no loss, no count
    got = he.decrypt_state(secret, arrayrecord_to_state(arrays))  # the clients divide by the encrypted weight
    for k in shapes:
        want = (weights[0] * states[0][k] + weights[1] * states[1][k]) / sum(weights)
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7)
    assert all(KEY_NUM_EXAMPLES not in rep for rep in strategy.current.clients.values())


def test_plaintext_equal_weighting_needs_no_count():
    from flwr.app import Array

    from privatune.common.config import RunConfig
    from privatune.server.strategy import PrivatuneFedAvg

    cfg = RunConfig.create(preset="digits", weighting="equal", min_clients=2)
    shapes = {"w": (2,)}
    replies = [
        _reply(
            i + 1,
            {
                "arrays": ArrayRecord({"w": Array(np.array(v, np.float32))}),
                "metrics": MetricRecord(dict(MECH)),
                "status": ConfigRecord({"status": "trained", "client-id": f"s{i}", "accountant": "rdp"}),
            },
        )
        for i, v in enumerate([[1.0, 2.0], [3.0, 6.0]])
    ]
    arrays, metrics = PrivatuneFedAvg(cfg, "r", shapes).aggregate_train(1, replies)
    assert arrays["w"].numpy().tolist() == [2.0, 4.0] and dict(metrics) == {"num-clients": 2}


def test_server_reports_only_released_noised_metrics():
    from privatune.common.config import RunConfig
    from privatune.server.strategy import PrivatuneFedAvg

    strategy = PrivatuneFedAvg(RunConfig.create(preset="digits"), "r", {"w": (2,)})
    status = lambda s: ConfigRecord({"status": s, "client-id": "x"})  # noqa: E731
    quiet = [
        _reply(1, {"status": status("evaluated")}, "evaluate"),
        _reply(2, {"status": status(STATUS_NO_VALIDATION)}, "evaluate"),
    ]
    assert strategy.aggregate_evaluate(1, quiet) is None and strategy.current.federated == {}
    released = {
        "eval-correct-noised": 40.0,
        "eval-loss-sum-noised": 25.0,
        "eval-count-noised": 50.0,
        "metrics-epsilon": 1.5,
        "metrics-noise-multiplier": 20.0,
    }
    broken = _reply(
        4,
        {"metrics": MetricRecord({**released, "eval-count-noised": float("nan")}), "status": status("evaluated")},
        "evaluate",
    )
    out = strategy.aggregate_evaluate(
        1, [*quiet, broken, _reply(3, {"metrics": MetricRecord(released), "status": status("evaluated")}, "evaluate")]
    )
    assert out["eval-accuracy"] == pytest.approx(0.8) and out["eval-loss"] == pytest.approx(0.5)
    assert out["noised"] == 1.0 and out["max-site-epsilon"] == 1.5 and out["num-sites"] == 1.0
    assert strategy.current.federated["eval-accuracy"] == pytest.approx(0.8)
    assert strategy.current.released == {"x": 1.5}  # the run record's per-client epsilon includes the release
