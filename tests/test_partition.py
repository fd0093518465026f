"""Client partitions: coverage, determinism, label skew, size guarantees and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from privatune.common.datasets import load_dataset
from privatune.common.partition import (
    MAX_DIRICHLET_TRIES,
    _dirichlet_once,
    label_distribution_distance,
    partition_indices,
)

LABELS = np.repeat(np.arange(10), 100)  # 1,000 records, 10 balanced classes


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [1, 3, 10, 37])
def test_every_record_in_exactly_one_partition(scheme: str, num_partitions: int) -> None:
    parts = partition_indices(LABELS, num_partitions, scheme=scheme, alpha=0.5, seed=1)  # type: ignore[arg-type]
    assert len(parts) == num_partitions
    _assert_exact_cover(parts, len(LABELS))
    assert all(len(p) >= 2 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_iid_sizes_are_balanced() -> None:
    parts = partition_indices(LABELS, 7, scheme="iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_same_seed_same_partitions(scheme: str) -> None:
    a = partition_indices(LABELS, 8, scheme=scheme, alpha=0.3, seed=5)  # type: ignore[arg-type]
    b = partition_indices(LABELS, 8, scheme=scheme, alpha=0.3, seed=5)  # type: ignore[arg-type]
    c = partition_indices(LABELS, 8, scheme=scheme, alpha=0.3, seed=6)  # type: ignore[arg-type]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_small_alpha_is_more_skewed_than_iid() -> None:
    iid = label_distribution_distance(LABELS, partition_indices(LABELS, 10, "iid", seed=0))
    skewed = label_distribution_distance(LABELS, partition_indices(LABELS, 10, "dirichlet", alpha=0.1, seed=0))
    mild = label_distribution_distance(LABELS, partition_indices(LABELS, 10, "dirichlet", alpha=100.0, seed=0))
    assert iid < 0.2  # only sampling noise: 100 records per client over 10 classes
    assert skewed > 0.5
    assert skewed > iid + 0.4
    assert mild < skewed


def test_skew_on_a_real_preset_with_few_classes() -> None:
    labels = load_dataset("trec6").labels
    iid = label_distribution_distance(labels, partition_indices(labels, 10, "iid", seed=42))
    skewed = label_distribution_distance(labels, partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=42))
    assert skewed > iid + 0.3


def test_label_distribution_distance_extremes() -> None:
    labels = np.array([0, 0, 1, 1])
    assert label_distribution_distance(labels, [np.array([0, 2]), np.array([1, 3])]) == 0.0
    assert label_distribution_distance(labels, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(0.5)
    assert label_distribution_distance(labels, [np.array([0, 1, 2, 3]), np.array([], dtype=np.int64)]) == 0.0


def test_min_partition_size_is_guaranteed_by_resampling() -> None:
    # 2 skewed classes, alpha 0.1, 10 clients: a single Dirichlet draw almost always starves some client
    labels = np.array([0] * 900 + [1] * 100)
    first_draw = _dirichlet_once(labels, 10, 0.1, np.random.default_rng([3, 0xD1C, 0]))
    assert min(len(p) for p in first_draw) < 2  # so the result below needed a redraw
    parts = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=3, min_partition_size=2)
    assert min(len(p) for p in parts) >= 2
    _assert_exact_cover(parts, len(labels))


def test_unreachable_min_size_gives_a_clear_error() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    expected = rf"alpha=0.01.*40 clients at least 10.*{MAX_DIRICHLET_TRIES} draws.*raise alpha"
    with pytest.raises(ValueError, match=expected):
        partition_indices(labels, 40, "dirichlet", alpha=0.01, seed=0, min_partition_size=10)


def test_too_many_clients_is_refused() -> None:
    labels = np.zeros(120, dtype=np.int64)
    with pytest.raises(
        ValueError, match=r"cannot split 120 records into 500 clients with at least 2 each; use fewer clients"
    ):
        partition_indices(labels, 500)
    with pytest.raises(ValueError, match=r"at most 60"):
        partition_indices(labels, 61, min_partition_size=2)
    assert len(partition_indices(labels, 60)) == 60


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_partitions": 0}, "num_partitions must be >= 1"),
        ({"num_partitions": -3}, "num_partitions must be >= 1"),
        ({"num_partitions": 2.5}, "num_partitions must be an integer"),
        ({"num_partitions": 2, "alpha": 0.0, "scheme": "dirichlet"}, "alpha"),
        ({"num_partitions": 2, "alpha": -1.0, "scheme": "dirichlet"}, "alpha"),
        ({"num_partitions": 2, "alpha": float("nan"), "scheme": "dirichlet"}, "alpha"),
        ({"num_partitions": 2, "scheme": "pathological"}, "unknown partition scheme 'pathological'.*iid, dirichlet"),
        ({"num_partitions": 2, "min_partition_size": 0}, "min_partition_size must be >= 1"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition_indices(LABELS, **kwargs)


def test_bad_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition_indices(np.zeros((4, 2), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="integers"):
        partition_indices(np.zeros(10), 2)
