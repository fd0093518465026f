"""Closed-form DP-SGD for a linear layer on fixed inputs (``head`` mode on cached features), without Opacus.

For ``z = W x + b`` the per-sample gradient of record i's loss is ``g_i x_i^T`` for W and ``g_i`` for b, where
``g_i = dl_i/dz_i``; its norm is ``||g_i|| sqrt(||x_i||^2 + 1)`` (``+ 0`` without a trainable bias). So the
per-sample gradients never need to exist: with Opacus' clip factor ``c_i = min(1, C / (norm_i + 1e-6))`` the
clipped sum is ``(c * G)^T X`` (and ``c^T G`` for b), two small matrix products.

:class:`LinearDPStep` is one DP-SGD step with Opacus 1.6's arithmetic, so it is the same mechanism as
:func:`privatune.client.training.train_local`'s Opacus path, not a new one: the same records (the site's Poisson
sampler), the same clipping bound, the same noise (std ``noise_multiplier x C``, drawn from the site's
:class:`~privatune.client.randomness.Randomness` in the shape and order of ``install_noise``: one draw per
trainable parameter, weight then bias), the same division by Opacus' expected batch size ``int(n q)``. Nothing
new leaves the site. tests/test_linear_dp.py checks each step against Opacus' DPOptimizer.

Pure torch (no Opacus, no Flower); the sampling and the optimiser stay the caller's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from privatune.client.randomness import Randomness

GRAD_SAMPLE_LINEAR = "linear"  # train_local's grad_sample_mode for this path (Opacus' are "hooks" and "ghost")
OPACUS_CLIP_EPS = 1e-6  # Opacus 1.6: clip factor = C / (norm + 1e-6), at most 1


def applies_to(module: nn.Module) -> bool:
    """True for a bare ``nn.Linear`` with a trainable weight: what head mode trains (``run.model.head``)."""
    return type(module) is nn.Linear and module.weight.requires_grad


def trainable_bias(module: nn.Linear) -> bool:
    return module.bias is not None and module.bias.requires_grad


def input_scales(x: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """``sqrt(||x_i||^2 + 1)`` (``+ 0`` without a trainable bias): fixed inputs, so computable once per training."""
    xx = x.pow(2).sum(dim=1)
    return (xx + 1.0 if with_bias else xx).sqrt()


def per_sample_norms(x: torch.Tensor, g: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """``||g_i x_i^T||_F`` (with the bias: of the whole per-sample gradient ``[g_i x_i^T, g_i]``), row by row."""
    return g.norm(dim=1) * input_scales(x, with_bias)


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clip factors: ``min(1, C / (norm + 1e-6))``."""
    return (max_grad_norm / (norms + OPACUS_CLIP_EPS)).clamp(max=1.0)


def clipped_sums(
    x: torch.Tensor, g: torch.Tensor, factors: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The clipped sum of the per-sample gradients: ``(c * G)^T X`` for W, ``c^T G`` for b."""
    cg = g * factors.unsqueeze(1)
    return cg.t() @ x, (cg.sum(dim=0) if with_bias else None)


def grad_samples(x: torch.Tensor, g: torch.Tensor, with_bias: bool) -> list[torch.Tensor]:
    """The per-sample gradients materialised (``[B, k, d]`` and ``[B, k]``): only for a ``before_step`` hook."""
    rows = [torch.einsum("bk,bd->bkd", g, x)]
    return [*rows, g.clone()] if with_bias else rows


def clipped_sums_of_samples(samples: list[torch.Tensor], max_grad_norm: float) -> list[torch.Tensor]:
    """Opacus' clip-and-sum over materialised per-sample gradients (what a hook may have changed)."""
    if samples[0].shape[0] == 0:
        return [s.new_zeros(s.shape[1:]) for s in samples]
    norms = torch.stack([s.reshape(len(s), -1).norm(2, dim=-1) for s in samples], dim=1).norm(2, dim=1)
    factors = clip_factors(norms, max_grad_norm)
    return [torch.einsum("i,i...", factors, s) for s in samples]


def install_noised_grads(
    params: list[nn.Parameter],
    summed: dict[int, torch.Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    randomness: Randomness,
) -> None:
    """``p.grad`` = (clipped sum + noise) / expected batch size, Opacus 1.6's ``add_noise`` and ``scale_grad``:
    one Gaussian draw of std ``noise_multiplier x max_grad_norm`` per parameter, in ``params``' order (the
    optimiser's, as ``DPOptimizer.params``), from the site's randomness. ``summed`` maps ``id(p)`` to its clipped
    sum. The one place the closed-form and book-keeping steps add their noise."""
    std = noise_multiplier * max_grad_norm
    for p in params:
        ref = summed[id(p)].to(p.dtype)
        if std != 0:
            ref = ref + randomness.gaussian(tuple(ref.shape), std, device=ref.device, dtype=ref.dtype)
        p.grad = (ref / expected_batch_size).view_as(p)


class LinearDPStep:
    """One DP-SGD step of a linear layer: sets ``p.grad`` of its trainable parameters; the caller's optimiser steps.

    ``params`` is the noise order (the optimiser's, as Opacus' ``DPOptimizer.params``); ``expected_batch_size`` is
    Opacus' ``int(n / steps_per_epoch)``. The loss is cross-entropy (``train_local``'s). ``before_step(params)`` (optional) sees the per-sample gradients
    materialised in ``p.grad_sample`` before clipping, as with Opacus' hooks, and may change them.
    """

    def __init__(
        self,
        module: nn.Linear,
        params: list[nn.Parameter],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        randomness: Randomness,
    ) -> None:
        if not applies_to(module):
            raise ValueError("the closed-form DP step needs a bare nn.Linear with a trainable weight")
        self.module = module
        self.with_bias = trainable_bias(module)
        wanted = [module.weight] + ([module.bias] if self.with_bias else [])
        if {id(p) for p in params} != {id(p) for p in wanted if p is not None}:
            raise ValueError("the optimiser's parameters are not the linear layer's trainable ones")
        self.params = params
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.randomness = randomness

    def output_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's mean cross-entropy and ``G``: row i is ``dl_i/dz_i = softmax(z_i) - onehot(y_i)`` (what
        Opacus' ``loss_reduction="mean"`` per-sample gradients are: the mean loss's gradient times B)."""
        with torch.no_grad():
            logp = torch.log_softmax(nn.functional.linear(x, self.module.weight, self.module.bias), dim=1)
            if y.numel() == 0:
                return logp.new_zeros(()), logp
            loss = nn.functional.nll_loss(logp, y)
            g = logp.exp_()
            g[torch.arange(y.shape[0]), y] -= 1.0
        return loss, g

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        scales: torch.Tensor | None = None,
        before_step: Callable[[list[nn.Parameter]], None] | None = None,
    ) -> torch.Tensor:
        """Clip, sum, noise and scale one batch's gradient into ``p.grad``; returns the batch's mean loss.

        ``scales``: the rows' :func:`input_scales`, if the caller computed them once for all records."""
        loss, g = self.output_grads(x, y)
        weight, bias = self.module.weight, self.module.bias
        with torch.no_grad():
            if before_step is None:
                if scales is None:
                    scales = input_scales(x, self.with_bias)
                factors = clip_factors(g.norm(dim=1) * scales, self.max_grad_norm)
                gw, gb = clipped_sums(x, g, factors, self.with_bias)
                summed = {id(weight): gw} | ({id(bias): gb} if gb is not None else {})
            else:
                summed = self._hooked_sums(x, g, before_step)
            install_noised_grads(
                self.params,
                summed,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=self.expected_batch_size,
                randomness=self.randomness,
            )
        return loss

    def _hooked_sums(
        self, x: torch.Tensor, g: torch.Tensor, before_step: Callable[[list[nn.Parameter]], None]
    ) -> dict[int, torch.Tensor]:
        """The per-sample gradients materialised for a ``before_step`` hook, then clipped as Opacus clips them."""
        own = [self.module.weight] + ([self.module.bias] if self.with_bias else [])
        for p, s in zip(own, grad_samples(x, g, self.with_bias), strict=True):
            p.grad_sample = s  # type: ignore[attr-defined]  # Opacus' attribute name, for the hook
        before_step(self.params)
        sums = clipped_sums_of_samples([p.grad_sample for p in self.params], self.max_grad_norm)  # type: ignore[attr-defined]
        for p in self.params:
            del p.grad_sample  # type: ignore[attr-defined]
        return {id(p): s for p, s in zip(self.params, sums, strict=True)}
