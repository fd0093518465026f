"""The audit's one figure, ``epsilon_per_round.png``: recomputed epsilons per round, per site (or client) and run.

Separate from the text renderings because it is the only part that needs matplotlib (imported when called, with no
pyplot global state).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from privatune.common.audit.report import SERVER, SITE, AuditEntry, AuditReport
from privatune.common.audit.values import num

PLOT_NAME = "epsilon_per_round.png"
_PLOT_CAP = 1e6  # where an infinite epsilon (no noise) is drawn


def plot_epsilons(report: AuditReport, path: Path) -> None:
    """Write the figure: the run epsilon after each round and, for sites, the dataset epsilon and its budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    site = [e for e in report.entries if e.source == SITE and e.epsilon_recomputed is not None]
    rows = site or [e for e in report.entries if e.source == SERVER and e.epsilon_recomputed is not None]
    runs = sorted({e.run_id for e in rows})
    panels = 2 if site else 1
    fig = Figure(figsize=(7 * panels, 4.5))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    series: dict[tuple[str, str], list[AuditEntry]] = defaultdict(list)
    for e in rows:
        series[(e.party, e.run_id)].append(e)
    for (party, run_id), pts in sorted(series.items()):
        label = party if len(runs) == 1 else f"{party} · {run_id}"
        pts = sorted(pts, key=lambda e: (e.round, e.seq))
        # an infinite epsilon (no noise) is drawn at the top of the axis rather than dropped
        run = [(e.round, min(x, _PLOT_CAP)) for e in pts if (x := e.epsilon_recomputed) is not None]  # all of pts
        axes[0].plot([x for x, _ in run], [y for _, y in run], marker="o", label=label)
        if site:
            data = [(e.round, min(e.epsilon_dataset, _PLOT_CAP)) for e in pts if e.epsilon_dataset is not None]
            axes[1].plot([x for x, _ in data], [y for _, y in data], marker="o", label=label)
    axes[0].set_title("epsilon of the run after each round (recomputed)")
    if site:
        axes[1].set_title("epsilon of the dataset, all runs (recomputed)")
        budgets = sorted({b for e in site if (b := num(e.max_epsilon)) is not None})
        for b in budgets:
            axes[1].axhline(b, linestyle="--", color="red", linewidth=1)
            axes[1].annotate(
                f"max-epsilon {b:g}",
                (0.01, b),
                xycoords=("axes fraction", "data"),
                color="red",
                fontsize=8,
                va="bottom",
            )
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("epsilon")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no trained rounds", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
