"""Who holds which records in a simulated federation.

Both sides derive the same split from the run config alone (dataset, seed, fractions), so the
server's central test set never overlaps any client's records and no index list has to travel.
"""

from __future__ import annotations

from common.config import RunConfig
from common.datasets import LabelledData, holdout_split, load_dataset, train_val_split
from common.partition import partition_indices


def central_split(cfg: RunConfig) -> tuple[LabelledData, LabelledData]:
    """(pool the clients share out, held-out central test set)."""
    data = load_dataset(cfg.dataset, max_records=cfg.max_records or None, seed=cfg.seed)
    return holdout_split(data, cfg.test_fraction, seed=cfg.seed)


def client_partition(
    cfg: RunConfig, partition_id: int, num_partitions: int
) -> tuple[LabelledData, LabelledData]:
    """(local train, local validation) of simulated client ``partition_id``, split as the client does."""
    return train_val_split(client_records(cfg, partition_id, num_partitions), cfg.val_fraction, seed=cfg.seed)


def client_records(cfg: RunConfig, partition_id: int, num_partitions: int) -> LabelledData:
    """All local records of simulated client ``partition_id`` (before its validation split)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    pool, _ = central_split(cfg)
    parts = partition_indices(
        pool.labels,
        num_partitions,
        scheme=cfg.partition,  # type: ignore[arg-type]
        alpha=cfg.alpha,
        seed=cfg.seed,
    )
    return pool.subset(parts[partition_id])


def check_federation_size(cfg: RunConfig, num_clients: int) -> None:
    """Refuse, before any training, a federation with more clients than records can feed."""
    pool, _ = central_split(cfg)
    partition_indices(
        pool.labels, num_clients, scheme=cfg.partition, alpha=cfg.alpha, seed=cfg.seed  # type: ignore[arg-type]
    )
