"""The model registry (``MODELS``, ``register_model``, ``get_model_spec``) and the per-process cache of
pretrained weights. Separate so a new model only registers itself, and the built-ins are not special.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from privatune.common.models.classifier import Classifier


class Encoder(Protocol):
    """Raw inputs -> the tensors ``Classifier.forward`` takes. ``max_length`` only matters for text."""

    def __call__(
        self, inputs: Sequence[str] | np.ndarray, *, max_length: int | None = None
    ) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of privatune needs to know about one model."""

    name: str
    kind: Literal["text", "image"]
    feature_dim: int
    description: str
    build: Callable[[int, int], Classifier]  # (num_classes, seed) -> Classifier, head init seeded
    encode: Encoder
    default_max_length: int | None = None  # text models: tokenised length when none is given


MODELS: dict[str, ModelSpec] = {}
_LOADERS: dict[str, Callable[[], PretrainedAssets]] = {}


def register_model(
    spec: ModelSpec,
    loader: Callable[[], PretrainedAssets] | None = None,
    *,
    replace: bool = False,
) -> None:
    """Add a model. ``loader`` (optional) reads its pretrained weights; it is memoised per process."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model expects a ModelSpec, got {type(spec).__name__}")
    if spec.kind not in ("text", "image"):
        raise ValueError(f"model {spec.name!r}: kind must be 'text' or 'image', got {spec.kind!r}")
    if spec.name in MODELS and not replace:
        raise ValueError(f"model {spec.name!r} is already registered; pass replace=True to override")
    MODELS[spec.name] = spec
    if loader is not None:
        _LOADERS[spec.name] = loader
        with _CACHE_LOCK:
            _CACHE.pop(spec.name, None)


def register_loader(name: str, loader: Callable[[], PretrainedAssets]) -> None:
    """Set the loader of a model whose spec needs its weights to be built (a ``torch:`` backbone's feature size)."""
    with _CACHE_LOCK:
        _LOADERS[name] = loader
        _CACHE.pop(name, None)


_RESOLVE_LOCK = threading.RLock()


def get_model_spec(name: str) -> ModelSpec:
    """A registered model, or an ``hf:FOLDER`` / ``torch:module:function`` name, registered on first use."""
    spec = MODELS.get(name)
    if spec is not None:
        return spec
    from privatune.common.models.names import model_source

    if model_source(name) != "preset":
        from privatune.common.models.own import register_own_model

        with _RESOLVE_LOCK:
            return MODELS.get(name) or register_own_model(name)
    raise ValueError(
        f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}, or hf:FOLDER (a Hugging Face encoder "
        "checkpoint) or torch:package.module:function (an image backbone)"
    )


@dataclass(frozen=True)
class PretrainedAssets:
    """A model's pretrained parts. ``backbone`` is a template: builders deep-copy it, never train it."""

    name: str
    backbone: nn.Module
    load_seconds: float
    tokenizer: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)


_CACHE: dict[str, PretrainedAssets] = {}
_CACHE_LOCK = threading.Lock()


def load_pretrained_cached(name: str) -> PretrainedAssets:
    """Load ``name``'s pretrained weights once per process (clients are rebuilt every round).

    The global RNG is left as it was: whether a build is the first in its process must not change
    the random stream of a seeded run.
    """
    with _CACHE_LOCK:
        if name not in _CACHE:
            if name not in _LOADERS:
                raise ValueError(
                    f"no pretrained loader for model {name!r}; models with one: {', '.join(sorted(_LOADERS))}"
                )
            with torch.random.fork_rng(devices=[]):
                _CACHE[name] = _LOADERS[name]()
        return _CACHE[name]
