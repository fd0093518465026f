"""Training options under DP that leave the mechanism alone: the optimiser, physical batches, ghost clipping.

Used by :func:`privatune.client.training.train_local`; each one changes how a step is computed, never which
records a step samples, how many steps run, the clipping bound or the noise (so never epsilon):

- :func:`build_optimizer`: ``sgd`` (momentum as given) or ``adam`` (torch's Adam with the fixed betas of
  :mod:`privatune.common.optimizers`); under DP Opacus' ``DPOptimizer`` wraps either (DP-SGD, DP-Adam);
- :func:`physical_batches`: each logical batch in chunks of at most ``max_physical_batch_size`` records. Under DP
  this is Opacus' ``BatchMemoryManager`` over the site's own Poisson sampler: the clipped per-record gradients of
  the chunks are summed and noised once, at the logical batch's end, so the step count, the sampling rate and
  the noise are those of the unsplit loop; without DP it is plain gradient accumulation (the loss of a chunk
  weighted by its share of the batch);
- :func:`ghost_clipping_refusal`: why Opacus' fast gradient ("ghost") clipping cannot run a module, or None.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from privatune.common.optimizers import ADAM_BETAS, ADAM_EPS, OPTIMIZER_ADAM, OPTIMIZER_SGD, check_optimizer

log = logging.getLogger(__name__)

GRAD_SAMPLE_HOOKS = "hooks"  # Opacus' standard per-sample gradients (every p.grad_sample materialised)
GRAD_SAMPLE_GHOST = "ghost"  # Opacus' fast gradient clipping: per-sample norms, two backward passes


def build_optimizer(
    name: str, groups: list[dict[str, Any]], *, lr: float, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """The run's optimiser over ``groups`` (their own learning rates), before Opacus wraps it."""
    check_optimizer(name)
    if name == OPTIMIZER_SGD:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    assert name == OPTIMIZER_ADAM
    if momentum:
        raise ValueError("momentum is an SGD setting; Adam's moments are fixed (common.optimizers.ADAM_BETAS)")
    return torch.optim.Adam(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def ghost_clipping_refusal(module: nn.Module) -> str | None:
    """Why Opacus 1.6's ghost clipping cannot train ``module``, or None where it can.

    Opacus refuses parameter tying (one trainable weight in two layers) only when the forward pass reaches the
    second layer, after training began; this finds it before. Layers without a ghost norm sampler (Opacus 1.6
    has them for Linear and Embedding) but with a grad sampler (Conv, LayerNorm, GroupNorm, ...) are clipped
    from their own per-sample gradients (its "fast gradient clipping"), which gives the same clipped update; a
    trainable layer with neither (Opacus would fall back to functorch) is refused, named.
    """
    owners: dict[int, str] = {}
    for mod_name, sub in module.named_modules():
        for p_name, p in sub.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            here = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) in owners:
                return f"the trainable weight {owners[id(p)]} is tied to {here} (Opacus' ghost clipping refuses tying)"
            owners[id(p)] = here
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Ghost
    from opacus.utils.module_utils import trainable_modules

    supported = set(Ghost.NORM_SAMPLERS) | set(Ghost.GRAD_SAMPLERS)
    for mod_name, sub in trainable_modules(module):
        if type(sub) not in supported:
            return f"the layer {mod_name or '<root>'} ({type(sub).__name__}) has no Opacus norm or grad sampler"
    return None


def grad_sample_mode(module: nn.Module, ghost_clipping: bool) -> str:
    """``ghost`` where asked for and possible; else ``hooks``, logging why a request for ghost clipping fell back."""
    if not ghost_clipping:
        return GRAD_SAMPLE_HOOKS
    why = ghost_clipping_refusal(module)
    if why is None:
        return GRAD_SAMPLE_GHOST
    log.warning("ghost-clipping=true, but %s: clipping from per-sample gradients instead (same update)", why)
    return GRAD_SAMPLE_HOOKS


@dataclass(frozen=True)
class PhysicalBatch:
    """A chunk of a logical batch; ``steps`` is True for the logical batch's last chunk (the optimiser steps)."""

    inputs: list[torch.Tensor]
    labels: torch.Tensor
    weight: float  # the factor on the chunk's mean loss (1.0 under DP: Opacus does the accounting)
    zero_grad: bool  # zero the gradients before it: the logical batch's first chunk; under DP every chunk (Opacus
    # keeps the clipped sum of the chunks before the last in p.summed_grad, and refuses a second backward pass
    # into the same per-sample gradients)
    steps: bool


def physical_batches(
    loader: Iterable[Any], max_physical_batch_size: int, optimizer: Any, *, dp: bool
) -> Iterator[PhysicalBatch]:
    """The loader's logical batches as physical ones of at most ``max_physical_batch_size`` records (0 = whole).

    Under DP ``loader`` and ``optimizer`` are what Opacus' ``make_private`` returned; Opacus' ``BatchMemoryManager``
    splits the sampler's batches (the Poisson sampler itself is untouched, so it draws exactly what it draws
    unsplit) and tells the ``DPOptimizer`` which chunks end a logical batch; every other ``optimizer.step()`` only
    clips and accumulates. An empty Poisson batch stays one (empty) step.
    """
    if max_physical_batch_size < 0:
        raise ValueError("max_physical_batch_size must be >= 0 (0 = no splitting)")
    if dp:
        if max_physical_batch_size:
            from opacus.utils.batch_memory_manager import BatchMemoryManager

            with BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=max_physical_batch_size, optimizer=optimizer
            ) as split:
                for *xs, y in split:
                    # The splitter signalled this chunk before the loader returned it: peek at the signal.
                    skip = bool(optimizer._check_skip_next_step(pop_next=False))
                    yield PhysicalBatch(list(xs), y, 1.0, True, not skip)
        else:
            for *xs, y in loader:
                yield PhysicalBatch(list(xs), y, 1.0, True, True)
        return
    for *xs, y in loader:
        n = int(y.shape[0])
        size = max_physical_batch_size or max(n, 1)
        starts = list(range(0, n, size)) or [0]
        for i, start in enumerate(starts):
            stop = min(n, start + size)
            yield PhysicalBatch(
                [x[start:stop] for x in xs], y[start:stop], (stop - start) / max(n, 1), i == 0, i == len(starts) - 1
            )
