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


def weighted_mean(values: list[tuple[float, float]]) -> float:
    """Weighted mean of (value, weight) pairs; NaN when there is no weight."""
    total = sum(w for _, w in values)
    if total <= 0:
        return float("nan")
    return float(sum(v * w for v, w in values) / total)
