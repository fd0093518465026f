"""Who holds which records in a simulated federation.

Both sides derive the same split from the run config alone (dataset, seed, fractions), so the
server's central test set never overlaps any client's records and no index list has to travel.
"""

from __future__ import annotations

import functools

import numpy as np

from privatune.common.config import RunConfig
from privatune.common.datasets import LabelledData, holdout_split, load_dataset, train_val_split
from privatune.common.partition import partition_indices


def central_split(cfg: RunConfig) -> tuple[LabelledData, LabelledData]:
    """(pool the clients share out, held-out central test set)."""
    return _central_split(cfg.dataset, cfg.max_records, cfg.seed, cfg.test_fraction)


@functools.lru_cache(maxsize=8)
def _central_split(
    dataset: str, max_records: int, seed: int, test_fraction: float
) -> tuple[LabelledData, LabelledData]:
    data = load_dataset(dataset, max_records=max_records or None, seed=seed)
    return holdout_split(data, test_fraction, seed=seed)


@functools.lru_cache(maxsize=8)
def _partitions(
    dataset: str, max_records: int, seed: int, test_fraction: float, scheme: str, alpha: float, num: int
) -> tuple[np.ndarray, ...]:
    """Every client's indices into the pool; computed once per process (each message needs its own)."""
    pool, _ = _central_split(dataset, max_records, seed, test_fraction)
    return tuple(partition_indices(pool.labels, num, scheme=scheme, alpha=alpha, seed=seed))  # type: ignore[arg-type]


def client_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[LabelledData, LabelledData]:
    """(local train, local validation) of simulated client ``partition_id`` by a seeded split, for benchmarks that
    need no site key. The ClientApp splits by its keyed record ids instead (client/record_ids.py)."""
    return train_val_split(client_records(cfg, partition_id, num_partitions), cfg.val_fraction, seed=cfg.seed)


def client_records(cfg: RunConfig, partition_id: int, num_partitions: int) -> LabelledData:
    """All local records of simulated client ``partition_id`` (before its validation split)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    pool, _ = central_split(cfg)
    parts = _partitions(
        cfg.dataset, cfg.max_records, cfg.seed, cfg.test_fraction, cfg.partition, cfg.alpha, num_partitions
    )
    return pool.subset(parts[partition_id])


def check_federation_size(cfg: RunConfig, num_clients: int) -> None:
    """Refuse, before any training, a federation with more clients than records can feed."""
    _partitions(cfg.dataset, cfg.max_records, cfg.seed, cfg.test_fraction, cfg.partition, cfg.alpha, num_clients)
