"""Pure checks and aggregation of plaintext client updates (no Flower types).

FedAvg itself is Flower's (``aggregate_arrayrecords``); what lives here is what a server must do
before trusting an update: the right parameters, the right shapes, finite values.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


class UpdateRejected(ValueError):
    """An update the server will not aggregate; the message is the logged reason."""


def check_plain_update(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse missing, extra, mis-shaped or non-finite parameters."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"parameter names differ from the trainable set: missing {missing[:3]}, extra {extra[:3]}")
    for name, shape in expected.items():
        arr = state[name]
        if tuple(arr.shape) != tuple(shape):
            raise UpdateRejected(f"parameter {name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise UpdateRejected(f"parameter {name} holds non-finite values")


def equal_mean(states: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """FedAvg with equal weights (run-config weighting="equal": no site sends its example count)."""
    if not states:
        raise ValueError("no states to average")
    out = {k: np.array(v, dtype=np.float64) for k, v in states[0].items()}
    for s in states[1:]:
        for k in out:
            out[k] += s[k]
    return {k: (v / len(states)).astype(np.asarray(states[0][k]).dtype) for k, v in out.items()}


def pool_noised_eval(sums: list[tuple[float, float, float]]) -> dict[str, float] | None:
    """Federated accuracy and loss from the sites' noised (correct, clipped loss sum, count) sums.

    Ratios of sums pooled over sites (post-processing of DP releases: no further cost); clamped to their
    ranges because noise can push a ratio outside them. None when the pooled count is not positive.
    """
    correct = sum(c for c, _, _ in sums)
    loss = sum(l for _, l, _ in sums)
    count = sum(n for _, _, n in sums)
    if not sums or not count > 0:
        return None
    return {
        "eval-accuracy": float(min(1.0, max(0.0, correct / count))),
        "eval-loss": float(max(0.0, loss / count)),
        "eval-count-noised": float(count),
    }
