"""Split one labelled dataset into per-client partitions: IID, or label-skewed with a per-class Dirichlet.

We do not use flwr-datasets' partitioners: they work on Hugging Face `datasets` objects, and installing
flwr-datasets 0.6.1 would add datasets, pyarrow, pandas, aiohttp and more (well over 150 MB) and downgrade
the huggingface_hub that transformers already uses, for a few dozen lines of numpy.

Partitions are lists of record indices into the dataset, so any LabelledData can be cut with `subset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Scheme = Literal["iid", "dirichlet"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet")
#: Dirichlet draws that leave a client under min_partition_size are redrawn at most this many times.
MAX_DIRICHLET_TRIES = 200


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: Scheme = "iid",
    alpha: float = 1.0,
    seed: int = 0,
    min_partition_size: int = 2,
) -> list[np.ndarray]:
    """Record indices for each of `num_partitions` clients; every record lands in exactly one partition.

    iid: a seeded shuffle cut into near-equal parts (sizes differ by at most one).
    dirichlet: for every class, its records are shared among the clients in proportions drawn from
    Dirichlet(alpha, ..., alpha); small alpha gives strong label skew and uneven sizes, large alpha tends to
    iid. A draw that leaves any client with fewer than `min_partition_size` records is redrawn with a seed
    derived from `seed` (at most MAX_DIRICHLET_TRIES times), so the result depends only on the arguments.

    Each returned array is int64 and sorted ascending.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
        raise ValueError(f"num_partitions must be an integer, got {num_partitions!r}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if min_partition_size < 1:
        raise ValueError(f"min_partition_size must be >= 1 (an empty client cannot train), got {min_partition_size}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (the Dirichlet concentration) must be a positive number, got {alpha}")
    n = int(y.shape[0])
    if n < num_partitions * min_partition_size:
        raise ValueError(
            f"cannot split {n} records into {num_partitions} clients with at least {min_partition_size} each; "
            f"use fewer clients (at most {n // min_partition_size})"
        )

    if scheme == "iid":
        perm = np.random.default_rng([seed, 0x11D]).permutation(n)
        return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_partitions)]

    for attempt in range(MAX_DIRICHLET_TRIES):
        parts = _dirichlet_once(y, num_partitions, alpha, np.random.default_rng([seed, 0xD1C, attempt]))
        if min(len(p) for p in parts) >= min_partition_size:
            return parts
    raise ValueError(
        f"dirichlet partitioning (alpha={alpha}) could not give each of {num_partitions} clients at least "
        f"{min_partition_size} of {n} records in {MAX_DIRICHLET_TRIES} draws; raise alpha, use fewer clients, "
        f"or lower min_partition_size"
    )


def _dirichlet_once(y: np.ndarray, num_partitions: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        shares = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = np.minimum((np.cumsum(shares)[:-1] * len(members)).astype(np.int64), len(members))
        for bucket, piece in zip(buckets, np.split(members, cuts), strict=True):
            bucket.append(piece)
    return [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]


def label_distribution_distance(labels: np.ndarray, partitions: Sequence[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label distribution and the whole dataset's.

    0 means every client sees the global class mix; 1 means clients see disjoint classes. Empty
    partitions are skipped. Useful for reporting how non-IID a federation really is.
    """
    y = np.asarray(labels)
    num_classes = int(y.max()) + 1 if y.size else 0
    if num_classes == 0:
        return 0.0
    overall = np.bincount(y, minlength=num_classes) / y.size
    distances = []
    for part in partitions:
        if len(part) == 0:
            continue
        local = np.bincount(y[np.asarray(part)], minlength=num_classes) / len(part)
        distances.append(0.5 * float(np.abs(local - overall).sum()))
    return float(np.mean(distances)) if distances else 0.0
