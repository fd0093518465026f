"""The closed-form DP-SGD path for a linear head (client/linear_dp.py) against Opacus' DPOptimizer step.

Same module init, same sampled records (the site's Poisson sampler, same seed), same noise draws: the weights
after training equal Opacus' to float tolerance, and the recorded mechanism is identical.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privatune.client.dp_options import GRAD_SAMPLE_HOOKS
from privatune.client.linear_dp import (
    GRAD_SAMPLE_LINEAR,
    LinearDPStep,
    applies_to,
    clip_factors,
    clipped_sums,
    clipped_sums_of_samples,
    grad_samples,
    per_sample_norms,
)
from privatune.client.randomness import SeededRandomness
from privatune.client.training import TensorRows, TrainHooks, train_local
from privatune.common.models import new_head
from tests.helpers.randomness import RecordingRandomness

C = 1.0


def _data(n: int = 60, d: int = 12, k: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[: n // 3] *= 5.0  # gradients well above the clip bound
    x[n // 3 : 2 * n // 3] *= 0.01  # and well below it
    return x, torch.randint(0, k, (n,), generator=g)


def _train(closed: bool, x: torch.Tensor, y: torch.Tensor, *, seed: int = 3, randomness: Any = None, **kw: Any):
    head = new_head(x.shape[1], int(y.max()) + 1, 0)
    kw = {"epochs": 2, "batch_size": 8, "lr": 0.5, "noise_multiplier": 0.8, **kw}
    res = train_local(
        head,
        (x,),
        y,
        dp=True,
        max_grad_norm=C,
        randomness=randomness or SeededRandomness(seed),
        closed_form_linear=closed,
        **kw,
    )
    return head, res


def _diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_closed_form_norms_and_sums_equal_the_materialised_per_sample_gradients():
    x, _ = _data()
    g = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(2))
    for bias in (True, False):
        samples = grad_samples(x, g, bias)
        flat = torch.cat([s.reshape(len(s), -1) for s in samples], dim=1)
        norms = per_sample_norms(x, g, bias)
        assert torch.allclose(norms, flat.norm(dim=1), rtol=1e-5)
        factors = clip_factors(norms, C)
        assert (factors < 1).any() and (factors == 1).any()  # records above and below the bound
        gw, gb = clipped_sums(x, g, factors, bias)
        ref = clipped_sums_of_samples(samples, C)
        assert torch.allclose(gw, ref[0], atol=1e-5) and (gb is None) == (not bias)
        if bias:
            assert gb is not None and torch.allclose(gb, ref[1], atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}, {"optimizer_name": "adam", "lr": 0.05}, {"proximal_mu": 0.5}])
def test_the_step_equals_opacus_with_the_same_batches_and_noise(kw):
    x, y = _data()
    fast, rf = _train(True, x, y, **kw)
    ref, ro = _train(False, x, y, **kw)
    assert rf.grad_sample_mode == GRAD_SAMPLE_LINEAR and ro.grad_sample_mode == GRAD_SAMPLE_HOOKS
    assert rf.mechanism == ro.mechanism  # noise multiplier, q, steps, clip, delta, accountant: the same epsilon
    assert rf.steps == 2 * 8 and rf.sample_rate == ro.sample_rate == 1 / 8
    assert _diff(fast, ref) < 1e-5
    assert rf.loss == pytest.approx(ro.loss, rel=1e-5, abs=1e-5)  # float32 sums, relative to the loss
    other, _ = _train(True, x, y, seed=4, **kw)  # not vacuous: other noise and batches give other weights
    assert _diff(fast, other) > 1e-3
    start = new_head(x.shape[1], 3, 0)
    assert _diff(fast, start) > 1e-3


def test_records_above_and_below_the_clip_bound_are_clipped_like_opacus():
    x, y = _data()
    head = new_head(x.shape[1], 3, 0)
    step = LinearDPStep(
        head,
        list(head.parameters()),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=60,
        randomness=SeededRandomness(0),
    )
    _, g = step.output_grads(x, y)
    norms = per_sample_norms(x, g, True)
    assert (norms > 2 * C).sum() >= 10 and (norms < C).sum() >= 5
    fast, ref = _train(True, x, y, noise_multiplier=0.0), _train(False, x, y, noise_multiplier=0.0)
    assert _diff(fast[0], ref[0]) < 1e-5  # without noise, only the clipping is compared


def test_an_empty_poisson_batch_is_a_noise_only_step_like_opacus():
    x, y = _data(n=6)
    for seed in range(50):  # q = 1/6, 6 records: about a third of the batches are empty; find a seed with one
        rec = RecordingRandomness(seed, 6, 1 / 6)
        fast, rf = _train(True, x, y, randomness=rec, batch_size=1, epochs=1)
        if 0 in rec.sizes:
            break
    else:
        pytest.fail("no empty Poisson batch in 50 seeds")
    ref, ro = _train(False, x, y, randomness=RecordingRandomness(seed, 6, 1 / 6), batch_size=1, epochs=1)
    assert rf.mechanism == ro.mechanism and rf.steps == 6
    assert _diff(fast, ref) < 1e-5
    # One empty step by itself: the update is the noise alone, the same draw install_noise makes.
    head = new_head(4, 2, 0)
    step = LinearDPStep(
        head,
        list(head.parameters()),
        noise_multiplier=2.0,
        max_grad_norm=C,
        expected_batch_size=3,
        randomness=SeededRandomness(9),
    )
    step(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    draw = SeededRandomness(9)
    for p in head.parameters():
        expected = draw.gaussian(tuple(p.shape), 2.0 * C, device="cpu", dtype=p.dtype) / 3
        assert p.grad is not None and torch.equal(p.grad, expected)


def test_before_step_sees_the_per_sample_gradients_opacus_shows():
    x, y = _data()
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def hook(closed: bool):
        def before_step(step: int, module: nn.Module, optimizer: Any) -> None:
            if step == 0:
                seen[closed] += [p.grad_sample.clone() for p in optimizer.params]

        return TrainHooks(before_step=before_step)

    fast, _ = _train(True, x, y, hooks=hook(True))
    ref, _ = _train(False, x, y, hooks=hook(False))
    assert [s.shape for s in seen[True]] == [s.shape for s in seen[False]] and seen[True][0].shape[0] > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(seen[True], seen[False], strict=True))
    assert _diff(fast, ref) < 1e-5
    assert not any(hasattr(p, "grad_sample") for p in fast.parameters())


def test_opacus_runs_where_the_closed_form_does_not_apply():
    x, y = _data()
    assert applies_to(nn.Linear(3, 2)) and not applies_to(nn.Sequential(nn.Linear(3, 2)))
    frozen = nn.Linear(3, 2)
    frozen.weight.requires_grad_(False)
    assert not applies_to(frozen)
    _, r = _train(True, x, y, hooks=TrainHooks(after_make_private=lambda opt: None))  # a fault-injection point
    assert r.grad_sample_mode == GRAD_SAMPLE_HOOKS
    _, r = _train(True, x, y, augment_views=2)  # K views: each record's mean gradient is not rank one
    assert r.grad_sample_mode == GRAD_SAMPLE_HOOKS


def test_tensor_rows_give_the_data_loader_batches_in_the_same_order():
    x, y = _data(n=23)
    old = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(5))
    new = DataLoader(
        TensorRows(x, y), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(5), collate_fn=lambda b: b
    )
    for _ in range(2):  # two epochs: the generator advances alike
        for (xa, ya), (xb, yb) in zip(old, new, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    empty = TensorRows(x, y).__getitems__([])
    assert empty[0].shape == (0, 12) and empty[1].dtype == torch.long
