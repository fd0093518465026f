"""The DP benchmark's data: each preset's federation and its backbone features, computed once.

Both parts of the benchmark (timing and accuracy) read the same features; computing them is its own step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from privatune.common.config import RunConfig
from privatune.common.datasets import LabelledData
from privatune.common.features import cached_features
from privatune.common.federation_data import central_split, client_partition
from privatune.common.models import get_model_spec
from privatune.simulations.benchmarks.dp.plan import BenchPlan, base_config
from privatune.simulations.benchmarks.report import Log


@dataclass
class PreparedData:
    """One preset's federation: the clients' splits, their features, and the central test set."""

    cfg: RunConfig
    cache_dir: Path
    client_train: list[LabelledData]
    pooled_features: torch.Tensor
    pooled_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    feature_seconds: float


def prepare_data(preset: str, plan: BenchPlan, cache_dir: Path, log: Log) -> PreparedData:
    """Compute (and cache) every feature matrix the federation needs: clients' train/val and the test set."""
    cfg = base_config(preset, plan)
    t0 = time.perf_counter()
    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
    trains, feats, labels = [], [], []
    for pid in range(plan.clients):
        train, val = client_partition(cfg, pid, plan.clients)
        trains.append(train)
        feats.append(cached_features(model, cfg.model, train, cfg.max_length, cache_dir))
        labels.append(torch.as_tensor(train.labels, dtype=torch.long))
        if len(val):
            cached_features(model, cfg.model, val, cfg.max_length, cache_dir)
    _, test = central_split(cfg)
    test_feats = cached_features(model, cfg.model, test, cfg.max_length, cache_dir)
    seconds = time.perf_counter() - t0
    n = sum(len(t) for t in trains)
    log(
        f"[data] {preset}: {plan.clients} clients, {n} training records pooled, {len(test)} test records; "
        f"features in {seconds:.1f} s"
    )
    return PreparedData(
        cfg=cfg,
        cache_dir=cache_dir,
        client_train=trains,
        pooled_features=torch.cat(feats),
        pooled_labels=torch.cat(labels),
        test_features=test_feats,
        test_labels=torch.as_tensor(test.labels, dtype=torch.long),
        feature_seconds=seconds,
    )
