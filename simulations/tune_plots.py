"""Optuna's own plots of a tuning study (optimisation history, parameter importances, parallel coordinates)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_plots(study: Any, folder: Path) -> dict[str, str]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNGs (name -> file, or
    why it was skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out: dict[str, str] = {}
    plots: dict[str, Callable[[Any], Any]] = {
        "optimization-history": ovm.plot_optimization_history,
        "param-importances": ovm.plot_param_importances,
        "parallel-coordinate": ovm.plot_parallel_coordinate,
    }
    for name, plot in plots.items():
        path = folder / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            out[name] = str(path)
        except Exception as err:  # a plot needs enough finished trials (importances: two or more)
            out[name] = f"skipped: {type(err).__name__}: {err}"
            plt.close("all")
    return out
