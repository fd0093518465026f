"""DP fine-tuning benchmark: what DP-SGD costs in time, and what DP plus federation cost in accuracy.

    python -m privatune.simulations.benchmarks.dp             # the full benchmark (~30 min on a shared 2-core machine)
    python -m privatune.simulations.benchmarks.dp --quick     # smoke run of the same pipeline (~5 min; not for figures)
    python -m privatune.simulations.benchmarks.dp --out DIR --run-config "lr=1.0 local-epochs=3"
    python -m privatune.simulations.benchmarks.dp --timing-only  # part 1 alone (a few minutes)
    python -m privatune.simulations.benchmarks.dp --timing-only --cases full,full-ghost,full-bookkeeping  # the CNN

Everything is measured in the same process, in one run:

1. **Time**: DP vs non-DP local-epoch time through :func:`privatune.client.training.train_local`, same data, same
   batch size, same module, repeated with DP and non-DP calls interleaved (so drifting load on a shared
   machine hits both alike); medians. Cases: ``head`` (MiniLM features cached, only the head trains),
   ``full`` (the whole digits CNN) and ``partial`` (MiniLM's last encoder layer + head on a small subset); the
   head through Opacus and in closed form (``head-closed-form``), the CNN with Opacus' hooks, ghost clipping and
   book-keeping (``full-bookkeeping``, client/bookkeeping_dp.py).
2. **Accuracy**: federated runs through :func:`privatune.simulations.simulate.run_simulation` (Flower + Ray, the real
   path) at epsilon 1, epsilon 8 and without DP, against a centralised non-DP head trained on the pooled
   client training data (same features, same lr and batch size, rounds x local-epochs epochs) and tested
   on the same central test split. Centralised DP heads at the same epsilons are shown for reference, so a
   gap can be split into what DP costs and what federation costs.

The backbone features are computed once here and copied into each run's feature cache (``DIR/runs/*/cache``,
keyed by model, length and data fingerprint, exactly what the clients would compute themselves), so the
federated runs skip the MiniLM forward passes; their accuracy is unchanged by this.

Results go to ``DIR/bench_dp.json`` (default DIR: ``<tmp>/privatune-bench-dp``).

The package: ``plan`` (sizes, run config), ``data`` (features once), ``timing`` (part 1), ``accuracy``
(part 2), ``tables`` (printing), ``bench`` (one run end to end, the command line).
"""

from privatune.simulations.benchmarks.dp.accuracy import AccuracyRow, accuracy_rows, central_head, federated_run
from privatune.simulations.benchmarks.dp.bench import main, run
from privatune.simulations.benchmarks.dp.data import PreparedData, prepare_data
from privatune.simulations.benchmarks.dp.plan import (
    ACCURACY_PRESETS,
    DEFAULT_OUT,
    FED_EPSILONS,
    GOAL_EPSILON,
    GOAL_POINTS,
    GOAL_PRESET,
    BenchPlan,
    base_config,
    checked_plan,
    parse_overrides,
)
from privatune.simulations.benchmarks.dp.tables import accuracy_table, goal_line, timing_table
from privatune.simulations.benchmarks.dp.timing import TimingRow, time_dp_vs_nondp, timing_cases
from privatune.simulations.benchmarks.report import gap_points, median

__all__ = [
    "ACCURACY_PRESETS",
    "DEFAULT_OUT",
    "FED_EPSILONS",
    "GOAL_EPSILON",
    "GOAL_POINTS",
    "GOAL_PRESET",
    "AccuracyRow",
    "BenchPlan",
    "PreparedData",
    "TimingRow",
    "accuracy_rows",
    "accuracy_table",
    "base_config",
    "central_head",
    "checked_plan",
    "federated_run",
    "gap_points",
    "goal_line",
    "main",
    "median",
    "parse_overrides",
    "prepare_data",
    "run",
    "time_dp_vs_nondp",
    "timing_cases",
    "timing_table",
]
