"""FedProx's proximal term at a site, added after DP's clipping and noise (docs/server-optimisers.md).

FedProx (Li et al. 2020) trains each site on ``loss + mu/2 ||w - w_global||^2``: its gradient adds
``mu (w - w_global)`` to the loss gradient. That term depends only on the site's current weights and the global
model the round received (public to every site), not on any record. So under DP it is added to the gradient
*after* Opacus clipped each record's gradient and added the noise: post-processing, which leaves the mechanism
(sampling rate, steps, clipping bound, noise) and so epsilon unchanged. Put in the loss instead, it would enter
every per-record gradient and be clipped with it, which is not FedProx and would waste the clipping budget.

Without DP the same hook is the gradient of the loss term (same thing). The hook runs as a step pre-hook of the
optimiser that updates the weights: under DP Opacus' ``original_optimizer``, whose ``step`` Opacus calls only
after noise (and only at the end of a logical batch, with physical batches).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def add_proximal_term(optimizer: Any, module: nn.Module, mu: float) -> RemovableHandle | None:
    """Add ``mu (w - w_start)`` to every trainable parameter's gradient just before each weight update.

    ``w_start`` is the module's trainable weights now: call it before the first step, when they are the global
    model the round received. ``optimizer`` is the one training steps (a DPOptimizer, or a torch optimiser).
    Returns the hook's handle (remove it when training ends), or None for ``mu == 0`` (nothing is added).
    """
    if mu < 0:
        raise ValueError(f"proximal-mu must be >= 0, got {mu:g}")
    if mu == 0:
        return None
    anchors = {p: p.detach().clone() for p in module.parameters() if p.requires_grad}
    base: torch.optim.Optimizer = getattr(optimizer, "original_optimizer", optimizer)

    def pre_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    anchor = anchors.get(p)
                    if anchor is None or p.grad is None:
                        continue
                    p.grad.add_(p.detach() - anchor, alpha=mu)

    return base.register_step_pre_hook(pre_step)
