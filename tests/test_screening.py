"""Reply screening, clean reasons and robust aggregators: one bad reply never spoils a round."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from privatune.common.config import ConfigError, RunConfig
from privatune.server.aggregation import UpdateRejected, aggregate_plain
from privatune.server.reasons import one_line
from privatune.server.screening import (
    ReplyGuard,
    check_num_examples,
    check_plain_arrays,
    check_values,
    dp_change_bound,
    update_digest,
)
from privatune.server.strategy import PrivatuneFedAvg
from tests.helpers.messages import set_task_identity

SHAPES = {"head.weight": (4, 8), "head.bias": (4,)}
D = sum(int(np.prod(s)) for s in SHAPES.values())
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
    "(pid=4242, ip=10.0.0.1, actor_id=ab12, repr=<flwr.simulation.ray_transport.ray_actor.ClientAppActor object "
    'at 0x7f00>)\n  File "/srv/flwr/ray_actor.py", line 60, in run\n    out = app(message=message)\n'
    '  File "/srv/client/app.py", line 9, in train\n    raise ValueError("disk   full")\n'
    "ValueError: disk full\n\nThe above exception was the direct cause of the following exception:\n\n"
    '\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=4242, ip=10.0.0.1)\n  File "/srv/flwr/ray_actor.py", '
    "line 65, in run\n    raise ClientAppException(str(ex)) from ex\nflwr.clientapp.client_app.ClientAppException: "
    "\nException ClientAppException occurred. Message: disk\n   full'>"
)


# ------------------------------------------------------------------------------------------------ helpers
def _state(rng: np.random.Generator, scale: float = 0.1, base: dict | None = None) -> dict[str, np.ndarray]:
    base = base or {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    return {k: (base[k] + rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _request(node: int, message_id: str = "") -> Message:
    set_task_identity()
    req = Message(content=RecordDict({}), dst_node_id=node, message_type="train")
    if message_id:
        req.metadata.__dict__["_message_id"] = message_id  # what the grid does when it pushes
    return req


def _reply(node: int, arrays, client: str, n=100, request: Message | None = None, **metrics) -> Message:
    m = {
        "num-examples": n,
        "train-loss": 0.5,
        "epsilon": 1.5,
        "epsilon-dataset": 1.5,
        "noise-multiplier": 1.0,
        "sample-rate": 0.25,
        "steps": 12,
        "delta": 1e-5,
        "max-grad-norm": 1.0,
        **metrics,
    }
    if isinstance(arrays, dict):
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    content = RecordDict(
        {
            "metrics": MetricRecord(m),
            "status": ConfigRecord(
                {"status": "trained", "client-id": client, "accountant": "rdp", "dataset-fingerprint": f"fp-{client}"}
            ),
            "arrays": arrays,
        }
    )
    return Message(content, reply_to=request or _request(node))


def _good(rng, k: int = 3, start_node: int = 1) -> list[Message]:
    return [_reply(start_node + i, _state(rng), f"site-{i}", n=100 + 50 * i) for i in range(k)]


def _strategy(tmp_path=None, **cfg) -> PrivatuneFedAvg:
    values = dict(preset="digits", min_clients=2, dp=False)
    values.update(cfg)
    ledger = None
    if tmp_path is not None:
        from privatune.common.ledger import ServerLedger

        ledger = ServerLedger(tmp_path / "server-ledger.sqlite")
        ledger.record_run("run-1", {}, "none")
    return PrivatuneFedAvg(RunConfig.create(**values), "run-1", SHAPES, ledger=ledger)


def _fedavg(replies: list[Message]) -> ArrayRecord:
    return aggregate_arrayrecords([m.content for m in replies], "num-examples")


def _assert_same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k


# --------------------------------------------------------------------------------------------- one_line
def test_one_line_keeps_the_innermost_message_of_a_ray_error():
    assert one_line(RAY_REASON) == "disk full"


def test_one_line_strips_colours_tracebacks_and_truncates():
    assert one_line("\x1b[31mbad\x1b[0m  thing") == "bad thing"
    trace = (
        'Traceback (most recent call last):\n  File "a.py", line 1, in <module>\n    f()\n'
        "ray.exceptions.RayTaskError(ValueError): \x1b[1mshape mismatch\x1b[0m"
    )
    assert one_line(trace) == "shape mismatch"
    assert one_line("ValueError: plain classes add nothing") == "plain classes add nothing"
    assert one_line("ZeroDivisionError: division by zero") == "ZeroDivisionError: division by zero"
    long = one_line("word " * 200, limit=50)
    assert len(long) == 50 and long.endswith("...") and "\n" not in long
    assert one_line("") == "unknown error (no message)"


# ------------------------------------------------------------------------------------------ pure checks
@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), -float("inf"), 1e12, 10**9 + 1, 0, -3, 12.5, "12", True, None]
)
def test_num_examples_must_be_a_sane_positive_integer(bad):
    with pytest.raises(UpdateRejected, match="num-examples"):
        check_num_examples(bad)


def test_num_examples_accepts_integers():
    assert check_num_examples(12) == 12 and check_num_examples(12.0) == 12 and check_num_examples(10**9) == 10**9


@pytest.mark.parametrize("dtype", ["float16", "float64", "int64", "int32", "bool", "uint8", "complex64", "<U3"])
def test_only_float32_arrays_are_accepted(dtype):
    arrays = {k: Array(np.zeros(s, dtype=dtype)) for k, s in SHAPES.items()}
    with pytest.raises(UpdateRejected, match="dtype"):
        check_plain_arrays(arrays, SHAPES)
    check_plain_arrays({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}, SHAPES)


def test_value_bounds():
    ok = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    check_values(ok)
    with pytest.raises(UpdateRejected, match="above the bound"):
        check_values({**ok, "head.bias": np.full(4, 3e38, np.float32)})
    with pytest.raises(UpdateRejected, match="non-finite"):
        check_values({**ok, "head.bias": np.array([0, np.inf, 0, 0], np.float32)})
    ref = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    check_values(ok, reference=ref, max_change_l2=math.sqrt(D) + 1e-6)
    with pytest.raises(UpdateRejected, match="L2"):
        check_values(ok, reference=ref, max_change_l2=math.sqrt(D) - 1e-3)


def test_dp_change_bound_holds_for_real_dp_sgd_and_is_not_absurd():
    """Train with DP-SGD exactly as a site does; the weights move less than the bound, by a sane margin."""
    import torch

    from privatune.client.randomness import SeededRandomness
    from privatune.client.training import train_local

    torch.manual_seed(0)
    n, batch, epochs, lr, clip, sigma = 96, 16, 2, 2.0, 1.0, 0.8
    module = torch.nn.Linear(8, 4)
    before = {k: v.detach().clone().numpy() for k, v in module.state_dict().items()}
    x = torch.randn(n, 8) * 50  # large inputs: every per-sample gradient is clipped
    y = torch.randint(0, 4, (n,))
    train_local(
        module,
        (x,),
        y,
        epochs=epochs,
        batch_size=batch,
        lr=lr,
        dp=True,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        randomness=SeededRandomness(3),
    )
    after = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    moved = math.sqrt(sum(float(np.sum((after[k] - before[k]) ** 2)) for k in before))
    bound = dp_change_bound(
        num_examples=n,
        batch_size=batch,
        epochs=epochs,
        lr=lr,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        num_params=36,
    )
    assert 0 < moved < bound < 200 * moved


def test_update_digest_sees_every_byte_name_and_dtype():
    a = {k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}
    b = {k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}
    assert update_digest(a) == update_digest(b)
    b["head.bias"] = Array(np.array([0, 0, 0, 1e-30], np.float32))
    assert update_digest(a) != update_digest(b)
    assert update_digest({"x": np.zeros(2, np.float32)}) != update_digest({"y": np.zeros(2, np.float32)})


def test_reply_guard_keeps_the_first_and_spots_replays():
    g = ReplyGuard()
    g.start_round(1, {"m1": 1, "m2": 2})
    assert g.check_identity(1, "a", "m1") is None
    assert g.check_identity(1, "b", "m1").startswith("duplicate")
    assert g.check_identity(2, "a", "m2").startswith("duplicate")
    assert g.check_update("d1", "a") is None
    g.start_round(2, {"m3": 1, "m4": 2})
    assert "round 1" in g.check_identity(1, "a", "m1")
    assert g.check_identity(2, "b", "m9").startswith("replay")
    assert g.check_identity(2, "b", "m3").startswith("replay")  # the message sent to node 1
    assert g.check_identity(2, "b", "m4") is None
    assert g.check_update("d1", "b").startswith("replay")


# ------------------------------------------------------------------------------- the strategy, plaintext
def _bad_reply(kind: str, rng, good: list[Message]) -> Message:
    node, cid = 9, "mallory"
    s = _state(rng)
    if kind.startswith("num-examples="):
        value = {"nan": float("nan"), "inf": float("inf"), "huge": 1e12, "zero": 0, "negative": -5, "fraction": 12.5}[
            kind.split("=")[1]
        ]
        return _reply(node, s, cid, n=value)
    if kind.startswith("dtype="):
        dtype = kind.split("=")[1]
        return _reply(
            node, {k: v.astype(dtype) if dtype != "str" else np.full(v.shape, "x") for k, v in s.items()}, cid
        )
    if kind == "huge-values":
        return _reply(node, {**s, "head.weight": np.full((4, 8), 3e38, np.float32)}, cid)
    if kind == "nan-values":
        return _reply(node, {**s, "head.bias": np.full(4, np.nan, np.float32)}, cid)
    if kind == "wrong-shape":
        return _reply(node, {**s, "head.bias": np.zeros(5, np.float32)}, cid)
    if kind == "duplicate-client":  # another node claims site-0
        return _reply(node, s, "site-0")
    if kind == "duplicate-node":  # node 1 answers twice
        return _reply(1, s, cid)
    if kind == "replayed-update":  # a copy of site-1's update, under another name
        return _reply(node, good[1].content["arrays"], cid)
    if kind == "bad-mechanism":
        return _reply(node, s, cid, **{"sample-rate": 7.0})
    raise AssertionError(kind)


FAULTS = [
    "num-examples=nan",
    "num-examples=inf",
    "num-examples=huge",
    "num-examples=zero",
    "num-examples=negative",
    "num-examples=fraction",
    "dtype=float16",
    "dtype=float64",
    "dtype=int64",
    "dtype=bool",
    "dtype=uint8",
    "dtype=complex64",
    "dtype=str",
    "huge-values",
    "nan-values",
    "wrong-shape",
    "duplicate-client",
    "duplicate-node",
    "replayed-update",
    "bad-mechanism",
]
EXPECTED_REASON = {
    "num-examples": "num-examples",
    "dtype": "dtype",
    "huge-values": "above the bound",
    "nan-values": "non-finite",
    "wrong-shape": "shape",
    "duplicate-client": "duplicate",
    "duplicate-node": "duplicate",
    "replayed-update": "replay",
    "bad-mechanism": "sample-rate",
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("position", ["first", "last"])
def test_one_bad_reply_is_rejected_and_the_rest_is_fedavg_of_the_rest(fault, position, tmp_path):
    rng = np.random.default_rng(1)
    good = _good(rng)
    bad = _bad_reply(fault, rng, good)
    first_class = fault.startswith("duplicate") or fault == "replayed-update"
    replies = [*good, bad] if position == "last" or first_class else [bad, *good]
    strategy = _strategy(tmp_path)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["num-clients"] == 3
    _assert_same(arrays, _fedavg(good))
    assert len(strategy.current.dropped) == 1
    reason = next(iter(strategy.current.dropped.values()))
    assert EXPECTED_REASON[fault.split("=")[0]] in reason, reason
    assert "\n" not in reason and "\x1b" not in reason
    rows = strategy.ledger.reports("run-1")
    assert sorted(r.report.status for r in rows) == ["dropped", "trained", "trained", "trained"]


def test_a_reply_replayed_in_a_later_round_is_rejected(tmp_path):
    rng = np.random.default_rng(2)
    strategy = _strategy(tmp_path)
    round1 = _good(rng)
    strategy.aggregate_train(1, round1)
    round2 = _good(rng)
    replayed = _reply(9, round1[0].content["arrays"], "site-9")
    arrays, _ = strategy.aggregate_train(2, [*round2, replayed])
    _assert_same(arrays, _fedavg(round2))
    assert "replay" in strategy.current.dropped["site-9"] and "round 1" in strategy.current.dropped["site-9"]


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3]


def test_a_reply_to_a_message_of_another_round_is_rejected():
    """configure_train remembers what it sent; the grid stamps message ids; replies must answer those."""
    rng = np.random.default_rng(3)
    strategy = _strategy()
    init = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    sent1 = list(strategy.configure_train(1, init, ConfigRecord({}), _Grid()))
    for i, m in enumerate(sent1):
        m.metadata.__dict__["_message_id"] = f"r1-{i}"
    r1 = [_reply(m.metadata.dst_node_id, _state(rng), f"site-{m.metadata.dst_node_id}", request=m) for m in sent1]
    strategy.aggregate_train(1, r1)
    sent2 = list(strategy.configure_train(2, init, ConfigRecord({}), _Grid()))
    for i, m in enumerate(sent2):
        m.metadata.__dict__["_message_id"] = f"r2-{i}"
    r2 = [_reply(m.metadata.dst_node_id, _state(rng), f"site-{m.metadata.dst_node_id}", request=m) for m in sent2]
    old = _reply(sent1[0].metadata.dst_node_id, _state(rng), "site-x", request=sent1[0])
    arrays, _ = strategy.aggregate_train(2, [old, *r2])  # arrives first: it must not take node 1's place
    _assert_same(arrays, _fedavg(r2))
    assert list(strategy.current.dropped.values()) == ["replay: answers a message of round 1"]


def test_dp_run_bounds_the_change_from_the_global_model():
    rng = np.random.default_rng(4)
    strategy = _strategy(dp=True, target_epsilon=8.0)
    init = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in SHAPES.items()}
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in init.items()}), ConfigRecord({}), _Grid())
    good = [_reply(i + 1, _state(rng, 0.05, base=init), f"site-{i}") for i in range(3)]
    far = _reply(9, {k: v + np.float32(1e4) for k, v in init.items()}, "mallory")
    huge = _reply(8, {**init, "head.bias": np.full(4, 3e38, np.float32)}, "mallory-2")
    arrays, _ = strategy.aggregate_train(1, [*good, far, huge])
    _assert_same(arrays, _fedavg(good))
    assert set(strategy.current.dropped) == {"mallory", "mallory-2"}
    assert all("DP-SGD" in r for r in strategy.current.dropped.values())


def test_rejected_update_still_records_its_spend(tmp_path):
    from privatune.server.run_record import RunRecorder

    rng = np.random.default_rng(5)
    strategy = _strategy(tmp_path)
    good = _good(rng, 2)
    bad = _reply(9, {k: v.astype(np.float64) for k, v in _state(rng).items()}, "site-x", epsilon=2.75)
    strategy.aggregate_train(1, [*good, bad])
    row = next(r.report for r in strategy.ledger.reports("run-1") if r.report.client_id == "site-x")
    assert row.status == "dropped" and row.epsilon_reported == 2.75 and row.noise_multiplier == 1.0
    assert row.steps == 12 and row.sample_rate == 0.25 and row.accountant == "rdp"
    assert row.dataset_fingerprint == "fp-site-x" and "dtype float64" in row.reason
    recorder = RunRecorder(tmp_path / "out", summary_base={})
    recorder.finish_round(strategy.current)
    assert recorder.summary()["per_client_epsilon"] == {"site-0": 1.5, "site-1": 1.5, "site-x": 2.75}
    assert recorder.summary()["max_client_epsilon"] == 2.75


def test_duplicates_and_replays_do_not_record_a_second_spend(tmp_path):
    rng = np.random.default_rng(6)
    strategy = _strategy(tmp_path)
    good = _good(rng, 2)
    dup = _reply(9, _state(rng), "site-0", epsilon=9.0)
    replay = _reply(8, good[1].content["arrays"], "site-8", epsilon=9.0)
    strategy.aggregate_train(1, [*good, dup, replay])
    dropped = [r.report for r in strategy.ledger.reports("run-1") if r.report.status == "dropped"]
    assert len(dropped) == 2 and all(r.epsilon_reported is None for r in dropped)
    assert strategy.current.rejected_spends == {}


def test_client_error_reasons_are_stored_on_one_line(tmp_path):
    rng = np.random.default_rng(7)
    strategy = _strategy(tmp_path)
    err = Message(Error(code=0, reason=RAY_REASON), reply_to=_request(5))
    strategy.aggregate_train(1, [*_good(rng, 2), err])
    assert strategy.current.dropped == {"node-5": "client error: disk full"}
    row = next(r.report for r in strategy.ledger.reports("run-1") if r.report.status == "dropped")
    assert row.reason == "client error: disk full"


# ------------------------------------------------------------------------------------------------ HE
@pytest.fixture(scope="module")
def he_keys(tmp_path_factory):
    from privatune.common import he

    return he.write_keys(tmp_path_factory.mktemp("keys"))


def test_he_duplicate_and_replayed_ciphertexts_are_rejected(he_keys):
    from privatune.common import he
    from privatune.common.he.records import arrayrecord_to_update, update_to_arrayrecord

    secret = he.load_context(he_keys.secret, require_secret=True)
    public = he.load_context(he_keys.public, require_secret=False)
    rng = np.random.default_rng(8)
    cfg = RunConfig.create(preset="digits", secure_aggregation="he", min_clients=2)
    strategy = PrivatuneFedAvg(cfg, "run-1", SHAPES, he_context=public)

    def enc(n):
        return update_to_arrayrecord(he.encrypt_update(secret, _state(rng), weight=float(n)))

    good = [_reply(i + 1, enc(100 + i), f"site-{i}", n=100 + i) for i in range(2)]
    copy = _reply(7, good[0].content["arrays"], "site-7")  # a ciphertext seen already
    dup = _reply(8, enc(50), "site-1", n=50)  # a second reply claiming site-1
    arrays, metrics = strategy.aggregate_train(1, [*good, copy, dup])
    assert metrics["num-clients"] == 2
    assert "replay" in strategy.current.dropped["site-7"]
    assert "duplicate" in strategy.current.dropped["site-1@node-8"]
    # The encrypted sum is exactly the sum of the accepted replies, byte for byte.
    acc = he.HEAccumulator(public, D)
    for m in good:
        acc.add(arrayrecord_to_update(m.content["arrays"]))
    assert arrays == ArrayRecord(
        dict(__import__("privatune.common.he.records", fromlist=["x"]).state_to_arrayrecord(acc.result()))
    )
    # The same ciphertext again in round 2 is a replay too.
    fresh = [_reply(i + 1, enc(100 + i), f"site-{i}", n=100 + i) for i in range(2)]
    strategy.aggregate_train(2, [*fresh, _reply(3, good[1].content["arrays"], "site-3")])
    assert "round 1" in strategy.current.dropped["site-3"]


# ----------------------------------------------------------------------------------- robust aggregators
def _poisoned_set(rng, honest: int = 6) -> tuple[list[Message], list[Message]]:
    center = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    good = [_reply(i + 1, _state(rng, 0.05, base=center), f"site-{i}", n=100) for i in range(honest)]
    poison = _reply(99, {k: v + np.float32(500.0) for k, v in center.items()}, "mallory", n=100)
    return good, [*good, poison]


def _distance_from_honest_mean(arrays: ArrayRecord, good: list[Message]) -> float:
    ref = _fedavg(good)
    return math.sqrt(sum(float(np.sum((arrays[k].numpy() - ref[k].numpy()) ** 2)) for k in ref))


@pytest.mark.parametrize(
    "aggregator,flower",
    [
        ("fedmedian", lambda: FedMedian()),
        ("fedtrimmedavg", lambda: FedTrimmedAvg(beta=0.2)),
        ("krum", lambda: Krum(num_malicious_nodes=1)),
    ],
)
def test_robust_aggregators_match_flower_and_resist_one_poisoned_reply(aggregator, flower):
    rng = np.random.default_rng(9)
    good, replies = _poisoned_set(rng)
    ours = aggregate_plain([m.content for m in replies], aggregator, trim_beta=0.2, krum_byzantine=1)
    # Flower's own strategy on the same replies (it pops arrays from them: give it copies).
    copies = [_reply(m.metadata.src_node_id, m.content["arrays"].copy(), "x", n=100) for m in replies]
    theirs, _ = flower().aggregate_train(1, copies)
    _assert_same(ours, theirs)
    fedavg = aggregate_plain([m.content for m in replies], "fedavg")
    d_avg = _distance_from_honest_mean(fedavg, good)
    d_robust = _distance_from_honest_mean(ours, good)
    assert d_avg > 100 and d_robust < 0.05 * d_avg, (d_avg, d_robust)


def test_strategy_uses_the_configured_aggregator():
    rng = np.random.default_rng(10)
    good, replies = _poisoned_set(rng)
    strategy = _strategy(aggregator="krum", krum_byzantine=1, min_clients=5)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert _distance_from_honest_mean(arrays, good) < 1.0


@pytest.mark.parametrize(
    "values,key",
    [
        (dict(aggregator="mean"), "aggregator"),
        (dict(aggregator="krum", secure_aggregation="he"), "aggregator"),
        (dict(aggregator="fedmedian", secure_aggregation="he"), "aggregator"),
        (dict(trim_beta=0.5), "trim-beta"),
        (dict(krum_byzantine=-1), "krum-byzantine"),
        (dict(aggregator="krum", krum_byzantine=2, min_clients=4), "krum-byzantine"),
        (dict(krum_select=0), "krum-select"),
    ],
)
def test_aggregator_config_is_validated(values, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        RunConfig.create(preset="digits", **values)


def test_aggregator_keys_travel_in_the_flower_config():
    cfg = RunConfig.from_flower({"aggregator": "fedtrimmedavg", "trim-beta": "0.1", "krum-byzantine": 0})
    assert cfg.aggregator == "fedtrimmedavg" and cfg.trim_beta == 0.1
    assert RunConfig.from_flower(cfg.to_flower()) == cfg


@pytest.mark.slow
def test_robust_aggregator_federation_drops_no_honest_reply(tmp_path):
    """A real DP federation (Ray simulation) with fedmedian: every honest reply passes screening, it learns."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "median"
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    env.pop("FLWR_HOME", None)
    cmd = [
        sys.executable,
        "-m",
        "privatune.cli",
        "simulate",
        "--preset",
        "digits",
        "--clients",
        "3",
        "--rounds",
        "2",
        "--epsilon",
        "4",
        "--out",
        str(out),
        "--run-config",
        "aggregator=fedmedian",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rounds] == [{}, {}, {}]
    assert all(len(r["clients"]) == 3 for r in rounds[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "config.json").read_text())["aggregator"] == "fedmedian"
    assert summary["rounds_completed"] == 2 and summary["test_accuracy"] > rounds[0]["central"]["accuracy"] + 0.3


def test_the_reported_spend_is_one_dp_mechanism():
    from privatune.common.mechanism import DPMechanism
    from privatune.server.screening import check_accountant, check_mechanism, spend_of

    metrics = dict(_reply(1, _state(np.random.default_rng(0)), "a").content["metrics"])
    spend = spend_of(metrics, check_mechanism(metrics), check_accountant({}, "rdp"))
    assert spend.mechanism == DPMechanism(1.0, 0.25, 12, 1.0, 1e-5, "rdp")
    assert spend.epsilon == 1.5 and spend.epsilon_dataset == 1.5
    with pytest.raises(UpdateRejected, match="accountant"):
        check_accountant({"accountant": "moments"}, "rdp")
    for clip in (0.0, float("inf")):  # in the ledger's range, but no DP-SGD round clips so
        bad = {**metrics, "max-grad-norm": clip}
        with pytest.raises(UpdateRejected, match="max-grad-norm"):
            spend_of(bad, check_mechanism(bad), "rdp")
