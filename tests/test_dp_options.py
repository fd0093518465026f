"""DP training options (client/dp_options.py): physical batches, Adam, ghost clipping. None changes the mechanism:
same logical batches, steps, clipping and noise; the server's screen bounds Adam's updates."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from privatune.client.dp_options import GRAD_SAMPLE_GHOST, GRAD_SAMPLE_HOOKS, grad_sample_mode
from privatune.client.randomness import SeededRandomness
from privatune.client.training import train_local
from privatune.common.config import ConfigError, RunConfig
from privatune.common.optimizers import adam_max_coordinate_move, adam_step_factor
from privatune.server.screening import UpdateRejected, check_values, dp_change_bound


def _head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(16, 4)


def _head_data(n: int = 50) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 16, generator=g),), torch.randint(0, 4, (n,), generator=g)


def _cnn() -> nn.Module:
    from privatune.common.models import get_model_spec

    return get_model_spec("digits-cnn").build(10, 0)  # full mode: every weight trains


def _cnn_data(n: int = 40) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 1, 28, 28, generator=g),), torch.randint(0, 10, (n,), generator=g)


CASES = {"head": (_head, _head_data), "cnn": (_cnn, _cnn_data)}


def _train(case: str, *, dp: bool, seed: int = 7, batch_size: int = 16, **kw):
    make, data = CASES[case]
    kw.setdefault(
        "closed_form_linear", False
    )  # these tests are about Opacus' options (tests/test_linear_dp.py: the other)
    module = make()
    xs, y = data()
    res = train_local(
        module,
        xs,
        y,
        epochs=1,
        batch_size=batch_size,
        lr=0.1,
        dp=dp,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        randomness=SeededRandomness(seed),
        **kw,
    )
    return module, res


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("case", ["head", "cnn"])
@pytest.mark.parametrize("dp", [False, True])
def test_physical_batches_give_the_unsplit_parameters(case, dp):
    base, r0 = _train(case, dp=dp)
    for k in (3, 5):  # smaller than the logical batch (16); 3 divides neither 16 nor the Poisson draws
        split, r = _train(case, dp=dp, max_physical_batch_size=k)
        assert _max_diff(base, split) < 1e-6, k
        assert r.mechanism == r0.mechanism  # same steps, rate, noise: same epsilon
    if dp:  # the comparison is not vacuous: other noise gives other weights
        other, _ = _train(case, dp=dp, seed=8, max_physical_batch_size=3)
        assert _max_diff(base, other) > 1e-4


@pytest.mark.parametrize("case", ["head", "cnn"])
def test_ghost_clipping_step_equals_the_hooks_step_with_the_same_noise(case):
    hooks, rh = _train(case, dp=True, batch_size=64)  # one logical batch of about all records: one step
    ghost, rg = _train(case, dp=True, batch_size=64, ghost_clipping=True)
    assert rh.grad_sample_mode == GRAD_SAMPLE_HOOKS and rg.grad_sample_mode == GRAD_SAMPLE_GHOST
    assert rh.steps == rg.steps == 1 and rh.mechanism == rg.mechanism
    assert _max_diff(hooks, ghost) < 1e-6
    other, _ = _train(case, dp=True, batch_size=64, ghost_clipping=True, seed=8)  # the site's noise reaches ghost
    assert _max_diff(ghost, other) > 1e-4
    both, _ = _train(case, dp=True, ghost_clipping=True, max_physical_batch_size=5)
    alone, _ = _train(case, dp=True)
    assert _max_diff(both, alone) < 1e-6


class _Scale(nn.Module):
    """A trainable layer Opacus has no sampler for."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_ghost_clipping_falls_back_with_one_line_naming_the_layer(caplog):
    assert grad_sample_mode(nn.Linear(3, 2), True) == GRAD_SAMPLE_GHOST
    assert grad_sample_mode(nn.Linear(3, 2), False) == GRAD_SAMPLE_HOOKS
    model = nn.Sequential(nn.Linear(3, 4), _Scale())
    with caplog.at_level(logging.WARNING, logger="privatune.client.dp_options"):
        assert grad_sample_mode(model, True) == GRAD_SAMPLE_HOOKS
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "1 (_Scale)" in lines[0]
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert grad_sample_mode(tied, True) == GRAD_SAMPLE_HOOKS


def test_dp_adam_moves_the_weights_lowers_the_loss_and_costs_what_sgd_costs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 0] > 0).long()  # an easy task
    runs = {}
    for opt in ("sgd", "adam"):
        torch.manual_seed(0)
        m = nn.Linear(8, 2)
        start = m.weight.detach().clone()
        before = float(nn.functional.cross_entropy(m(x), y).detach())
        res = train_local(
            m,
            (x,),
            y,
            epochs=3,
            batch_size=50,
            lr=0.05,
            dp=True,
            noise_multiplier=0.8,
            max_grad_norm=1.0,
            randomness=SeededRandomness(1),
            optimizer_name=opt,
        )
        after = float(nn.functional.cross_entropy(m(x), y).detach())
        runs[opt] = res
        assert res.optimizer == opt
        assert float((m.weight - start).abs().max()) > 1e-3
        assert after < before - 0.1, (opt, before, after)
    assert runs["adam"].mechanism == runs["sgd"].mechanism


def test_adam_without_dp_trains():
    torch.manual_seed(0)
    m = nn.Linear(16, 4)
    xs, y = _head_data(64)
    before = float(nn.functional.cross_entropy(m(xs[0]), y).detach())
    res = train_local(
        m, xs, y, epochs=5, batch_size=16, lr=0.05, dp=False, noise_multiplier=0.0, max_grad_norm=1.0,
        randomness=SeededRandomness(0), optimizer_name="adam",
    )  # fmt: skip
    assert res.mechanism.noise_multiplier == 0.0 and res.grad_sample_mode == ""
    assert float(nn.functional.cross_entropy(m(xs[0]), y).detach()) < before


def test_adam_step_factor_is_one_first_and_bounded():
    assert adam_step_factor(1) == pytest.approx(1.0)
    assert all(adam_step_factor(t) < 7.3 for t in (2, 10, 100, 10_000))
    assert adam_max_coordinate_move(20_000) >= adam_max_coordinate_move(10_000) + 10_000 * adam_step_factor(10_000)


def test_the_screen_passes_a_real_dp_adam_update_and_refuses_an_inflated_one():
    torch.manual_seed(0)
    m = nn.Linear(16, 4)
    start = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    xs, y = _head_data(50)
    lr = 0.05
    res = train_local(
        m, xs, y, epochs=2, batch_size=16, lr=lr, dp=True, noise_multiplier=5.0, max_grad_norm=1.0,
        randomness=SeededRandomness(2), optimizer_name="adam",
    )  # fmt: skip
    state = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    d = sum(v.size for v in state.values())
    bound = dp_change_bound(
        num_examples=50, batch_size=16, epochs=2, lr=lr, max_grad_norm=1.0, noise_multiplier=5.0, num_params=d,
        optimizer="adam",
    )  # fmt: skip
    assert bound == pytest.approx(2 * lr * adam_max_coordinate_move(res.steps) * np.sqrt(d))
    check_values(state, reference=start, max_change_l2=bound)
    inflated = {k: start[k] + (state[k] - start[k]) * 1000.0 for k in state}
    with pytest.raises(UpdateRejected):
        check_values(inflated, reference=start, max_change_l2=bound)


@pytest.mark.parametrize(
    ("key", "value"),
    [("optimizer", "rmsprop"), ("max_physical_batch_size", -1), ("ghost_clipping", "maybe")],
)
def test_config_errors_name_the_key(key, value):
    with pytest.raises((ConfigError, ValueError, TypeError)) as err:
        RunConfig.create(preset="digits", **{key: value})
    assert key.replace("_", "-") in str(err.value)


def test_config_accepts_the_options():
    cfg = RunConfig.create(preset="digits", optimizer="adam", max_physical_batch_size=4, ghost_clipping=True)
    assert (cfg.optimizer, cfg.max_physical_batch_size, cfg.ghost_clipping) == ("adam", 4, True)
