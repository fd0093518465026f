"""Part 1 of the DP benchmark: the time of a local epoch, DP vs non-DP, through the client's own training.

One kind of thing: the timing rows and the calls that fill them (head, full and partial cases). A case may time
several DP paths against the same non-DP calls (issue 13): ``head`` through Opacus and ``head-closed-form``
(client/linear_dp.py, the default for a bare linear head), ``full`` with Opacus' hooks, ``full-ghost`` and
``full-bookkeeping`` (client/bookkeeping_dp.py, the default for the CNN). ``cases`` picks rows by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from privatune.client.randomness import SeededRandomness
from privatune.client.training import train_local
from privatune.common.features import encode
from privatune.common.federation_data import central_split
from privatune.common.models import configure_trainable, get_model_spec, new_head
from privatune.simulations.benchmarks.dp.data import PreparedData
from privatune.simulations.benchmarks.dp.plan import BenchPlan, base_config
from privatune.simulations.benchmarks.report import Log, median


@dataclass
class TimingRow:
    case: str  # head | full | partial
    model: str
    dataset: str
    records: int
    batch_size: int
    epochs_per_call: int
    repeats: int
    trainable_params: int
    nondp_epoch_s: list[float]
    dp_epoch_s: list[float]
    nondp_call_s: list[float]
    dp_call_s: list[float]
    dp_path: str = ""  # train_local's grad_sample_mode for the DP calls: hooks, ghost, linear or bookkeeping

    @property
    def ratio(self) -> float:
        """Median DP epoch over median non-DP epoch (the training loop alone)."""
        return median(self.dp_epoch_s) / median(self.nondp_epoch_s)

    @property
    def call_ratio(self) -> float:
        """The same for the whole call, Opacus' make_private and the data loader included."""
        return median(self.dp_call_s) / median(self.nondp_call_s)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            median_nondp_epoch_s=median(self.nondp_epoch_s),
            median_dp_epoch_s=median(self.dp_epoch_s),
            ratio=self.ratio,
            median_nondp_call_s=median(self.nondp_call_s),
            median_dp_call_s=median(self.dp_call_s),
            call_ratio=self.call_ratio,
            min_ratio=min(self.dp_epoch_s) / min(self.nondp_epoch_s),
        )
        return d


def time_dp_vs_nondp(
    case: str,
    model_name: str,
    dataset: str,
    make_module: Callable[[], nn.Module],
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    epochs: int,
    repeats: int,
    backbone_lr_scale: float = 0.1,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    log: Log = print,
    dp_paths: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[TimingRow]:
    """Alternate non-DP and DP calls of ``train_local`` on a fresh module each time; keep every time.

    ``dp_paths``: row name -> extra ``train_local`` arguments of its DP calls (default ``{case: {}}``, the
    default path); every path is timed in each repeat against the same non-DP call, in an order that rotates
    (so drifting load on a shared machine hits each alike). A fresh module per call matters: Opacus leaves its
    hooks on a module it made private, which would slow any later non-DP call on the same module.
    """
    paths = dict(dp_paths or {case: {}})
    nondp_epoch: list[float] = []
    nondp_call: list[float] = []
    rows = {
        name: TimingRow(
            name,
            model_name,
            dataset,
            int(labels.shape[0]),
            batch_size,
            epochs,
            repeats,
            0,
            nondp_epoch,
            [],
            nondp_call,
            [],
        )
        for name in paths
    }
    calls: list[str | None] = [None, *paths]
    for rep in range(repeats):
        shift = rep % len(calls)
        for name in calls[shift:] + calls[:shift]:
            module = make_module()
            trainable = int(sum(p.numel() for p in module.parameters() if p.requires_grad))
            dp = name is not None
            t0 = time.perf_counter()
            result = train_local(
                module,
                inputs,
                labels,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                dp=dp,
                noise_multiplier=noise_multiplier if dp else 0.0,
                max_grad_norm=max_grad_norm,
                randomness=SeededRandomness(1000 + rep),
                backbone_lr_scale=backbone_lr_scale,
                **(paths[name] if name is not None else {}),
            )
            call = time.perf_counter() - t0
            if name is None:
                nondp_epoch.append(result.seconds / epochs)
                nondp_call.append(call)
            else:
                row = rows[name]
                row.trainable_params, row.dp_path = trainable, result.grad_sample_mode
                row.dp_epoch_s.append(result.seconds / epochs)
                row.dp_call_s.append(call)
        dp_text = ", ".join(f"{n} {r.dp_epoch_s[-1]:.4f}" for n, r in rows.items())
        log(f"  {case:8s} repeat {rep + 1}/{repeats}: non-DP {nondp_epoch[-1]:.4f} s/epoch, DP {dp_text} s/epoch")
    return list(rows.values())


#: Each case's DP rows (row name -> extra train_local arguments), in the order they print.
CASE_PATHS: dict[str, dict[str, dict[str, Any]]] = {
    "head": {"head": {"closed_form_linear": False}, "head-closed-form": {}},
    "full": {
        "full": {"closed_form_linear": False},
        "full-ghost": {"ghost_clipping": True, "closed_form_linear": False},
        "full-bookkeeping": {},
    },
    "partial": {"partial": {}},
}
ROW_NAMES = tuple(row for paths in CASE_PATHS.values() for row in paths)


def _picked(case: str, cases: Collection[str] | None) -> dict[str, dict[str, Any]]:
    return {row: kw for row, kw in CASE_PATHS[case].items() if cases is None or row in cases}


def timing_cases(
    plan: BenchPlan, prepared: Mapping[str, PreparedData], log: Log, cases: Collection[str] | None = None
) -> list[TimingRow]:
    """The timing rows; ``cases`` (row names of :data:`ROW_NAMES`, default all) picks which run."""
    rows: list[TimingRow] = []
    if _picked("head", cases):
        rows.extend(_head_case(plan, prepared, log, _picked("head", cases)))
    if _picked("full", cases):
        rows.extend(_full_case(plan, log, _picked("full", cases)))
    if _picked("partial", cases):
        rows.extend(_partial_case(plan, prepared, log))
    return rows


def _head_case(
    plan: BenchPlan, prepared: Mapping[str, PreparedData], log: Log, paths: Mapping[str, Mapping[str, Any]]
) -> list[TimingRow]:
    # head: the module the client trains in head mode is the head alone, on cached MiniLM features.
    sms = prepared["sms-spam"]
    cfg = sms.cfg
    feats, labels = sms.pooled_features, sms.pooled_labels
    log(f"[time] head: minilm features of {len(labels)} pooled sms-spam records, batch {cfg.batch_size}")
    return time_dp_vs_nondp(
        "head",
        cfg.model,
        cfg.dataset,
        lambda: new_head(feats.shape[1], len(cfg.label_names), cfg.seed),
        (feats,),
        labels,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        epochs=plan.head_timing_epochs,
        repeats=plan.timing_repeats,
        max_grad_norm=cfg.max_grad_norm,
        log=log,
        dp_paths=paths,
    )


def _full_case(plan: BenchPlan, log: Log, paths: Mapping[str, Mapping[str, Any]]) -> list[TimingRow]:
    # full: every weight of the digits CNN trains on the images.
    dcfg = base_config("digits", plan, overrides=False)  # text-preset overrides do not apply to the CNN
    pool, _ = central_split(dcfg)
    spec = get_model_spec(dcfg.model)
    images = encode(dcfg.model, pool, dcfg.max_length)
    dlabels = torch.as_tensor(pool.labels, dtype=torch.long)

    def full_cnn() -> nn.Module:
        model = spec.build(len(dcfg.label_names), dcfg.seed)
        configure_trainable(model, "full")
        return model

    log(f"[time] full: digits-cnn, {len(pool)} digits images, batch {dcfg.batch_size}")
    return time_dp_vs_nondp(
        "full",
        dcfg.model,
        dcfg.dataset,
        full_cnn,
        images,
        dlabels,
        batch_size=dcfg.batch_size,
        lr=dcfg.lr,
        epochs=1,
        repeats=plan.timing_repeats,
        backbone_lr_scale=dcfg.backbone_lr_scale,
        max_grad_norm=dcfg.max_grad_norm,
        log=log,
        dp_paths=paths,
    )


def _partial_case(plan: BenchPlan, prepared: Mapping[str, PreparedData], log: Log) -> list[TimingRow]:
    # partial: MiniLM's last encoder layer + head, tokens at the preset's length (what a client runs).
    tcfg = prepared["trec6"].cfg if "trec6" in prepared else base_config("trec6", plan)
    tpool, _ = central_split(tcfg)
    rng = np.random.default_rng(tcfg.seed)
    subset = tpool.subset(np.sort(rng.choice(len(tpool), size=min(plan.partial_records, len(tpool)), replace=False)))
    tokens = encode(tcfg.model, subset, tcfg.max_length)
    tlabels = torch.as_tensor(subset.labels, dtype=torch.long)
    tspec = get_model_spec(tcfg.model)

    def partial_minilm() -> nn.Module:
        model = tspec.build(len(tcfg.label_names), tcfg.seed)
        configure_trainable(model, "partial")
        return model

    log(
        f"[time] partial: minilm last layer + head, {len(subset)} trec6 records, length {tcfg.max_length}, "
        f"batch {tcfg.batch_size}"
    )
    return time_dp_vs_nondp(
        "partial",
        tcfg.model,
        tcfg.dataset,
        partial_minilm,
        tokens,
        tlabels,
        batch_size=tcfg.batch_size,
        lr=tcfg.lr,
        epochs=1,
        repeats=plan.partial_repeats,
        backbone_lr_scale=tcfg.backbone_lr_scale,
        max_grad_norm=tcfg.max_grad_norm,
        log=log,
    )
