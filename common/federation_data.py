"""Who holds which records in a simulated federation.

Both sides derive the same split from the run config alone (dataset or sim-data file, seed, fractions), so
the server's central test set never overlaps any client's records and no index list has to travel.

With `sim-data` (the user's own data, common/sim_data.py) the pool is that file's records; the central test
set is the file's own test records when the user gave a test file, else a held-out `test-fraction` of them,
exactly as for a preset.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import numpy as np

from privatune.common.config import RunConfig
from privatune.common.datasets import (
    OFFICIAL_TEST_SPLITS,
    LabelledData,
    holdout_split,
    load_dataset,
    load_official_test,
    subsample,
    train_val_split,
)
from privatune.common.partition import partition_indices
from privatune.common.stages import stage_records_of


class DataKey(NamedTuple):
    """What fixes the pool and the central test set (hashable, so both are computed once per process)."""

    dataset: str
    sim_data: str
    sim_data_version: tuple[int, int]  # (mtime_ns, size): a rewritten file is read again
    labels: tuple[str, ...]
    max_records: int
    seed: int
    test_fraction: float


def data_key(cfg: RunConfig) -> DataKey:
    version: tuple[int, int] = (0, 0)
    labels: tuple[str, ...] = ()
    if cfg.sim_data:
        labels = cfg.label_names
        with contextlib.suppress(OSError):  # a missing file is reported by the loader, with the fix
            st = os.stat(cfg.sim_data)
            version = (st.st_mtime_ns, st.st_size)
    return DataKey(cfg.dataset, cfg.sim_data, version, labels, cfg.max_records, cfg.seed, cfg.test_fraction)


def central_split(cfg: RunConfig) -> tuple[LabelledData, LabelledData]:
    """(pool the clients share out, held-out central test set)."""
    return _central_split(data_key(cfg))


@functools.lru_cache(maxsize=8)
def _central_split(key: DataKey) -> tuple[LabelledData, LabelledData]:
    if key.sim_data:
        from privatune.common.sim_data import load_sim_data

        data, test = load_sim_data(key.sim_data, key.labels)
        data = subsample(data, key.max_records or None, key.seed)
        if test is not None:
            return data, test.subset(np.arange(len(test)))
    else:
        data = load_dataset(key.dataset, max_records=key.max_records or None, seed=key.seed, shared=True)
        if key.dataset in OFFICIAL_TEST_SPLITS:  # the preset's own test split (max-records: x test-fraction of it)
            n_test = round(key.max_records * key.test_fraction) if key.max_records else None
            return data, load_official_test(key.dataset, max_records=n_test, seed=key.seed)
    return holdout_split(data, key.test_fraction, seed=key.seed)


@functools.lru_cache(maxsize=8)
def _partitions(key: DataKey, scheme: str, alpha: float, num: int) -> tuple[np.ndarray, ...]:
    """Every client's indices into the pool; computed once per process (each message needs its own)."""
    pool, _ = _central_split(key)
    return tuple(partition_indices(pool.labels, num, scheme=scheme, alpha=alpha, seed=key.seed))  # type: ignore[arg-type]


def client_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[LabelledData, LabelledData]:
    """(local train, local validation) of simulated client ``partition_id`` by a seeded split, for benchmarks that
    need no site key. The ClientApp splits by its keyed record ids instead (client/record_ids.py)."""
    return train_val_split(client_records(cfg, partition_id, num_partitions), cfg.val_fraction, seed=cfg.seed)


def client_records(cfg: RunConfig, partition_id: int, num_partitions: int) -> LabelledData:
    """All local records of simulated client ``partition_id`` (before its validation split)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    pool, _ = central_split(cfg)
    parts = _partitions(data_key(cfg), cfg.partition, cfg.alpha, num_partitions)
    records = pool.subset(parts[partition_id])
    staged = stage_records_of(cfg, records.labels, client_stage_seed(cfg.seed, partition_id))
    return records if staged is None else records.subset(staged)  # a continual run: this stage's records only


def client_stage_seed(seed: int, partition_id: int) -> int:
    """The seed of a client's stage chunks and rehearsal sample (its own, from the run seed and its partition)."""
    return seed * 1_000_003 + partition_id


def check_federation_size(cfg: RunConfig, num_clients: int) -> None:
    """Refuse, before any training, a federation with more clients than records can feed."""
    _partitions(data_key(cfg), cfg.partition, cfg.alpha, num_clients)
