"""Your own image backbone: ``model = "torch:package.module:function"``, where ``function()`` returns
``(nn.Module, feature_size)`` with its pretrained weights loaded.

The module takes what the digits CNN takes: the tensor ``encode_images`` produces, ``[N, 1, 28, 28]`` float32,
normalised with the MNIST mean and std (``common/imaging.py``), and returns features ``[N, feature_size]``. Its
top-level children that hold parameters are its blocks, in order (``last-k`` trains the last k of them); its
Linear layers are LoRA's default targets. The function must give the same weights at every call and at every
site (load them from a file): sites refuse a backbone whose weights differ from the coordinator's.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from privatune.common.imaging import IMAGE_SIDE
from privatune.common.models.classifier import Classifier, classifier_on
from privatune.common.models.image import encode_images
from privatune.common.models.names import OwnModel
from privatune.common.models.registry import ModelSpec, PretrainedAssets, load_pretrained_cached


class BackboneImportError(ValueError):
    """A ``torch:`` backbone that cannot be imported or built; the message names the target and the fix."""


def _import_function(name: str, own: OwnModel) -> Any:
    module_name, _, function_name = own.target.partition(":")
    if own.import_path and own.import_path not in sys.path:
        sys.path.insert(0, own.import_path)
    where = f" (also searched {own.import_path})" if own.import_path else ""
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own code failing
        raise BackboneImportError(
            f"model '{name}': cannot import module '{module_name}'{where}: {err}; install it, put its folder on "
            "PYTHONPATH, or (at a site) set model-path in the node config to the folder it is imported from"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise BackboneImportError(
            f"model '{name}': module '{module_name}' has no function '{function_name}'; give "
            "torch:package.module:function, a function that returns (nn.Module, feature_size)"
        )
    return function


def load_torch_backbone(name: str, own: OwnModel) -> PretrainedAssets:
    """Call the function once per process, check what it returns on a dummy batch, and freeze the result."""
    start = time.perf_counter()
    function = _import_function(name, own)
    try:
        built = function()
    except Exception as err:  # the user's code: any failure is named once, with the target
        raise BackboneImportError(f"model '{name}': {own.target}() failed: {err}") from None
    if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module)):
        raise BackboneImportError(f"model '{name}': the function must return (nn.Module, feature_size), got {built!r}")
    backbone, feature_size = built[0], built[1]
    if not isinstance(feature_size, int) or feature_size < 1:
        raise BackboneImportError(f"model '{name}': feature_size must be a positive int, got {feature_size!r}")
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(2, 1, IMAGE_SIDE, IMAGE_SIDE))
    except Exception as err:  # the user's code: any failure is a wrong backbone
        raise BackboneImportError(
            f"model '{name}': the backbone fails on a [2, 1, {IMAGE_SIDE}, {IMAGE_SIDE}] batch ({err}); it must take "
            "MNIST-normalised 28x28 images"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, feature_size):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BackboneImportError(
            f"model '{name}': the backbone returns {shape} for 2 images, not [2, {feature_size}] (feature_size)"
        )
    for p in backbone.parameters():
        p.requires_grad_(False)
    blocks = tuple(
        f"backbone.{child}." for child, module in backbone.named_children() if any(True for _ in module.parameters())
    )
    linear = tuple(n for n, m in backbone.named_modules() if isinstance(m, nn.Linear))
    return PretrainedAssets(
        name=name,
        backbone=backbone,
        load_seconds=time.perf_counter() - start,
        extra={"feature_size": feature_size, "block_prefixes": blocks, "lora_targets": linear},
    )


def torch_spec(name: str, own: OwnModel) -> ModelSpec:
    """The spec of a torch: backbone; the function runs now (its feature size is the head's input)."""
    assets = load_pretrained_cached(name)
    dim = int(assets.extra["feature_size"])

    def build(num_classes: int, seed: int) -> Classifier:
        loaded = load_pretrained_cached(name)
        return classifier_on(
            loaded.backbone, dim, num_classes, seed, loaded.extra["block_prefixes"], loaded.extra["lora_targets"]
        )

    def encode(inputs: Sequence[str] | np.ndarray, *, max_length: int | None = None) -> tuple[torch.Tensor, ...]:
        try:
            return encode_images(inputs, max_length=max_length)
        except ValueError as err:
            raise ValueError(f"model '{name}' takes what digits-cnn takes: {err}") from None

    return ModelSpec(
        name=name,
        kind="image",
        feature_dim=dim,
        description=f"image backbone {own.target}, {dim}-dim features, 28x28 MNIST-normalised input",
        build=build,
        encode=encode,
    )
