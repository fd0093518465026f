"""Local training and evaluation, with or without DP-SGD (Opacus).

Framework-free: tensors in, tensors out. The Flower glue in :mod:`client.app` decides what the
module is (the head alone on cached features, or the whole classifier) and what the privacy
parameters are; this module only runs the loop so it can be tested and benchmarked directly.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.accounting import sample_rate as dp_sample_rate
from common.accounting import steps_per_epoch
from common.evaluation import EvalResult, evaluate  # noqa: F401  (re-exported for the client glue)

# Seeded noise is a documented choice for reproducible simulations (docs/privacy.md); the hook warning
# is Opacus' per-sample-gradient hooks on a module whose inputs need no grad (frozen features).
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class LocalTrainResult:
    """What one local training pass did; the mechanism fields feed the accountant and the ledger."""

    loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float  # 0.0 when DP is off
    seconds: float
    num_examples: int


def param_groups(module: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict]:
    """Transfer learning's 'early layers trained more slowly': the backbone gets a scaled rate."""
    head, body = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (head if name.startswith("head.") or "." not in name else body).append(p)
    groups = [{"params": head, "lr": lr}]
    if body:
        groups.append({"params": body, "lr": lr * backbone_lr_scale})
    return groups


def train_local(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    dp: bool,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int,
    backbone_lr_scale: float = 0.1,
    momentum: float = 0.0,
    device: torch.device | str = "cpu",
) -> LocalTrainResult:
    """Train ``module`` in place for ``epochs`` passes.

    With ``dp`` the loop is Opacus DP-SGD with Poisson sampling: ``sample_rate = 1/ceil(n/B)`` and
    ``ceil(n/B)`` steps per epoch, exactly what :func:`common.accounting.steps_per_epoch` predicts
    and what the ledger records before training starts.
    """
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("no training records")
    device = torch.device(device)
    module.to(device)
    module.train()
    gen = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(*[t.cpu() for t in inputs], labels.cpu())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=not dp, generator=gen)
    optimizer = torch.optim.SGD(param_groups(module, lr, backbone_lr_scale), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    train_module: nn.Module = module
    steps_expected = steps_per_epoch(n, batch_size) * epochs
    q = dp_sample_rate(n, batch_size) if dp else min(1.0, batch_size / n)
    engine = None
    if dp:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        train_module, optimizer, loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_gen,
        )
    start = time.perf_counter()
    total_loss, total_seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for batch in loader:
            *xs, y = batch
            xs = [x.to(device) for x in xs]
            y = y.to(device)
            optimizer.zero_grad(set_to_none=True)
            out = train_module(*xs)
            # Poisson sampling can draw an empty batch: it is still a step of the mechanism
            # (noise only), so it runs through the optimiser like any other.
            loss = loss_fn(out, y) if y.numel() else out.sum() * 0.0
            loss.backward()
            optimizer.step()
            steps += 1
            total_loss += float(loss.detach()) * int(y.numel())
            total_seen += int(y.numel())
    seconds = time.perf_counter() - start
    if dp:
        assert engine is not None
        history = engine.accountant.history
        recorded = sum(s for _, _, s in history)
        if recorded != steps_expected or any(abs(r - q) > 1e-12 for _, r, _ in history):
            raise RuntimeError(
                f"Opacus accounted {history}, but the ledger recorded ({noise_multiplier}, {q}, "
                f"{steps_expected}) before training: refusing to release an update whose privacy "
                "cost differs from its record"
            )
        if hasattr(train_module, "remove_hooks"):
            train_module.remove_hooks()  # the module may be trained again in this process
        _strip_opacus(module)
    return LocalTrainResult(
        loss=total_loss / max(total_seen, 1),
        steps=steps,
        sample_rate=q,
        noise_multiplier=noise_multiplier if dp else 0.0,
        seconds=seconds,
        num_examples=n,
    )


def _strip_opacus(module: nn.Module) -> None:
    """Drop per-sample gradient buffers Opacus leaves on parameters."""
    for p in module.parameters():
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
