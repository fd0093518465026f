"""The modes benchmark's tables (accuracy per cell, DP vs non-DP cost) and its plot (accuracy vs epsilon per mode).

Pure over the results dict (the plot aside), so the tables are tested without running a federation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from privatune.simulations.benchmarks.report import fmt_eps, fmt_num, fmt_pct, markdown_table, ratio

ACCURACY_HEADERS = (
    "cell",
    "privacy",
    "accuracy %",
    "macro-F1 %",
    "max client epsilon",
    "s / local epoch (all sites)",
    "client peak MiB",
    "wall s",
)


def accuracy_rows(cells: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for c in cells:
        peak = c.get("client_peak_kib")
        rows.append(
            [
                str(c["tag"]),
                str(c["privacy"]),
                fmt_pct(c.get("accuracy")),
                fmt_pct(c.get("macro_f1")),
                fmt_eps(c.get("max_client_epsilon")) if c.get("dp") else "-",
                fmt_num(c.get("epoch_seconds")),
                fmt_num(peak / 1024 if peak else None, ".0f"),
                fmt_num(c.get("wall_seconds"), ".0f"),
            ]
        )
    return rows


def cost_rows(cells: Sequence[Mapping[str, Any]], settings: Sequence[str], epsilon: float = 8.0) -> list[list[str]]:
    """DP (at ``epsilon``) over non-DP time per local epoch and client peak memory, per setting run both ways."""
    by = {(c["setting"], c["epsilon"]): c for c in cells}
    rows = []
    for s in settings:
        dp, nodp = by.get((s, epsilon)), by.get((s, math.inf))
        if not dp or not nodp:
            continue
        t = ratio(float(dp.get("epoch_seconds") or math.nan), float(nodp.get("epoch_seconds") or math.nan))
        m = ratio(float(dp.get("client_peak_kib") or math.nan), float(nodp.get("client_peak_kib") or math.nan))
        rows.append([s, f"{epsilon:g}", fmt_num(t) + "x", fmt_num(m) + "x"])
    return rows


def render(result: Mapping[str, Any]) -> str:
    cells = result["cells"]
    out = [markdown_table(ACCURACY_HEADERS, accuracy_rows(cells))]
    settings = list(dict.fromkeys(c["setting"] for c in cells))
    cost = cost_rows(cells, settings)
    if cost:
        out.append(
            markdown_table(("setting", "DP epsilon", "time / epoch DP / non-DP", "peak memory DP / non-DP"), cost)
        )
    return "\n\n".join(out)


def plot(cells: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Accuracy vs privacy level, one line per setting (x: epsilon 1, 8, then no DP)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    levels = sorted({float(c["epsilon"]) for c in cells})
    xs = {e: i for i, e in enumerate(levels)}
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in dict.fromkeys(c["setting"] for c in cells):
        pts = sorted(
            (xs[float(c["epsilon"])], 100 * c["accuracy"])
            for c in cells
            if c["setting"] == s and c.get("accuracy") is not None
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
    ax.set_xticks(range(len(levels)), [("no DP" if math.isinf(e) else f"eps {e:g}") for e in levels])
    ax.set_ylabel("test accuracy %")
    ax.set_title("privatune modes benchmark")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return path
