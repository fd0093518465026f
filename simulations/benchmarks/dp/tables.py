"""The DP benchmark's printed tables and the goal verdict (pure: rows in, text out)."""

from __future__ import annotations

from collections.abc import Sequence

from privatune.simulations.benchmarks.dp.accuracy import AccuracyRow
from privatune.simulations.benchmarks.dp.plan import GOAL_EPSILON, GOAL_POINTS, GOAL_PRESET
from privatune.simulations.benchmarks.dp.timing import TimingRow
from privatune.simulations.benchmarks.report import fmt_eps, fmt_pct, fmt_points, markdown_table, median


def timing_table(rows: Sequence[TimingRow]) -> str:
    return markdown_table(
        [
            "case",
            "DP path",
            "model / data",
            "records",
            "batch",
            "trainable params",
            "non-DP s/epoch",
            "DP s/epoch",
            "DP / non-DP",
            "per call incl. setup",
        ],
        [
            [
                r.case,
                r.dp_path or "-",
                f"{r.model} / {r.dataset}",
                str(r.records),
                str(r.batch_size),
                f"{r.trainable_params:,}",
                f"{median(r.nondp_epoch_s):.4f}",
                f"{median(r.dp_epoch_s):.4f}",
                f"{r.ratio:.2f}x",
                f"{r.call_ratio:.2f}x",
            ]
            for r in rows
        ],
    )


def accuracy_table(rows: Sequence[AccuracyRow]) -> str:
    return markdown_table(
        ["preset", "setting", "accuracy %", "macro-F1 %", "gap acc (pts)", "gap F1 (pts)", "max client eps", "s"],
        [
            [
                r.preset,
                r.label,
                fmt_pct(r.accuracy),
                fmt_pct(r.macro_f1),
                fmt_points(r.gap_accuracy_pts),
                fmt_points(r.gap_macro_f1_pts),
                fmt_eps(r.max_client_epsilon) if r.setting == "federated" and r.dp else "-",
                f"{r.seconds:.0f}" + (" FAILED (see JSON)" if r.error else ""),
            ]
            for r in rows
        ],
    )


def goal_line(rows: Sequence[AccuracyRow]) -> str:
    """The issue's goal: at epsilon 8, SMS Spam federated accuracy within 2 points of centralised."""
    for r in rows:
        if r.preset == GOAL_PRESET and r.setting == "federated" and r.dp and r.epsilon == GOAL_EPSILON:
            if r.error:
                return f"goal: not measured, the {GOAL_PRESET} run at eps={GOAL_EPSILON:g} failed ({r.error})"
            gap = r.gap_accuracy_pts or 0.0
            met = gap >= -GOAL_POINTS
            return (
                f"goal: {GOAL_PRESET} federated at eps={GOAL_EPSILON:g} within {GOAL_POINTS:g} points of the "
                f"centralised non-DP head: {'MET' if met else 'NOT MET'} (gap {gap:+.2f} points)"
            )
    return "goal: not measured in this run"
