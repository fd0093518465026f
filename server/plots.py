"""The run's picture: accuracy and epsilon per round, and how many rounds each client trained (people read a curve
faster than a table; with client sampling the participation panel shows who sat rounds out)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privatune.common.protocol import KEY_CENTRAL_ACCURACY, KEY_CENTRAL_MACRO_F1, KEY_EPSILON, KEY_FED_ACCURACY
from privatune.server.run_record import RoundReport


def plot_rounds(
    rounds: Sequence[RoundReport], path: Path, title: str = "", target_epsilon: float | None = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_eps, ax_part) = plt.subplots(1, 3, figsize=(16, 4))
    xs_c = [r.round for r in rounds if r.central]
    if xs_c:
        ax_acc.plot(
            xs_c, [r.central[KEY_CENTRAL_ACCURACY] for r in rounds if r.central], "o-", label="central test accuracy"
        )
        ax_acc.plot(
            xs_c, [r.central[KEY_CENTRAL_MACRO_F1] for r in rounds if r.central], "s--", label="central test macro-F1"
        )
    xs_f = [r.round for r in rounds if r.federated]
    if xs_f:
        ax_acc.plot(
            xs_f,
            [r.federated.get(KEY_FED_ACCURACY, float("nan")) for r in rounds if r.federated],
            "^-",
            label="federated validation accuracy (DP-noised)",
        )
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("score")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_acc.set_title("global model")
    clients = sorted({c for r in rounds for c in r.clients})
    for cid in clients:
        pts = [(r.round, r.clients[cid].get(KEY_EPSILON)) for r in rounds if cid in r.clients]
        pts = [(x, y) for x, y in pts if isinstance(y, float) and y != float("inf")]
        if pts:
            ax_eps.plot([p[0] for p in pts], [p[1] for p in pts], ".-", alpha=0.7, label=cid)
    if target_epsilon is not None and target_epsilon != float("inf"):
        ax_eps.axhline(target_epsilon, color="black", linestyle=":", linewidth=1, label="target")
    ax_eps.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    plot_participation(ax_part, rounds)
    for ax in (ax_acc, ax_eps, ax_part):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_eps.set_xlabel("round")
    ax_eps.set_ylabel("epsilon spent (composed over rounds)")
    ax_eps.grid(alpha=0.3)
    ax_eps.set_title("privacy spend per client")
    if 0 < len(clients) <= 12:
        ax_eps.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rounds_trained(rounds: Sequence[RoundReport]) -> dict[str, int]:
    """Client id -> how many rounds it trained (an update rejected by screening was trained, and spent, too), as
    summary.json's ``participation`` counts them."""
    counts: dict[str, int] = {}
    for r in rounds:
        for cid in {*r.clients, *r.rejected_spends}:
            counts[cid] = counts.get(cid, 0) + 1
    return counts


def plot_participation(ax: Any, rounds: Sequence[RoundReport]) -> None:
    """A histogram of the rounds each client trained (clients never sampled are not known here, so not shown)."""
    counts = sorted(rounds_trained(rounds).values())
    ax.set_title("participation: rounds trained per client")
    ax.set_xlabel("rounds trained")
    ax.set_ylabel("clients")
    ax.grid(alpha=0.3)
    if not counts:
        ax.text(0.5, 0.5, "no client trained", ha="center", va="center", transform=ax.transAxes)
        return
    edges = [x - 0.5 for x in range(counts[0], counts[-1] + 2)]
    ax.hist(counts, bins=edges, color="tab:green", alpha=0.8)
    median = statistics.median(counts)
    ax.text(
        0.98,
        0.95,
        f"{len(counts)} clients trained\nmin {counts[0]}, median {median:g}, max {counts[-1]}",
        ha="right",
        va="top",
        fontsize=8,
        transform=ax.transAxes,
    )
