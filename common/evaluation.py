"""Evaluation of a classifier on labelled tensors: loss, accuracy, macro-F1.

Shared by the sites (federated evaluation), the server (central evaluation in simulation) and the
benchmarks, so every figure in a report is computed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    macro_f1: float
    num_examples: int


@torch.no_grad()
def evaluate(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Loss, accuracy and macro-F1 (imbalanced sets such as SMS spam need F1, not accuracy alone)."""
    n = int(labels.shape[0])
    if n == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), macro_f1=float("nan"), num_examples=0)
    device = torch.device(device)
    module.to(device)
    module.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    preds = []
    for start in range(0, n, batch_size):
        xs = [t[start : start + batch_size].to(device) for t in inputs]
        y = labels[start : start + batch_size].to(device)
        out = module(*xs)
        total_loss += float(loss_fn(out, y))
        preds.append(out.argmax(dim=1).cpu())
    pred = torch.cat(preds).numpy()
    true = labels.cpu().numpy()
    return EvalResult(
        loss=total_loss / n,
        accuracy=float((pred == true).mean()),
        macro_f1=macro_f1(true, pred, num_classes),
        num_examples=n,
    )


def macro_f1(true: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``true`` or ``pred``."""
    from sklearn.metrics import f1_score

    present = sorted(set(true.tolist()) | set(pred.tolist()))
    return float(f1_score(true, pred, labels=present, average="macro", zero_division=0))
