"""Backbone features, computed once per (model, data) and reused across rounds.

In `head` mode nothing changes the backbone, so its output for a client's records is the same in
every round: computing it once turns a MiniLM forward pass per step into a matrix product. The cache
is in-process (simulation actors live across rounds) and on disk (a deployed ClientApp runs in a
fresh process per message), keyed by the model, the tokenised length and the data's fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from privatune.common.datasets import LabelledData
from privatune.common.models import Classifier, compute_features, get_model_spec

_MEMORY: dict[str, torch.Tensor] = {}


def encode(model_name: str, data: LabelledData, max_length: int | None) -> tuple[torch.Tensor, ...]:
    """Raw records to the tensors the classifier takes."""
    spec = get_model_spec(model_name)
    return spec.encode(data.inputs, max_length=max_length)


def features_key(model_name: str, data: LabelledData, max_length: int | None) -> str:
    h = hashlib.sha256(f"{model_name}|{max_length}|{data.fingerprint()}".encode()).hexdigest()
    return h[:32]


def cached_features(
    model: Classifier,
    model_name: str,
    data: LabelledData,
    max_length: int | None,
    cache_dir: str | Path | None,
) -> torch.Tensor:
    """Features of ``data`` under the (frozen) backbone of ``model``; memoised and cached on disk."""
    key = features_key(model_name, data, max_length)
    if key in _MEMORY:
        return _MEMORY[key]
    path = Path(cache_dir) / f"features-{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        feats = torch.from_numpy(np.load(path))
    else:
        feats = compute_features(model, encode(model_name, data, max_length))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a crash mid-write never leaves a truncated cache behind.
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, feats.numpy())
            os.replace(tmp, path)
    _MEMORY[key] = feats
    return feats
