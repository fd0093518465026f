"""Server optimisers (FedAvgM, FedAdam, FedYogi) and FedProx at the sites (issue 15, docs/server-optimisers.md).

The server maths is checked against Flower 1.42's own strategy classes over three rounds: their
``aggregate_train`` runs with FedAvg's aggregation (the part they inherit) patched to return the test's
aggregate, so the optimiser step that follows is Flower's code, not a copy of it.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi
from torch import nn
from typer.testing import CliRunner

from privatune.client.proximal import add_proximal_term
from privatune.client.randomness import SeededRandomness
from privatune.client.training import train_local
from privatune.common.config import ConfigError, RunConfig
from privatune.server.app import summary_base
from privatune.server.optimisers import DEFAULT_SERVER_LR, ServerOptimiser

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"head.weight": (3, 4), "head.bias": (3,)}


def _weights(rng: np.random.Generator, dtype=np.float64, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * scale).astype(dtype) for k, s in SHAPES.items()}


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _flower_rounds(strategy, initial, aggregates) -> list[dict[str, np.ndarray]]:
    """Flower's strategy over the rounds: configure_train's bookkeeping by hand, then its aggregate_train."""
    current = initial
    out = []
    if isinstance(strategy, FedAvgM):
        strategy.current_arrays = _record(initial)  # FedAvgM.configure_train keeps the first round's arrays
    for rnd, agg in enumerate(aggregates, start=1):
        if not isinstance(strategy, FedAvgM):
            strategy.current_arrays = {k: v.copy() for k, v in current.items()}  # FedOpt.configure_train
        with mock.patch.object(FedAvg, "aggregate_train", return_value=(_record(agg), MetricRecord({}))):
            arrays, _ = strategy.aggregate_train(rnd, [])
        current = {k: v.numpy() for k, v in arrays.items()}
        out.append(current)
    return out


def _ours_rounds(opt: ServerOptimiser, initial, aggregates) -> tuple[list[dict[str, np.ndarray]], dict]:
    current, state, out = initial, {}, []
    for rnd, agg in enumerate(aggregates, start=1):
        current, state = opt.step(current, agg, state, rnd)
        out.append(current)
    return out, state


def _aggregates_near(rng, initial, rounds=3):
    """Each round's aggregate: the previous round's aggregate plus a small move (as client updates are)."""
    aggs, base = [], initial
    for _ in range(rounds):
        base = {k: v + rng.standard_normal(v.shape) * 0.05 for k, v in base.items()}
        aggs.append(base)
    return aggs


CASES = [
    ("fedavgm", dict(momentum=0.9, lr=0.7), lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9)),
    ("fedavgm", dict(momentum=0.0, lr=0.5), lambda: FedAvgM(server_learning_rate=0.5)),
    ("fedadam", dict(lr=0.1), lambda: FedAdam()),
    (
        "fedadam",
        dict(lr=0.03, beta1=0.5, beta2=0.9, tau=1e-2),
        lambda: FedAdam(eta=0.03, beta_1=0.5, beta_2=0.9, tau=1e-2),
    ),
    ("fedyogi", dict(lr=0.01), lambda: FedYogi()),
    ("fedyogi", dict(lr=0.2, beta1=0.8, beta2=0.95, tau=1e-3), lambda: FedYogi(eta=0.2, beta_1=0.8, beta_2=0.95)),
]


@pytest.mark.parametrize("name,settings,flower", CASES)
def test_three_rounds_match_flowers_own_strategy(name, settings, flower):
    rng = np.random.default_rng(3)
    initial = _weights(rng)
    aggregates = _aggregates_near(rng, initial)
    theirs = _flower_rounds(flower(), initial, aggregates)
    ours, _ = _ours_rounds(ServerOptimiser(name=name, **settings), initial, aggregates)
    for mine, flowers in zip(ours, theirs, strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(mine[k], flowers[k], rtol=1e-12, atol=1e-14)
    moved = max(float(np.max(np.abs(ours[-1][k] - aggregates[-1][k]))) for k in SHAPES)
    assert moved > 1e-3  # a real server step, not the aggregate passed through


def test_the_defaults_are_flowers():
    cfg = RunConfig.create(preset="digits")
    for name, flower in [("fedavgm", FedAvgM()), ("fedadam", FedAdam()), ("fedyogi", FedYogi())]:
        opt = ServerOptimiser.from_config(RunConfig.create(preset="digits", server_optimiser=name))
        if name == "fedavgm":
            assert (opt.lr, opt.momentum) == (flower.server_learning_rate, flower.server_momentum)
        else:
            assert (opt.lr, opt.beta1, opt.beta2, opt.tau) == (flower.eta, flower.beta_1, flower.beta_2, flower.tau)
        assert opt.lr == DEFAULT_SERVER_LR[name]
    assert cfg.server_optimiser == "fedavg" and cfg.proximal_mu == 0.0
    assert (
        ServerOptimiser.from_config(RunConfig.create(preset="digits", server_optimiser="fedadam", server_lr=0.5)).lr
        == 0.5
    )


def test_fedavg_and_momentum_free_fedavgm_return_the_aggregate():
    rng = np.random.default_rng(4)
    current, agg = _weights(rng, np.float32), _weights(rng, np.float32)
    for opt in (ServerOptimiser("fedavg"), ServerOptimiser("fedavgm", lr=1.0, momentum=0.0)):
        new, state = opt.step(current, agg, {}, 1)
        assert state == {} and all(np.array_equal(new[k], agg[k]) for k in SHAPES)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_the_state_is_arrays_that_survive_a_save_and_restore(name):
    rng = np.random.default_rng(5)
    initial = _weights(rng, np.float32)
    aggregates = _aggregates_near(rng, initial)
    opt = ServerOptimiser(name=name, lr=0.3, momentum=0.9)
    straight, _ = _ours_rounds(opt, initial, aggregates)
    current, state = initial, {}
    for rnd in (1, 2):
        current, state = opt.step(current, aggregates[rnd - 1], state, rnd)
    assert state and all(isinstance(v, np.ndarray) for v in state.values())
    buf = io.BytesIO()
    np.savez(buf, **state)  # what a checkpoint does with it
    buf.seek(0)
    restored = dict(np.load(buf))
    resumed, _ = opt.step(current, aggregates[2], restored, 3)
    for k in SHAPES:
        assert resumed[k].dtype == np.float32  # the global model keeps its dtype (screening wants float32)
        np.testing.assert_array_equal(resumed[k], straight[2][k])


def test_the_strategy_steps_from_the_aggregate_with_the_configured_optimiser():
    from privatune.server.strategy import PrivatuneFedAvg
    from tests.test_screening import SHAPES as SCREEN_SHAPES
    from tests.test_screening import _fedavg, _good

    rng = np.random.default_rng(6)
    cfg = RunConfig.create(preset="digits", min_clients=2, dp=False, server_optimiser="fedadam")
    strategy = PrivatuneFedAvg(cfg, "run-1", SCREEN_SHAPES)
    current = {k: np.zeros(s, np.float32) for k, s in SCREEN_SHAPES.items()}
    expected_state: dict = {}
    for rnd in (1, 2):
        replies = _good(rng, start_node=10 * rnd)
        strategy._global = current  # what configure_train sets from the round's arrays
        mean = {k: v.numpy() for k, v in _fedavg(replies).items()}
        expected, expected_state = ServerOptimiser.from_config(cfg).step(current, mean, expected_state, rnd)
        arrays, _ = strategy.aggregate_train(rnd, replies)
        got = {k: v.numpy() for k, v in arrays.items()}
        for k in SCREEN_SHAPES:
            np.testing.assert_array_equal(got[k], expected[k])
        current = got
    assert set(strategy.server_state) == {f"{p}/{k}" for p in ("m", "v") for k in SCREEN_SHAPES}


def test_summary_records_the_server_optimiser():
    cfg = RunConfig.create(preset="digits", server_optimiser="fedavgm", server_momentum=0.9, proximal_mu=0.01)
    base = summary_base(cfg, "r")
    assert base["server_optimiser"] == {"name": "fedavgm", "lr": 1.0, "momentum": 0.9}
    assert base["proximal_mu"] == 0.01
    assert summary_base(RunConfig.create(preset="digits"), "r")["server_optimiser"] == {"name": "fedavg"}


def test_fedavgm_at_flowers_defaults_warns_that_it_is_fedavg(caplog):
    from privatune.server.strategy import PrivatuneFedAvg

    with caplog.at_level("WARNING", logger="privatune.server"):
        PrivatuneFedAvg(RunConfig.create(preset="digits", server_optimiser="fedavgm"), "r", SHAPES)
    assert "is FedAvg; set server-momentum" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="privatune.server"):
        PrivatuneFedAvg(RunConfig.create(preset="digits", server_optimiser="fedavgm", server_momentum=0.9), "r", SHAPES)
    assert "is FedAvg" not in caplog.text


# ---------------------------------------------------------------------------------------- config refusals
@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_under_he_only_fedavg_is_allowed(name):
    with pytest.raises(ConfigError, match=f"^server-optimiser: '{name}' .*use server-optimiser=fedavg with he") as err:
        RunConfig.create(preset="digits", secure_aggregation="he", server_optimiser=name)
    assert "\n" not in str(err.value)


def test_what_composes_is_accepted():
    assert RunConfig.create(preset="digits", lr=0.5, proximal_mu=4.0).proximal_mu == 4.0  # lr x mu = 2
    assert RunConfig.create(preset="digits", optimizer="adam", proximal_mu=10.0).proximal_mu == 10.0
    assert RunConfig.create(preset="digits", secure_aggregation="he", proximal_mu=0.1).proximal_mu == 0.1
    for aggregator in ("fedmedian", "fedtrimmedavg", "krum"):  # a robust aggregate, then the server step
        cfg = RunConfig.create(preset="digits", aggregator=aggregator, server_optimiser="fedadam", proximal_mu=0.1)
        assert (cfg.aggregator, cfg.server_optimiser) == (aggregator, "fedadam")


@pytest.mark.parametrize(
    "values,key",
    [
        (dict(server_optimiser="adam"), "server-optimiser"),
        (dict(server_lr=-0.1), "server-lr"),
        (dict(server_momentum=1.0), "server-momentum"),
        (dict(server_beta1=1.0), "server-beta1"),
        (dict(server_beta2=-0.1), "server-beta2"),
        (dict(server_tau=0.0), "server-tau"),
        (dict(proximal_mu=-1.0), "proximal-mu"),
        (dict(proximal_mu=float("nan")), "proximal-mu"),
        (dict(proximal_mu=4.1, lr=0.5), "proximal-mu"),  # sgd: lr x mu > 2 overshoots w_global and diverges
    ],
)
def test_bad_values_are_refused_with_the_key_named(values, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        RunConfig.create(preset="digits", **values)


def test_the_cli_refuses_adam_under_he_in_one_line(tmp_path):
    from privatune.cli import app

    args = ["simulate", "--preset", "digits", "--clients", "2", "--rounds", "1", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--run-config", "secure-aggregation=he server-optimiser=fedadam"])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "server-optimiser" in lines[0] and "fedadam" in lines[0]


# ----------------------------------------------------------------------------------------------- FedProx
def _linear(rng: np.random.Generator, d_in: int = 3, d_out: int = 2) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(rng.standard_normal((d_out, d_in)), dtype=torch.float32))
    return layer


def test_without_dp_the_proximal_step_matches_a_hand_computation():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    y = rng.integers(0, 2, 6)
    layer = _linear(rng)
    w0 = layer.weight.detach().numpy().astype(np.float64).copy()
    lr, mu, epochs = 0.5, 0.7, 4
    train_local(
        layer, (torch.as_tensor(x),), torch.as_tensor(y), epochs=epochs, batch_size=6, lr=lr, dp=False,
        noise_multiplier=0.0, max_grad_norm=1.0, randomness=SeededRandomness(1), proximal_mu=mu,
    )  # fmt: skip
    # One full-batch step per epoch: w <- w - lr * (grad CE(w) + mu (w - w0)), CE's gradient by hand.
    w = w0.copy()
    onehot = np.eye(2)[y]
    for _ in range(epochs):
        logits = x @ w.T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot).T @ x / len(y)
        w = w - lr * (grad + mu * (w - w0))
    np.testing.assert_allclose(layer.weight.detach().numpy(), w, rtol=1e-5, atol=1e-6)


def test_under_dp_the_proximal_gradient_comes_after_clipping_and_noise():
    """Zero inputs: every record's gradient is 0, so after Opacus each step's gradient is its noise alone.
    The run with mu must then follow w <- w - lr (noise + mu (w - w0)) with the same noise, the proximal part
    unclipped (it is far above max-grad-norm), and the mechanism must be the one without mu."""
    rng = np.random.default_rng(8)
    n, lr, mu, clip = 40, 0.5, 0.9, 0.01
    x = torch.zeros(n, 3)
    y = torch.as_tensor(rng.integers(0, 2, n))
    start = _linear(rng)
    w0 = start.weight.detach().clone()

    def run(proximal_mu: float):
        from privatune.client.training import TrainHooks

        layer = _linear(rng)
        layer.load_state_dict(start.state_dict())
        trace = [w0.clone()]
        hooks = TrainHooks(after_step=lambda _step, m: trace.append(next(m.parameters()).detach().clone()))
        result = train_local(
            layer, (x,), y, epochs=2, batch_size=10, lr=lr, dp=True, noise_multiplier=50.0, max_grad_norm=clip,
            randomness=SeededRandomness(99), hooks=hooks, proximal_mu=proximal_mu,
        )  # fmt: skip
        return result, trace

    plain, plain_trace = run(0.0)
    prox, prox_trace = run(mu)
    assert prox.mechanism == plain.mechanism and prox.steps == plain.steps == 8
    noises = [(a - b) / lr for a, b in itertools.pairwise(plain_trace)]
    w = w0.clone()
    for noise, got in zip(noises, prox_trace[1:], strict=True):
        w = w - lr * (noise + mu * (w - w0))
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
    assert float(torch.norm(mu * (prox_trace[-2] - w0))) > 3 * clip  # clipped, it could not be this large


def test_a_proximal_term_shrinks_the_update_toward_the_global_model():
    rng = np.random.default_rng(9)
    x = torch.as_tensor(rng.standard_normal((256, 3)), dtype=torch.float32)
    y = (x[:, 0] > 0).long()  # learnable: the loss gradient pulls the same way every step
    start = _linear(rng)
    w0 = start.weight.detach().clone()
    moves = {}
    for mu in (0.0, 0.5, 1.5):  # lr * mu < 1: a stable pull toward w0
        layer = _linear(rng)
        layer.load_state_dict(start.state_dict())
        train_local(
            layer, (x,), y, epochs=3, batch_size=32, lr=0.5, dp=True, noise_multiplier=0.5, max_grad_norm=1.0,
            randomness=SeededRandomness(3), proximal_mu=mu,
        )  # fmt: skip
        moves[mu] = float(torch.norm(layer.weight.detach() - w0))
    assert moves[1.5] < moves[0.5] < moves[0.0], moves


def test_mu_zero_adds_no_hook_and_a_negative_mu_is_refused():
    layer = nn.Linear(2, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    assert add_proximal_term(opt, layer, 0.0) is None
    with pytest.raises(ValueError, match="proximal-mu"):
        add_proximal_term(opt, layer, -0.5)


# ------------------------------------------------------------------------------------------ simulations
@pytest.mark.slow
@pytest.mark.parametrize(
    "run_config,name",
    [
        ("server-optimiser=fedavgm server-momentum=0.9", "fedavgm"),
        ("server-optimiser=fedadam", "fedadam"),
        ("server-optimiser=fedyogi", "fedyogi"),
        ("proximal-mu=0.1", "fedavg"),
    ],
)
def test_a_small_digits_federation_trains_with_each_optimiser(tmp_path, run_config, name):
    from safetensors.numpy import load_file

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "privatune.cli", "simulate", "--preset", "digits", "--clients", "2", "--rounds", "2"]
    cmd += ["--epsilon", "8", "--out", str(out), "--run-config", f"max-records=400 local-epochs=1 {run_config}"]
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["server_optimiser"]["name"] == name
    assert summary["proximal_mu"] == (0.1 if "proximal" in run_config else 0.0)
    final = load_file(str(out / "global.safetensors"))
    cfg = RunConfig.create(preset="digits", max_records=400)
    from privatune.server.app import initial_weights

    start = {k: v.numpy() for k, v in initial_weights(cfg, "x").arrays.items()}
    assert set(final) == set(start) and all(np.all(np.isfinite(final[k])) for k in final)
    assert max(float(np.max(np.abs(final[k] - start[k]))) for k in final) > 1e-3  # the global model moved
