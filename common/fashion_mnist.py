"""Fashion-MNIST (Zalando; 60,000 training and 10,000 test images of clothing, 28x28 grayscale, 10 classes) read
from the idx files on disk, as the preset dataset ``fashion-mnist`` for the MNIST-pretrained CNN.

The files come from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``; the setup
script installs it where apt-get works) or from any folder named by ``PRIVATUNE_FASHION_MNIST_DIR`` holding the
four files as published (gzipped, or not). Nothing is downloaded at run time. The parser is numpy alone, so the
server and the sites share it. Images are light on a black background like MNIST's digits and already 28x28, so
they only need MNIST's scaling and normalisation (common/datasets.py ``pixels_to_model_input``).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

#: The environment variable naming a folder with the four files (checked before the Debian folder).
FASHION_MNIST_ENV = "PRIVATUNE_FASHION_MNIST_DIR"
#: Where Debian's dataset-fashion-mnist puts them.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: The classes in label order (0..9), spelt so they fit the comma-separated ``labels`` key.
FASHION_MNIST_LABELS: tuple[str, ...] = (
    "tshirt-top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
Split = Literal["train", "test"]

# idx: a big-endian magic (0, 0, dtype code, number of dimensions), one big-endian uint32 per dimension, the data.
_IDX_UBYTE = 0x08


class IdxFormatError(ValueError):
    """A file that is not an idx file of unsigned bytes (or is cut short)."""


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (``.gz`` or plain) as a uint8 array of the shape its header gives."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged deflate stream
            raise IdxFormatError(f"{path}: not a readable gzip file ({err}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{path}: not an idx file (bad magic number)")
    if raw[2] != _IDX_UBYTE:
        raise IdxFormatError(f"{path}: idx data type 0x{raw[2]:02x}, expected unsigned bytes (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise IdxFormatError(f"{path}: idx header cut short")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise IdxFormatError(f"{path}: header says {shape} ({size} bytes of data), file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def candidate_dirs() -> list[Path]:
    """Folders searched, in order: ``$PRIVATUNE_FASHION_MNIST_DIR`` (if set), then Debian's."""
    env = os.environ.get(FASHION_MNIST_ENV, "").strip()
    dirs = [Path(env).expanduser()] if env else []
    return [*dirs, DEBIAN_FASHION_MNIST_DIR]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def missing_files_message(searched: list[Path]) -> str:
    names = ", ".join(f"{stem}.gz" for pair in FILES.values() for stem in pair)
    return (
        "dataset 'fashion-mnist': its files were not found in "
        + " or ".join(str(d) for d in searched)
        + ". Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; scripts/setup.sh does it), "
        f"or download the four files ({names}) from {DOWNLOAD_URL} into a folder and set "
        f"{FASHION_MNIST_ENV}=/that/folder"
    )


def locate(split: Split) -> tuple[Path, Path]:
    """(images, labels) of ``split`` from the first folder holding both; FileNotFoundError names what to do."""
    searched = candidate_dirs()
    images_stem, labels_stem = FILES[split]
    for folder in searched:
        images, labels = _find(folder, images_stem), _find(folder, labels_stem)
        if images is not None and labels is not None:
            return images, labels
    raise FileNotFoundError(missing_files_message(searched))


def load_split(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [N, 28, 28], labels int64 [N]) of the ``train`` or ``test`` (t10k) split."""
    images_path, labels_path = locate(split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IdxFormatError(f"{images_path}: images of shape {list(images.shape)}, expected [N, 28, 28]")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise IdxFormatError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_LABELS):
        raise IdxFormatError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return images, labels.astype(np.int64)
