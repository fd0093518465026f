"""Which parameters train in each fine-tuning mode (head, last-k, lora, full), and the trainable state that
travels: float32 export and import, and the fingerprints that prove frozen weights never changed and that both
sides agree on what travels.

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
from privatune.common.models.lora import apply_lora, is_lora_a, is_lora_param
from privatune.common.models.modes import FineTuning, as_fine_tuning, backbone_is_frozen


def configure_trainable(model: Classifier, mode: str | FineTuning) -> list[str]:
    """Set ``requires_grad`` for ``mode``; return the trainable names in ``named_parameters()`` order.

    ``mode`` is a run's :class:`FineTuning` (``RunConfig.fine_tuning``) or a bare mode name (default settings,
    seed 0). ``lora`` first puts adapters on the backbone (once; see :mod:`privatune.common.models.lora`).
    """
    settings = as_fine_tuning(mode)
    inner = unwrap(model)
    if not isinstance(inner, Classifier):
        raise TypeError(f"configure_trainable expects a Classifier, got {type(inner).__name__}")
    prefixes: tuple[str, ...] = ()
    if settings.mode == "last-k":
        blocks = inner.block_prefixes
        if settings.last_k > len(blocks):
            raise ValueError(
                f"last-k={settings.last_k}, but this model has {len(blocks)} block(s) "
                f"({', '.join(b.removesuffix('.') for b in blocks) or 'none named'}); "
                f"use last-k between 1 and {len(blocks)}, or mode=full"
            )
        prefixes = blocks[len(blocks) - settings.last_k :]
    elif settings.mode == "lora":
        apply_lora(inner, settings)
    names: list[str] = []
    for name, param in inner.named_parameters():
        if settings.mode == "full" or name.startswith("head."):
            trainable = True
        elif settings.mode == "last-k":
            trainable = any(name.startswith(p) for p in prefixes)
        elif settings.mode == "lora":
            trainable = is_lora_param(name) and not (settings.lora_freeze_a and is_lora_a(name))
        else:
            trainable = False
        param.requires_grad_(trainable)
        if trainable:
            names.append(name)
    return names


def module_to_train(model: Classifier, mode: str | FineTuning) -> nn.Module:
    """What the optimiser (and Opacus) wraps: the head alone in ``head`` mode, else the whole model."""
    return model.head if backbone_is_frozen(mode) else model


def _trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def trainable_names_and_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in _trainable_params(model)]


def trainable_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Float32 copies of the trainable parameters, in ``named_parameters()`` order: what travels."""
    return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in _trainable_params(model)}


HEAD_PREFIX = "head."


def is_head_param(name: str) -> bool:
    return name.startswith(HEAD_PREFIX)


def shared_state(state: Mapping[str, np.ndarray], personal_head: bool) -> dict[str, np.ndarray]:
    """What of a trainable state travels: all of it, or with ``personal-head`` (issue 15, docs/personalisation.md)
    everything but the head, which stays at its site."""
    return {k: v for k, v in state.items() if not (personal_head and is_head_param(k))}


def load_trainable_state(model: nn.Module, state: Mapping[str, np.ndarray], *, keep_head: bool = False) -> None:
    """Copy ``state`` into the trainable parameters; names and shapes must match exactly. ``keep_head``: ``state``
    is a shared (personal-head) state: the head is not in it and keeps the weights it has."""
    params = {n: p for n, p in _trainable_params(model) if not (keep_head and is_head_param(n))}
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
