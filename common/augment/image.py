"""Image augmentations on batches of normalised image tensors (N, C, H, W), seeded from a ``torch.Generator``.

Every operation keeps the shape and the value range of the project's images: pixels are scaled to [0, 1] and then
normalised with MNIST's mean and standard deviation (:mod:`privatune.common.imaging`), so the background (pixel
0) is ``-MNIST_MEAN / MNIST_STD``, not 0. Each operation runs on ``x - background`` (background at 0), where
kornia's zero padding and zero erasing then mean "background", and adds it back; bilinear resampling only mixes
existing values (and the background), so the range stays that of the input and its background.

kornia draws its random parameters from torch's global generator and takes no generator argument: each call forks
the global RNG (:func:`torch.random.fork_rng`) and seeds it with a number drawn from the caller's generator, so the
output is a function of that generator alone and the global RNG is left untouched. At a site the generator is
seeded from the site's own randomness (client/randomness.py), as the Poisson sampling and the noise are.
torch and kornia are imported inside the functions, so validating a run config (common/augment/spec.py) loads
neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from privatune.common.augment.spec import AugmentOp, AugmentStep
from privatune.common.imaging import MNIST_MEAN, MNIST_STD

if TYPE_CHECKING:
    import torch

#: The normalised value of a black pixel: what shifts, rotations, padding and erasing fill with.
BACKGROUND = -MNIST_MEAN / MNIST_STD
ERASE_PROBABILITY = 0.5  # each image is erased with this probability (torchvision's and kornia's default)
ELASTIC_KERNEL, ELASTIC_SIGMA = 15, 4.0  # displacement field smoothing (pixels), Simard et al.'s scale for MNIST


@contextmanager
def _seeded(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """torch's global RNG seeded from ``generator`` for the block, restored after it."""
    import torch

    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _on_background(make: Callable[[int, int], Callable[[torch.Tensor], torch.Tensor]]) -> Callable[..., torch.Tensor]:
    """An apply function: ``make(h, w)`` builds the kornia module, run on ``x - BACKGROUND`` under a seeded RNG."""

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        aug = make(int(x.shape[-2]), int(x.shape[-1]))
        with _seeded(generator, x.device):
            out = aug(x - BACKGROUND) + BACKGROUND
        return out.reshape(x.shape)

    return apply


def shift(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``strength`` pixels in each direction (background comes in)."""
    import kornia.augmentation as K

    return _on_background(
        lambda h, w: K.RandomAffine(degrees=0.0, translate=(strength / w, strength / h), p=1.0, padding_mode="zeros")
    )(x, generator)


def rotate(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by an angle uniform in [-strength, strength] degrees."""
    import kornia.augmentation as K

    return _on_background(lambda h, w: K.RandomRotation(degrees=strength, p=1.0))(x, generator)


def crop(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Pad by ``strength`` pixels of background, then crop a random window of the original size."""
    import kornia.augmentation as K

    pad = int(strength)
    return _on_background(lambda h, w: K.RandomCrop((h, w), padding=pad, fill=0.0, p=1.0))(x, generator)


def erase(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing: with probability 1/2, one rectangle of 2 % to ``strength`` of the area set to background."""
    import kornia.augmentation as K

    return _on_background(
        lambda h, w: K.RandomErasing(scale=(0.02, strength), ratio=(0.3, 3.3), value=0.0, p=ERASE_PROBABILITY)
    )(x, generator)


def affine(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Affine jitter: scale by a factor in [1 - s, 1 + s] and shear by up to 45 s degrees."""
    import kornia.augmentation as K

    shear = 45.0 * strength
    return _on_background(
        lambda h, w: K.RandomAffine(
            degrees=0.0, scale=(1.0 - strength, 1.0 + strength), shear=(-shear, shear), p=1.0, padding_mode="zeros"
        )
    )(x, generator)


def elastic(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Elastic jitter: a smooth random displacement field of amplitude ``strength`` (kornia's alpha)."""
    import kornia.augmentation as K

    return _on_background(
        lambda h, w: K.RandomElasticTransform(
            kernel_size=(ELASTIC_KERNEL, ELASTIC_KERNEL),
            sigma=(ELASTIC_SIGMA, ELASTIC_SIGMA),
            alpha=(strength, strength),
            p=1.0,
            padding_mode="zeros",
        )
    )(x, generator)


IMAGE_OPS: dict[str, AugmentOp] = {
    op.name: op
    for op in (
        AugmentOp("shift", 0, 8, shift, "pixels", "random translation in x and y up to this many pixels"),
        AugmentOp("rotate", 0, 45, rotate, "degrees", "random rotation up to this angle either way"),
        AugmentOp("crop", 0, 8, crop, "pixels", "pad with background, random crop back to size", integer=True),
        AugmentOp("erase", 0.02, 0.5, erase, "of the area", "random erasing (p = 1/2) up to this fraction"),
        AugmentOp("affine", 0, 0.3, affine, "", "scale jitter 1 +- s, shear up to 45 s degrees"),
        AugmentOp("elastic", 0, 4, elastic, "", "elastic displacement field of this amplitude (kornia alpha)"),
    )
}


def augment_images(x: torch.Tensor, steps: Sequence[AugmentStep], generator: torch.Generator) -> torch.Tensor:
    """``x`` (N, C, H, W) through ``steps`` in order, each drawing from ``generator``; same shape and range."""
    if x.dim() != 4:
        raise ValueError(f"image augmentation needs a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if not steps or x.shape[0] == 0:
        return x
    for step in steps:
        x = step.op.apply(x, step.strength, generator)
    return x


def image_batch_augment(
    steps: Sequence[AugmentStep],
) -> Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]]:
    """What :func:`privatune.client.training.train_local` takes as ``augment``: the model's inputs (the images
    first) to augmented inputs."""
    chosen = tuple(steps)

    def apply(inputs: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        return [augment_images(inputs[0], chosen, generator), *inputs[1:]]

    return apply
