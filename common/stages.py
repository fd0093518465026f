"""Data that arrives over time (simulation only): which of a client's records each stage of a continual run trains on,
which central test records score each stage, and the continual-learning figures computed from those scores.

A continual run (simulations/continual.py) is S runs, one per stage, each warm-started from the last one's model.
Every stage's run config carries ``sim-stages`` (S), ``sim-stage`` (s), ``sim-stage-split`` and ``sim-rehearsal``;
both sides derive the stage's records from them and the client's partition alone, like the partition itself
(common/federation_data.py), so no index list travels.

- ``iid``: a seeded shuffle of the client's records cut into S near-equal chunks; stage s brings chunk s.
- ``class`` (class-incremental): the label set, in label order, cut into S contiguous groups; stage s brings the
  records whose label is in group s.

The continual-learning convention: stage s trains on its new records only; earlier stages' records are trained
again only with rehearsal (``sim-rehearsal`` F: the first ceil(F x n) of each earlier chunk's records in a fixed,
seeded order, so a record rehearsed in stage 2 is rehearsed again in stage 3, as a memory buffer would keep it).
Budgets follow records (common/record_budget.py): a rehearsed record's spends compose with its earlier ones in the
site's ledger; a new record starts fresh.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from privatune.common.config import RunConfig

STAGE_SPLITS = ("iid", "class")
_IID_STREAM, _TEST_STREAM, _REHEARSAL_STREAM = 0x5747, 0x7E57, 0x4E4E


def check_stages(cfg: RunConfig, need: Callable[[bool, str, str], None]) -> None:
    """The stage keys of one stage's run config (RunConfig.validate calls this)."""
    need(cfg.sim_stages >= 0, "sim-stages", f"must be >= 0 (0 = all data at once), got {cfg.sim_stages}")
    need(cfg.sim_stage_split in STAGE_SPLITS, "sim-stage-split", f"must be one of {', '.join(STAGE_SPLITS)}")
    need(
        math.isfinite(cfg.sim_rehearsal) and 0.0 <= cfg.sim_rehearsal <= 1.0,
        "sim-rehearsal",
        f"must be a fraction in [0, 1] of the earlier stages' records, got {cfg.sim_rehearsal}",
    )
    if cfg.sim_stages == 0:
        need(cfg.sim_stage == 0, "sim-stage", "needs sim-stages > 0 (use privatune simulate --stages S)")
        need(cfg.sim_rehearsal == 0, "sim-rehearsal", "needs sim-stages > 0 (use privatune simulate --stages S)")
        return
    need(
        1 <= cfg.sim_stage <= cfg.sim_stages,
        "sim-stage",
        f"must be in 1..{cfg.sim_stages} (sim-stages), got {cfg.sim_stage}",
    )
    need(
        cfg.sim_stage_split != "class" or cfg.sim_stages <= len(cfg.label_names),
        "sim-stages",
        f"a class-incremental run of {cfg.sim_stages} stages needs at least that many labels "
        f"(the task has {len(cfg.label_names)}); use fewer stages",
    )


def label_groups(num_labels: int, stages: int) -> list[np.ndarray]:
    """The label indices each stage brings (class-incremental): contiguous groups in label order."""
    if not 1 <= stages <= num_labels:
        raise ValueError(f"cannot split {num_labels} labels into {stages} stages")
    return [g.astype(np.int64) for g in np.array_split(np.arange(num_labels), stages)]


def stage_chunks(labels: np.ndarray, stages: int, split: str, seed: int, num_labels: int) -> list[np.ndarray]:
    """Indices (into ``labels``, sorted) of the records each stage brings; disjoint, and together all records."""
    y = np.asarray(labels, dtype=np.int64)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if split == "iid":
        perm = np.random.default_rng([seed, _IID_STREAM]).permutation(len(y))
        return [np.sort(c).astype(np.int64) for c in np.array_split(perm, stages)]
    if split == "class":
        return [np.flatnonzero(np.isin(y, g)).astype(np.int64) for g in label_groups(num_labels, stages)]
    raise ValueError(f"unknown stage split {split!r}; choose one of: {', '.join(STAGE_SPLITS)}")


def rehearsed(chunk: np.ndarray, fraction: float, seed: int, chunk_number: int) -> np.ndarray:
    """The records of an earlier chunk that later stages train again: the first ceil(fraction x n) of a fixed
    seeded order of the chunk (the same in every later stage)."""
    if fraction <= 0 or len(chunk) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.random.default_rng([seed, _REHEARSAL_STREAM, chunk_number]).permutation(len(chunk))
    return np.sort(np.asarray(chunk)[order[: math.ceil(fraction * len(chunk))]]).astype(np.int64)


def stage_train_indices(
    labels: np.ndarray, stages: int, stage: int, split: str, rehearsal: float, seed: int, num_labels: int
) -> np.ndarray:
    """The records stage ``stage`` (1-based) trains on: its own chunk, plus the rehearsed part of each earlier one."""
    chunks = stage_chunks(labels, stages, split, seed, num_labels)
    parts = [chunks[stage - 1], *(rehearsed(chunks[j], rehearsal, seed, j + 1) for j in range(stage - 1))]
    return np.sort(np.concatenate(parts)).astype(np.int64)


def stage_records_of(cfg: RunConfig, labels: np.ndarray, seed: int) -> np.ndarray | None:
    """A client's stage records (indices into its partition), or None for a run without stages. ``seed`` makes
    each client's chunks its own (the partition id mixed in)."""
    if cfg.sim_stages <= 0:
        return None
    return stage_train_indices(
        labels, cfg.sim_stages, cfg.sim_stage, cfg.sim_stage_split, cfg.sim_rehearsal, seed, len(cfg.label_names)
    )


def stage_test_indices(
    test_labels: np.ndarray, stages: int, split: str, seed: int, num_labels: int
) -> list[np.ndarray]:
    """Each stage's test records in the central test set: an IID chunk of it, or its label group's records."""
    return stage_chunks(test_labels, stages, split, seed ^ _TEST_STREAM, num_labels)


# ---------------------------------------------------------------------------------------------------- the figures
def average_accuracy(acc: Sequence[Sequence[float]], after: int) -> float:
    """Mean accuracy over the test sets of stages 1..after, after stage ``after`` (1-based). ``acc[i][j]`` is the
    accuracy on stage j+1's test set after training stage i+1 (j <= i)."""
    row = acc[after - 1][:after]
    return float(np.mean(row))


def forgetting(acc: Sequence[Sequence[float]], after: int) -> float | None:
    """Mean over earlier stages j of (the best accuracy on j after any stage before ``after``) - (its accuracy
    after ``after``), as in Chaudhry et al. 2018; None after stage 1 (nothing to forget yet)."""
    if after < 2:
        return None
    drops = [max(acc[i][j] for i in range(j, after - 1)) - acc[after - 1][j] for j in range(after - 1)]
    return float(np.mean(drops))


def backward_transfer(acc: Sequence[Sequence[float]], after: int) -> float | None:
    """Lopez-Paz and Ranzato 2017: mean over j < after of acc(after, j) - acc(j, j); negative is forgetting,
    positive means later stages improved earlier ones. None after stage 1."""
    if after < 2:
        return None
    return float(np.mean([acc[after - 1][j] - acc[j][j] for j in range(after - 1)]))
