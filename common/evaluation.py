"""Evaluation of a classifier on labelled tensors: loss, accuracy, macro-F1, per-class figures, confusion.

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
def predict(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[float, np.ndarray]:
    """(summed cross-entropy loss, predicted class per record), in batches."""
    device = torch.device(device)
    module.to(device)
    module.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    preds = []
    for start in range(0, int(labels.shape[0]), batch_size):
        xs = [t[start : start + batch_size].to(device) for t in inputs]
        y = labels[start : start + batch_size].to(device)
        out = module(*xs)
        total_loss += float(loss_fn(out, y))
        preds.append(out.argmax(dim=1).cpu())
    return total_loss, torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


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
    total_loss, pred = predict(module, inputs, labels, batch_size, device)
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


@dataclass(frozen=True)
class ClassFigures:
    label: str
    precision: float
    recall: float
    f1: float
    support: int  # records of this class in the test set


def per_class(true: np.ndarray, pred: np.ndarray, label_names: tuple[str, ...]) -> list[ClassFigures]:
    """Precision, recall, F1 and support of every label (0 where a class is never predicted or present)."""
    from sklearn.metrics import precision_recall_fscore_support

    idx = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(true, pred, labels=idx, zero_division=0)
    return [ClassFigures(name, float(p[i]), float(r[i]), float(f[i]), int(s[i])) for i, name in enumerate(label_names)]


def confusion(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return matrix
