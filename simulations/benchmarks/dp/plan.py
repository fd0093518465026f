"""The DP benchmark's plan: what one invocation measures, and the run config every measurement shares.

Apart from the measurements so that the command line can refuse a bad plan before any model loads.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from privatune.common.config import RunConfig
from privatune.simulations.benchmarks.report import default_out

ACCURACY_PRESETS = ("sms-spam", "trec6")
FED_EPSILONS: tuple[float, ...] = (1.0, 8.0)
GOAL_PRESET, GOAL_EPSILON, GOAL_POINTS = "sms-spam", 8.0, 2.0
DEFAULT_OUT = default_out("dp")


@dataclass(frozen=True)
class BenchPlan:
    """Sizes of the benchmark; ``quick`` is a smoke run of the same pipeline, not a source of figures."""

    quick: bool = False
    clients: int = 10
    alpha: float = 1.0
    rounds: int = 0  # 0 = the preset's default rounds
    max_records: int = 0  # 0 = whole datasets
    timing_repeats: int = 5
    head_timing_epochs: int = 5  # per call; a head epoch on cached features is a few ms
    partial_records: int = 128
    partial_repeats: int = 3
    timing_threads: int = 1  # a simulated client's torch threads: Ray sets OMP_NUM_THREADS to its 1 CPU
    overrides: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool, overrides: Mapping[str, str], threads: int = 1) -> BenchPlan:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        if quick:
            return cls(
                quick=True,
                clients=3,
                rounds=2,
                max_records=600,
                timing_repeats=2,
                head_timing_epochs=2,
                partial_records=64,
                partial_repeats=1,
                timing_threads=threads,
                overrides=dict(overrides),
            )
        return cls(timing_threads=threads, overrides=dict(overrides))


def parse_overrides(text: str) -> dict[str, str]:
    """``"lr=1.0 local-epochs=3"`` -> dict, the syntax of ``--run-config``; each key is checked by RunConfig."""
    out: dict[str, str] = {}
    for token in shlex.split(text or ""):
        if "=" not in token:
            raise ValueError(f'--run-config: {token!r} is not key=value (e.g. "lr=1.0 batch-size=128")')
        key, value = token.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--run-config: {token!r} has an empty key")
        out[key] = value.strip().strip('"').strip("'")
    fixed = {"dp", "target-epsilon", "mode", "partition", "alpha", "preset", "out-dir"}
    clash = sorted(fixed & set(out))
    if clash:
        raise ValueError(f"--run-config: the benchmark sets {', '.join(clash)} itself; remove it from the overrides")
    return out


def base_config(preset: str, plan: BenchPlan, overrides: bool = True) -> RunConfig:
    """The run config every measurement of ``preset`` shares: head mode, Dirichlet(alpha), the overrides.

    Built through ``RunConfig.from_flower`` so a misspelt override key is refused, not ignored.
    """
    values: dict[str, Any] = {k.replace("_", "-"): v for k, v in plan.overrides.items()} if overrides else {}
    values.update({"preset": preset, "mode": "head", "partition": "dirichlet", "alpha": plan.alpha})
    if plan.rounds:
        values["num-server-rounds"] = plan.rounds
    if plan.max_records:
        values["max-records"] = plan.max_records
    return RunConfig.from_flower(values)


def checked_plan(quick: bool, overrides: Mapping[str, str], threads: int = 1) -> BenchPlan:
    """The plan, with every preset's run config built once so that a bad override is refused before any model loads."""
    plan = BenchPlan.make(quick, overrides, threads)
    for preset in ACCURACY_PRESETS:
        base_config(preset, plan)
    return plan
