"""Part 2 of the DP benchmark: federated accuracy at each epsilon against centralised heads.

The federated runs go through the real ServerApp/ClientApp; the accounting benchmark reuses ``federated_run``.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from privatune.client.randomness import SeededRandomness
from privatune.client.training import train_local
from privatune.common.accounting import calibrate_noise, default_delta, sample_rate, steps_per_epoch
from privatune.common.evaluation import evaluate
from privatune.common.models import new_head
from privatune.simulations.benchmarks.dp.data import PreparedData
from privatune.simulations.benchmarks.dp.plan import FED_EPSILONS, BenchPlan
from privatune.simulations.benchmarks.report import Log, fmt_pct, gap_points


@dataclass
class AccuracyRow:
    preset: str
    setting: str  # "central" | "federated"
    dp: bool
    epsilon: float  # the target (inf without DP)
    accuracy: float
    macro_f1: float
    gap_accuracy_pts: float | None = None  # vs the centralised non-DP head
    gap_macro_f1_pts: float | None = None
    max_client_epsilon: float | None = None  # federated: the largest composed epsilon any client reported
    noise_multiplier: float | None = None  # central DP: the calibrated noise
    seconds: float = 0.0
    rounds_completed: int | None = None
    out_dir: str = ""
    error: str = ""  # a federated run that failed: why (the benchmark goes on with the others)

    @property
    def label(self) -> str:
        privacy = f"DP eps={self.epsilon:g}" if self.dp else "no DP"
        return f"{self.setting}, {privacy}"


def central_head(data: PreparedData, *, dp: bool, epsilon: float = math.inf) -> AccuracyRow:
    """The head trained on the pooled client data for rounds x local-epochs epochs, tested centrally."""
    cfg = data.cfg
    epochs = cfg.num_server_rounds * cfg.local_epochs
    n = int(data.pooled_labels.shape[0])
    noise = 0.0
    if dp:
        noise = calibrate_noise(
            epsilon,
            default_delta(n),
            sample_rate(n, cfg.batch_size),
            steps_per_epoch(n, cfg.batch_size) * epochs,
            cfg.accountant,
        )
    # The same initial head as the federation's global model (the server builds it with cfg.seed).
    head = new_head(data.pooled_features.shape[1], len(cfg.label_names), cfg.seed)
    t0 = time.perf_counter()
    train_local(
        head,
        (data.pooled_features,),
        data.pooled_labels,
        epochs=epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        dp=dp,
        noise_multiplier=noise,
        max_grad_norm=cfg.max_grad_norm,
        randomness=SeededRandomness(cfg.seed),
    )
    seconds = time.perf_counter() - t0
    res = evaluate(head, (data.test_features,), data.test_labels, num_classes=len(cfg.label_names))
    return AccuracyRow(
        preset=cfg.preset,
        setting="central",
        dp=dp,
        epsilon=epsilon if dp else math.inf,
        accuracy=res.accuracy,
        macro_f1=res.macro_f1,
        noise_multiplier=noise if dp else None,
        seconds=seconds,
    )


def federated_run(
    data: PreparedData, plan: BenchPlan, runs_dir: Path, *, dp: bool, epsilon: float, log: Log
) -> AccuracyRow:
    """One simulation through the real ServerApp/ClientApp; the feature cache is seeded first."""
    from privatune.simulations.simulate import run_simulation

    tag = f"eps{epsilon:g}" if dp else "nodp"
    out = runs_dir / f"{data.cfg.preset}-{tag}"
    if out.exists():
        shutil.rmtree(out)  # a fresh ledger: an old run's spend must not block this one
    cfg = replace(
        data.cfg,
        dp=dp,
        target_epsilon=epsilon if dp else data.cfg.target_epsilon,
        cache_dir=str(data.cache_dir.resolve()),
    )
    cfg = cfg.resolved()

    def observer(report: Any) -> None:
        acc = report.central.get("accuracy") if report.central else None
        eps = [r.get("epsilon") for r in report.clients.values() if isinstance(r.get("epsilon"), float)]
        parts = [f"    round {report.round}/{cfg.num_server_rounds}"]
        if report.round:
            parts.append(f"{len(report.clients)} trained")
        if report.dropped:
            parts.append(f"{len(report.dropped)} not aggregated")
        if acc is not None:
            parts.append(f"test acc {100 * acc:.2f}")
        if eps and dp:
            parts.append(f"max eps {max(eps):.3f}")
        log(" | ".join(parts))

    log(
        f"[fed] {cfg.preset}, {'DP eps=' + format(epsilon, 'g') if dp else 'no DP'}: {plan.clients} clients, "
        f"{cfg.num_server_rounds} rounds x {cfg.local_epochs} local epochs, batch {cfg.batch_size}, lr {cfg.lr:g}"
    )
    t0 = time.perf_counter()
    try:
        summary = run_simulation(cfg, plan.clients, out, observer=observer)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        log(f"  [error] this run failed, the benchmark goes on: {reason}")
        return AccuracyRow(
            preset=cfg.preset,
            setting="federated",
            dp=dp,
            epsilon=epsilon if dp else math.inf,
            accuracy=math.nan,
            macro_f1=math.nan,
            seconds=time.perf_counter() - t0,
            out_dir=str(out),
            error=reason,
        )
    seconds = time.perf_counter() - t0
    eps_values = [float(v) for v in (summary.get("per_client_epsilon") or {}).values()]
    if summary.get("rounds_completed") != cfg.num_server_rounds:
        log(
            f"  [warn] only {summary.get('rounds_completed')} of {cfg.num_server_rounds} rounds completed: "
            f"{summary.get('stopped_reason', '')}"
        )
    return AccuracyRow(
        preset=cfg.preset,
        setting="federated",
        dp=dp,
        epsilon=epsilon if dp else math.inf,
        accuracy=float(summary["test_accuracy"]),
        macro_f1=float(summary["test_macro_f1"]),
        max_client_epsilon=max(eps_values) if (dp and eps_values) else None,
        seconds=seconds,
        rounds_completed=int(summary.get("rounds_completed", 0)),
        out_dir=str(out),
    )


def accuracy_rows(data: PreparedData, plan: BenchPlan, runs_dir: Path, log: Log) -> list[AccuracyRow]:
    baseline = central_head(data, dp=False)
    log(
        f"[central] {data.cfg.preset}, no DP: accuracy {fmt_pct(baseline.accuracy)} %, macro-F1 {fmt_pct(baseline.macro_f1)}"
    )
    rows = [baseline]
    for eps in FED_EPSILONS:
        row = central_head(data, dp=True, epsilon=eps)
        log(
            f"[central] {data.cfg.preset}, DP eps={eps:g}: accuracy {fmt_pct(row.accuracy)} %, noise {row.noise_multiplier:.3f}"
        )
        rows.append(row)
    rows.append(federated_run(data, plan, runs_dir, dp=False, epsilon=math.inf, log=log))
    for eps in sorted(FED_EPSILONS, reverse=True):
        rows.append(federated_run(data, plan, runs_dir, dp=True, epsilon=eps, log=log))
    for row in rows[1:]:
        if row.error:
            continue
        row.gap_accuracy_pts = gap_points(row.accuracy, baseline.accuracy)
        row.gap_macro_f1_pts = gap_points(row.macro_f1, baseline.macro_f1)
    return rows
