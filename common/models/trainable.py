"""Which parameters train in each fine-tuning mode, and the trainable state that travels: float32 export and
import, and the fingerprints that prove frozen weights never changed and that both sides agree on what travels.

Separate from the backbones: it works on any Classifier.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from privatune.common.models.classifier import Classifier, unwrap
from privatune.common.models.modes import backbone_is_frozen, check_mode


def configure_trainable(model: Classifier, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode``; return the trainable names in ``named_parameters()`` order."""
    check_mode(mode)
    inner = unwrap(model)
    if not isinstance(inner, Classifier):
        raise TypeError(f"configure_trainable expects a Classifier, got {type(inner).__name__}")
    names: list[str] = []
    for name, param in inner.named_parameters():
        if mode == "full":
            trainable = True
        elif mode == "partial":
            trainable = name.startswith("head.") or any(name.startswith(p) for p in inner.partial_prefixes)
        else:
            trainable = name.startswith("head.")
        param.requires_grad_(trainable)
        if trainable:
            names.append(name)
    return names


def module_to_train(model: Classifier, mode: str) -> nn.Module:
    """What the optimiser (and Opacus) wraps: the head alone in ``head`` mode, else the whole model."""
    return model.head if backbone_is_frozen(mode) else model


def _trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def trainable_names_and_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in _trainable_params(model)]


def trainable_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Float32 copies of the trainable parameters, in ``named_parameters()`` order: what travels."""
    return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in _trainable_params(model)}


def load_trainable_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into the trainable parameters; names and shapes must match exactly."""
    params = dict(_trainable_params(model))
    missing = [n for n in params if n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise ValueError(
            "trainable state does not match the model's trainable parameters "
            f"(was the same model and fine-tuning mode used on both sides?): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    arrays: dict[str, np.ndarray] = {}
    for name, param in params.items():
        arr = np.asarray(state[name])
        if tuple(arr.shape) != tuple(param.shape):
            raise ValueError(f"shape mismatch for {name}: got {list(arr.shape)}, the model has {list(param.shape)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"parameter {name} has dtype {arr.dtype}; expected floating point")
        if not np.isfinite(arr).all():
            raise ValueError(f"parameter {name} contains NaN or infinite values")
        arrays[name] = arr
    with torch.no_grad():  # only after every check passed: never half-load a model
        for name, param in params.items():
            param.copy_(torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)).to(param.device, param.dtype))


def frozen_state_fingerprint(model: nn.Module) -> str:
    """sha256 over the non-trainable parameters (names, shapes, bytes): equal before/after proves no change."""
    digest = hashlib.sha256()
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            continue
        data = param.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def trainable_fingerprint(
    names_and_shapes: Mapping[str, Any] | Iterable[tuple[str, Sequence[int]]],
) -> str:
    """sha256 of the ordered (name, shape) list that travels; a Mapping of arrays is accepted too."""
    if isinstance(names_and_shapes, Mapping):
        items = [(str(n), [int(d) for d in np.shape(v)]) for n, v in names_and_shapes.items()]
    else:
        items = [(str(n), [int(d) for d in shape]) for n, shape in names_and_shapes]
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()
