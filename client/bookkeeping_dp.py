"""DP-SGD for models of Linear and Conv2d layers in one forward and one backward pass, without Opacus ("book-keeping").

The generalisation of :mod:`privatune.client.linear_dp` to a stack of layers (Bu et al. 2023, "Differentially
private optimization on large model at small cost": book-keeping with the mixed ghost norm). Forward hooks keep each
trained layer's input ``a`` and output ``z``; ``torch.autograd.grad(sum of losses, outputs)`` gives every layer's
output gradient ``G`` (``dl_i/dz_i``, one backward pass that computes no weight gradient); from ``(a, G)``:

- ``nn.Linear`` on ``[B, d]``: per-sample weight gradient ``g_i a_i^T``, squared norm ``||g_i||^2 ||a_i||^2``, bias
  part ``||g_i||^2``; clipped sum ``(c * G)^T A``;
- ``nn.Conv2d``: ``A_i = unfold(a_i)`` ``[K, T]``, ``G_i`` ``[C_out, T]``; the per-sample weight gradient is
  ``G_i A_i^T``; its squared norm either from it materialised (``C_out K`` floats per sample; one grouped
  convolution backward or unfold + batched matmul) or by the ghost Gram trick ``sum((A_i^T A_i) * (G_i^T G_i))``
  (``T^2 (K + C_out)`` per sample) where its ``T x T`` matrices are smaller than the gradient (:func:`_use_gram`,
  Bu et al.'s mixed ghost norm); bias part
  ``||sum_t G_i[:, t]||^2``; clipped sum ``sum_i c_i G_i A_i^T`` (from the materialised ones, or one matmul).

Clip factors are Opacus' ``min(1, C / (norm_i + 1e-6))`` over all layers' parts (flat clipping, one norm per record);
the noise is :class:`~privatune.client.linear_dp.LinearDPStep`'s: one draw per trainable parameter in the optimiser's
order from the site's randomness, std ``noise_multiplier x C``, all divided by Opacus' expected batch size. So it is
the same mechanism as the Opacus path, computed differently; tests/test_bookkeeping_dp.py checks the step against
Opacus' DPOptimizer.

What can be checked before training is checked by :func:`applies_to` (static) and :func:`probe` (one forward on
a few records, its graph walked, nothing released: each trained layer called once, on a 2-D (Linear) or 4-D
(Conv2d) input, no trained weight reaching the loss other than through its layer's output, no in-place change of a
kept tensor), so a refusal can fall back to Opacus. Each step checks all of it again and raises
:class:`BookkeepingRefusal` before any gradient is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

from privatune.client.linear_dp import clip_factors, clipped_sums_of_samples, install_noised_grads
from privatune.client.randomness import Randomness

GRAD_SAMPLE_BOOKKEEPING = "bookkeeping"  # train_local's grad_sample_mode for this path

Layer = nn.Linear | nn.Conv2d


class BookkeepingRefusal(RuntimeError):
    """The model does something the book-keeping norms do not cover (found before any gradient is set)."""


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def refusal(module: nn.Module) -> str | None:
    """Why the book-keeping path cannot train ``module`` (what a static look can tell), or None where it may."""
    owners: dict[int, str] = {}
    trained = 0
    for name, sub in module.named_modules():
        label = name or "<root>"
        own = list(sub.parameters(recurse=False))
        for p in own:
            if id(p) in owners and p.requires_grad:
                return f"the trainable weight of {label} is tied to {owners[id(p)]}"
            owners[id(p)] = label
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) or list(sub.buffers(recurse=False)):
            return f"{label} ({type(sub).__name__}) holds buffers (batch statistics mix records)"
        if not own:
            continue
        if type(sub) not in (nn.Linear, nn.Conv2d):
            if any(p.requires_grad for p in own):
                return f"{label} ({type(sub).__name__}) trains a weight but is not an nn.Linear or nn.Conv2d"
            return f"{label} ({type(sub).__name__}) holds parameters but is not an nn.Linear or nn.Conv2d"
        conv = isinstance(sub, nn.Conv2d) and _trainable(sub)
        if conv and (sub.groups != 1 or sub.padding_mode != "zeros" or isinstance(sub.padding, str)):
            return f"{label}: Conv2d with groups={sub.groups}, padding={sub.padding!r}, mode {sub.padding_mode}"
        trained += bool(_trainable(sub))
    return None if trained else "no trainable nn.Linear or nn.Conv2d"


def applies_to(module: nn.Module) -> bool:
    """True where every trainable parameter belongs to an ``nn.Linear`` or ``nn.Conv2d`` (groups 1, zero padding) and
    every other module is parameter-free or a frozen Linear/Conv2d, without buffers. Calls and input shapes are
    only known when it runs: :func:`probe` and each step check them."""
    return refusal(module) is None


def trained_layers(module: nn.Module) -> list[Layer]:
    return [sub for sub in module.modules() if isinstance(sub, (nn.Linear, nn.Conv2d)) and _trainable(sub)]


def _unfold(layer: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """``[B, C_in kh kw, T]``: the patches the convolution multiplies (``T`` output positions)."""
    padding = layer.padding
    assert not isinstance(padding, str)  # refusal(): "same"/"valid" given as words are not unfolded here
    return nn.functional.unfold(a, layer.kernel_size, layer.dilation, padding, layer.stride)


#: At least this many output positions: per-sample weight gradients by one grouped convolution backward (groups =
#: batch), fewer: by unfold + batched matmul. Measured on the digits CNN (torch 2.13, CPU, one thread): the grouped
#: backward is 1.6x faster on its 14x14 maps (the DP epoch 1.43x -> 1.33x the non-DP one) and 3x slower on 7x7
#: maps. Both give the same numbers to float rounding.
GROUPED_MIN_POSITIONS = 100


def _use_gram(layer: nn.Conv2d, positions: int) -> bool:
    """Bu et al.'s mixed ghost norm (2022): the Gram trick where ``2 T^2 < C_out K``, i.e. where its two ``T x T``
    matrices per sample are smaller than the per-sample gradient. On the digits CNN that is its third convolution
    (7x7 maps, 128 x 576 weights); materialising that one instead made the whole DP epoch about 1.3x slower
    (memory traffic of B x 73,728 floats), while its first two (28x28, 14x14 maps) are faster materialised."""
    k = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return 2 * positions * positions < layer.out_channels * k


def _conv_samples(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, unfolded: torch.Tensor | None) -> torch.Tensor:
    """The per-sample weight gradients ``G_i A_i^T`` as ``[B, C_out, K]`` (``K`` in the weight's own order)."""
    b = a.shape[0]
    gm = g.reshape(b, layer.out_channels, -1)
    if unfolded is None and gm.shape[2] >= GROUPED_MIN_POSITIONS:
        padding = layer.padding
        assert not isinstance(padding, str)  # refusal()
        grouped = conv2d_weight(
            a.reshape(1, b * layer.in_channels, *a.shape[2:]),
            (b * layer.out_channels, layer.in_channels, *layer.kernel_size),
            g.reshape(1, b * layer.out_channels, *g.shape[2:]),
            layer.stride,
            padding,
            layer.dilation,
            groups=b,
        )
        return grouped.view(b, layer.out_channels, -1)
    am = unfolded if unfolded is not None else _unfold(layer, a)
    return torch.bmm(gm, am.transpose(1, 2))


class _Capture:
    """Forward hooks keeping each trained layer's input and output for one forward pass, with checks."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = list(layers)
        self.kept: dict[int, list[tuple[torch.Tensor, torch.Tensor, int, int]]] = {}
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def _hook(self, layer: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        a = args[0]
        self.kept.setdefault(id(layer), []).append((a, out, a._version, out._version))

    def start(self) -> None:
        self.kept = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def checked(self) -> list[tuple[Layer, torch.Tensor, torch.Tensor]]:
        """(layer, input, output) per trained layer, or :class:`BookkeepingRefusal` naming what breaks the norms."""
        rows = []
        for layer in self.layers:
            calls = self.kept.get(id(layer), [])
            kind = type(layer).__name__
            if len(calls) != 1:
                raise BookkeepingRefusal(f"a trained {kind} ran {len(calls)} times in one forward pass (need once)")
            a, out, va, vo = calls[0]
            want = 2 if isinstance(layer, nn.Linear) else 4
            if a.dim() != want:
                raise BookkeepingRefusal(f"a trained {kind} got a {a.dim()}-D input (the norms need {want}-D)")
            if a._version != va or out._version != vo:
                raise BookkeepingRefusal(f"a trained {kind}'s input or output was changed in place (inplace=True?)")
            if not out.requires_grad:
                raise BookkeepingRefusal(f"a trained {kind}'s output needs no gradient")
            rows.append((layer, a.detach(), out))
        return rows


def _only_through_outputs(loss: torch.Tensor, outputs: Sequence[torch.Tensor], params: Sequence[nn.Parameter]) -> bool:
    """True when no trained parameter reaches ``loss`` other than through ``outputs`` (a walk of the graph)."""
    stop = {o.grad_fn for o in outputs}
    leaves = {id(p) for p in params}
    seen: set[Any] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in leaves:
            return False
        todo.extend(nxt for nxt, _ in node.next_functions)
    return True


def probe(module: nn.Module, inputs: Sequence[torch.Tensor], labels: torch.Tensor) -> str | None:
    """Why the book-keeping path cannot train ``module`` on records like ``inputs`` (a forward on them, global RNG
    restored, no gradient set), or None where it can. Run before training so a refusal falls back to Opacus."""
    why = refusal(module)
    if why is not None:
        return why
    layers = trained_layers(module)
    capture = _Capture(layers)
    try:
        cuda = [t.device.index or 0 for t in inputs[:1] if t.is_cuda]  # dropout's generator there
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            capture.start()
            out = module(*inputs)
            if out.dim() != 2:
                return f"the model's output is {out.dim()}-D (cross-entropy on [B, classes] logits needed)"
            rows = capture.checked()
            loss = nn.functional.cross_entropy(out, labels, reduction="sum")
            params = [p for layer in layers for p in _trainable(layer)]
            if not _only_through_outputs(loss, [z for _, _, z in rows], params):
                return "a trained weight reaches the loss other than through its layer's output"
    except BookkeepingRefusal as e:
        return str(e)
    finally:
        capture.remove()
    return None


def _layer_norms(
    layer: Layer, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-sample squared norms of the layer's trainable part ``[B]``; for a Conv2d also its materialised weight
    gradients when they were the cheaper way (else None) and its unfolded input (kept for the sums)."""
    weight_on, bias_on = layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad
    b = g.shape[0]
    sq = g.new_zeros(b)
    if isinstance(layer, nn.Linear):
        gg = g.pow(2).sum(1)
        if weight_on:
            sq = sq + gg * a.pow(2).sum(1)
        return (sq + gg if bias_on else sq), None, None
    gm = g.reshape(b, layer.out_channels, -1)
    samples = am = None
    if weight_on:
        if _use_gram(layer, gm.shape[2]):
            am = _unfold(layer, a)
            sq = sq + (torch.bmm(am.transpose(1, 2), am) * torch.bmm(gm.transpose(1, 2), gm)).sum((1, 2))
        else:
            samples = _conv_samples(layer, a, g, None)  # [B, C_out, K]
            sq = sq + samples.pow(2).sum((1, 2))
    if bias_on:
        sq = sq + gm.sum(2).pow(2).sum(1)
    return sq, samples, am


def _layer_sums(
    layer: Layer,
    a: torch.Tensor,
    g: torch.Tensor,
    c: torch.Tensor,
    samples: torch.Tensor | None,
    unfolded: torch.Tensor | None,
) -> dict[int, torch.Tensor]:
    """The clipped sums ``sum_i c_i grad_i`` of the layer's trainable parameters, by id, in their shapes."""
    sums: dict[int, torch.Tensor] = {}
    b = g.shape[0]
    if isinstance(layer, nn.Linear):
        cg = g * c.unsqueeze(1)
        if layer.weight.requires_grad:
            sums[id(layer.weight)] = cg.t() @ a
        if layer.bias is not None and layer.bias.requires_grad:
            sums[id(layer.bias)] = cg.sum(0)
        return sums
    gm = g.reshape(b, layer.out_channels, -1)
    if layer.weight.requires_grad:
        if samples is not None:
            w = torch.einsum("b,bok->ok", c, samples)
        else:
            am = unfolded if unfolded is not None else _unfold(layer, a)  # [B, K, T]
            cg = (gm * c.view(b, 1, 1)).transpose(0, 1).reshape(layer.out_channels, -1)  # [C_out, B T]
            w = cg @ am.transpose(1, 2).reshape(-1, am.shape[1])  # [B T, K] -> [C_out, K]
        sums[id(layer.weight)] = w.view_as(layer.weight)
    if layer.bias is not None and layer.bias.requires_grad:
        sums[id(layer.bias)] = torch.einsum("b,bo->o", c, gm.sum(2))
    return sums


def _layer_samples(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> dict[int, torch.Tensor]:
    """The per-sample gradients materialised ``[B, *shape]`` (only for a ``before_step`` hook)."""
    out: dict[int, torch.Tensor] = {}
    b = g.shape[0]
    if isinstance(layer, nn.Linear):
        if layer.weight.requires_grad:
            out[id(layer.weight)] = torch.einsum("bk,bd->bkd", g, a)
        if layer.bias is not None and layer.bias.requires_grad:
            out[id(layer.bias)] = g.clone()
        return out
    gm = g.reshape(b, layer.out_channels, -1)
    if layer.weight.requires_grad:
        out[id(layer.weight)] = _conv_samples(layer, a, g, None).view(b, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[id(layer.bias)] = gm.sum(2)
    return out


class BookkeepingDPStep:
    """One DP-SGD step of ``module``: sets ``p.grad`` of its trainable parameters; the caller's optimiser steps.

    ``params`` is the noise order (the optimiser's, as Opacus' ``DPOptimizer.params``); ``expected_batch_size`` is
    Opacus' ``int(n / steps_per_epoch)``. The loss is cross-entropy, mean over the batch (``train_local``'s);
    per-sample gradients are those of each record's own loss (Opacus' ``loss_reduction="mean"`` multiplies the
    mean loss's back by B), so the backward runs on the sum. ``before_step(params)`` (optional) sees the per-sample
    gradients in ``p.grad_sample`` before clipping, as with Opacus' hooks, and may change them.
    Call :meth:`close` when training ends (removes the forward hooks).
    """

    def __init__(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        randomness: Randomness,
    ) -> None:
        why = refusal(module)
        if why is not None:
            raise ValueError(f"the book-keeping DP step cannot train this module: {why}")
        self.module = module
        self.layers = trained_layers(module)
        wanted = {id(p) for layer in self.layers for p in _trainable(layer)}
        if {id(p) for p in params} != wanted or len(params) != len(wanted):
            raise ValueError("the optimiser's parameters are not the module's trainable Linear/Conv2d ones")
        self.params = params
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.randomness = randomness
        self._capture = _Capture(self.layers)

    def close(self) -> None:
        self._capture.remove()

    def __call__(
        self,
        inputs: Sequence[torch.Tensor],
        y: torch.Tensor,
        before_step: Callable[[list[nn.Parameter]], None] | None = None,
    ) -> torch.Tensor:
        """Clip, sum, noise and scale one batch's gradient into ``p.grad``; returns the batch's mean loss.

        An empty (Poisson) batch runs no forward: its sums are zero, the step is the noise alone."""
        if y.numel() == 0:
            loss = torch.zeros(())
            summed = {id(p): torch.zeros_like(p) for p in self.params}
            if before_step is not None:
                summed = self._hooked({id(p): p.new_zeros((0, *p.shape)) for p in self.params}, before_step)
        else:
            self._capture.start()
            out = self.module(*inputs)
            rows = self._capture.checked()
            self._capture.start()  # drop the references: the graph holds what backward needs
            total = nn.functional.cross_entropy(out, y, reduction="sum")
            outs = [z for _, _, z in rows]
            if not _only_through_outputs(total, outs, self.params):
                raise BookkeepingRefusal("a trained weight reaches the loss other than through its layer's output")
            # allow_unused: a trained layer whose output the loss ignores has zero per-sample gradients
            grads = [
                torch.zeros_like(z) if g is None else g
                for z, g in zip(outs, torch.autograd.grad(total, outs, allow_unused=True), strict=True)
            ]
            loss = total.detach() / y.shape[0]
            with torch.no_grad():
                summed = self._sums(rows, grads, before_step)
        with torch.no_grad():
            install_noised_grads(
                self.params,
                summed,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=self.expected_batch_size,
                randomness=self.randomness,
            )
        return loss

    def _sums(
        self,
        rows: list[tuple[Layer, torch.Tensor, torch.Tensor]],
        grads: Sequence[torch.Tensor],
        before_step: Callable[[list[nn.Parameter]], None] | None,
    ) -> dict[int, torch.Tensor]:
        if before_step is not None:
            samples: dict[int, torch.Tensor] = {}
            for (layer, a, _), g in zip(rows, grads, strict=True):
                samples |= _layer_samples(layer, a, g)
            return self._hooked(samples, before_step)
        norms = [_layer_norms(layer, a, g) for (layer, a, _), g in zip(rows, grads, strict=True)]
        total_sq = torch.stack([sq for sq, _, _ in norms]).sum(0)
        c = clip_factors(total_sq.sqrt(), self.max_grad_norm)
        summed: dict[int, torch.Tensor] = {}
        for (layer, a, _), g, (_, materialised, unfolded) in zip(rows, grads, norms, strict=True):
            summed |= _layer_sums(layer, a, g, c, materialised, unfolded)
        return summed

    def _hooked(
        self, samples: dict[int, torch.Tensor], before_step: Callable[[list[nn.Parameter]], None]
    ) -> dict[int, torch.Tensor]:
        """The per-sample gradients in ``p.grad_sample`` for the hook, then clipped as Opacus clips them."""
        for p in self.params:
            p.grad_sample = samples[id(p)]  # type: ignore[attr-defined]  # Opacus' attribute name, for the hook
        before_step(self.params)
        sums = clipped_sums_of_samples([p.grad_sample for p in self.params], self.max_grad_norm)  # type: ignore[attr-defined]
        for p in self.params:
            del p.grad_sample  # type: ignore[attr-defined]
        return {id(p): s for p, s in zip(self.params, sums, strict=True)}
