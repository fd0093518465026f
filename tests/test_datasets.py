"""Preset loaders, the LabelledData container, and seeded stratified splits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from privatune.common import datasets as D
from privatune.common.datasets import LabelledData, holdout_split, load_dataset, train_val_split

REPO = Path(__file__).resolve().parents[1]


def _toy(n_per_class: tuple[int, ...] = (30, 20, 10)) -> LabelledData:
    labels = np.concatenate([np.full(k, c, dtype=np.int64) for c, k in enumerate(n_per_class)])
    texts = [f"record {i}" for i in range(len(labels))]
    return LabelledData("toy", "text", texts, labels, tuple(f"c{c}" for c in range(len(n_per_class))))


# ------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    ("name", "size", "label_names"),
    [
        ("sms-spam", 4837, ("ham", "spam")),
        ("trec6", 5382, ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")),
        ("digits", 1797, tuple(str(i) for i in range(10))),
    ],
)
def test_presets_load_with_expected_shape(name: str, size: int, label_names: tuple[str, ...]) -> None:
    data = load_dataset(name)
    assert data.name == name
    assert len(data) == size
    assert data.label_names == label_names
    assert data.labels.dtype == np.int64
    assert set(np.unique(data.labels)) == set(range(len(label_names)))
    if data.kind == "text":
        assert all(isinstance(t, str) and t for t in data.inputs)
        assert max(len(t) for t in data.inputs) <= D.MAX_TEXT_CHARS


def test_sms_spam_content() -> None:
    data = load_dataset("sms-spam")
    assert data.label_counts().tolist() == [4199, 638]
    assert data.inputs[1] == "Ok lar... Joking wif u oni..."
    assert data.labels[2] == 1  # "Free entry in 2 a wkly comp ..."
    # the very long messages are truncated, not dropped
    assert max(len(t) for t in data.inputs) == D.MAX_TEXT_CHARS


def test_trec_lines_are_deduplicated_and_parsed() -> None:
    data = load_dataset("trec6")
    assert data.inputs[0] == "How did serfdom develop in and then leave Russia ?"
    assert data.label_names[data.labels[0]] == "DESC"
    assert data.label_counts().tolist() == [86, 1153, 1245, 1215, 824, 859]
    assert not any(":" in t.split(" ")[0] and t.split(" ")[0].isupper() for t in data.inputs[:50])


def test_digits_are_mnist_shaped_and_normalised() -> None:
    data = load_dataset("digits")
    x = data.inputs
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (1797, 1, 28, 28)
    pixels = x * D.MNIST_STD + D.MNIST_MEAN
    assert pixels.min() == pytest.approx(0.0, abs=1e-6)
    assert pixels.max() == pytest.approx(1.0, abs=1e-6)
    # 4-pixel black border around a 20x20 digit, like MNIST
    assert np.allclose(pixels[:, :, :4, :], 0.0, atol=1e-6)
    assert np.allclose(pixels[:, :, :, -4:], 0.0, atol=1e-6)
    assert pixels[:, :, 4:24, 4:24].mean() > 0.1


def test_upscale_matches_torch_bilinear() -> None:
    torch = pytest.importorskip("torch")
    from sklearn.datasets import load_digits

    images = load_digits().images[:50]
    ours = D.upscale_digits(images)
    small = torch.nn.functional.interpolate(
        torch.tensor(images / 16.0, dtype=torch.float32)[:, None], size=(20, 20), mode="bilinear", align_corners=False
    )
    theirs = torch.nn.functional.pad(small, (4, 4, 4, 4))[:, 0].numpy()
    assert np.abs(ours - theirs).max() < 1e-5


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(ValueError, match="sms-spam, trec6, digits"):
        load_dataset("mnist")


def test_max_records_is_a_stratified_seeded_subsample() -> None:
    full = load_dataset("sms-spam")
    small = load_dataset("sms-spam", max_records=200, seed=3)
    assert len(small) == 200
    # 13.2 % spam overall -> 26 of 200
    assert small.label_counts().tolist() == [174, 26]
    assert set(small.inputs) <= set(full.inputs)
    again = load_dataset("sms-spam", max_records=200, seed=3)
    other = load_dataset("sms-spam", max_records=200, seed=4)
    assert again.fingerprint() == small.fingerprint()
    assert other.fingerprint() != small.fingerprint()
    assert len(load_dataset("digits", max_records=10_000)) == 1797
    assert len(load_dataset("digits", max_records=0)) == 1797  # 0 = all, like the run config
    with pytest.raises(ValueError, match="max_records"):
        load_dataset("digits", max_records=-1)


def test_cached_reload_is_fast_and_returns_a_private_copy() -> None:
    for name in D.DATASET_NAMES:  # the first load of each reads its files (fashion-mnist: 60,000 images, ~2 s)
        load_dataset(name)
    start = time.perf_counter()
    for name in D.DATASET_NAMES:
        load_dataset(name)
    assert time.perf_counter() - start < 0.5
    first = load_dataset("digits")
    first.inputs[0] = 0.0
    first.labels[0] = 9
    fresh = load_dataset("digits")
    assert fresh.labels[0] == 0
    assert fresh.inputs[0].min() < 0  # background pixels are normalised below zero again


# ------------------------------------------------------------------------------------- LabelledData


def test_subset_and_len() -> None:
    data = _toy()
    part = data.subset([0, 59, 30])
    assert len(part) == 3
    assert part.inputs == ["record 0", "record 59", "record 30"]
    assert part.labels.tolist() == [0, 2, 1]
    assert part.label_names == data.label_names
    mask = data.labels == 2
    assert len(data.subset(mask)) == 10
    assert len(data.subset([])) == 0
    with pytest.raises(IndexError):
        data.subset([60])


def test_image_subset_copies() -> None:
    data = load_dataset("digits", max_records=20)
    part = data.subset(np.arange(5))
    part.inputs[:] = 0
    assert data.inputs[:5].min() < 0


def test_invalid_containers_are_refused() -> None:
    with pytest.raises(ValueError, match="inputs but"):
        LabelledData("x", "text", ["a"], np.zeros(2, dtype=np.int64), ("a", "b"))
    with pytest.raises(ValueError, match="labels must lie"):
        LabelledData("x", "text", ["a"], np.array([2], dtype=np.int64), ("a", "b"))
    with pytest.raises(ValueError, match="int64"):
        LabelledData("x", "text", ["a"], np.array([0], dtype=np.int32), ("a", "b"))
    with pytest.raises(ValueError, match="float32"):
        LabelledData("x", "image", np.zeros((1, 28, 28), np.float32), np.zeros(1, dtype=np.int64), ("a",))


def test_fingerprint_ignores_name_but_sees_content() -> None:
    data = _toy()
    renamed = LabelledData("other", data.kind, list(data.inputs), data.labels.copy(), data.label_names)
    assert renamed.fingerprint() == data.fingerprint()
    assert len(data.fingerprint()) == 64
    relabelled = data.labels.copy()
    relabelled[0] = 1
    assert LabelledData("toy", "text", list(data.inputs), relabelled, data.label_names).fingerprint() != (
        data.fingerprint()
    )
    edited = list(data.inputs)
    edited[3] = "record 3!"
    assert LabelledData("toy", "text", edited, data.labels, data.label_names).fingerprint() != data.fingerprint()
    names = ("x0", "c1", "c2")
    assert LabelledData("toy", "text", list(data.inputs), data.labels, names).fingerprint() != data.fingerprint()


def test_fingerprint_is_stable_across_processes() -> None:
    code = (
        "from common.datasets import load_dataset;"
        "print(load_dataset('trec6', max_records=300, seed=1).fingerprint());"
        "print(load_dataset('digits', max_records=100, seed=1).fingerprint())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    ).stdout.split()
    here = [
        load_dataset("trec6", max_records=300, seed=1).fingerprint(),
        load_dataset("digits", max_records=100, seed=1).fingerprint(),
    ]
    assert out == here


# ------------------------------------------------------------------------------------------- splits


def test_holdout_split_is_stratified_disjoint_and_seeded() -> None:
    data = _toy((100, 50, 10))
    train, test = holdout_split(data, 0.2, seed=7)
    assert len(train) + len(test) == len(data)
    assert set(train.inputs).isdisjoint(test.inputs)
    assert test.label_counts().tolist() == [20, 10, 2]
    again_train, again_test = holdout_split(data, 0.2, seed=7)
    assert again_test.inputs == test.inputs and again_train.inputs == train.inputs
    _, other = holdout_split(data, 0.2, seed=8)
    assert other.inputs != test.inputs


def test_holdout_split_keeps_both_sides_non_empty() -> None:
    data = _toy((3,))
    train, test = holdout_split(data, 0.01, seed=0)
    assert (len(train), len(test)) == (2, 1)
    train, test = holdout_split(data, 0.99, seed=0)
    assert (len(train), len(test)) == (1, 2)
    with pytest.raises(ValueError, match="test_fraction"):
        holdout_split(data, 0.0, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        holdout_split(_toy((1,)), 0.5, seed=0)


def test_holdout_on_a_preset_keeps_class_balance() -> None:
    data = load_dataset("trec6")
    _train, test = holdout_split(data, 0.2, seed=42)
    overall = data.label_counts() / len(data)
    assert np.abs(test.label_counts() / len(test) - overall).max() < 0.002
    assert len(test) == round(0.2 * len(data))


def test_train_val_split_stratified_when_possible() -> None:
    data = _toy((40, 20, 10))
    train, val = train_val_split(data, 0.1, seed=1)
    assert len(val) == 7 and len(train) == 63
    assert val.label_counts().tolist() == [4, 2, 1]
    assert set(train.inputs).isdisjoint(val.inputs)


def test_train_val_split_random_with_singleton_classes() -> None:
    data = _toy((40, 1, 9))
    train, val = train_val_split(data, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train.inputs + val.inputs) == sorted(data.inputs)
    assert train_val_split(data, 0.2, seed=1)[1].inputs == val.inputs


def test_train_val_split_edge_cases() -> None:
    data = _toy((5, 5))
    train, val = train_val_split(data, 0.0, seed=0)
    assert len(val) == 0 and len(train) == 10
    assert val.label_names == data.label_names
    train, val = train_val_split(_toy((1,)), 0.5, seed=0)
    assert (len(train), len(val)) == (1, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(data, 1.0, seed=0)
