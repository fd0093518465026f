"""The modes benchmark's plan: which mode settings, which privacy levels, what sizes; the run config of each cell.

Apart from the measurements so that the command line refuses a bad plan (an unknown setting, a misspelt override)
before any simulation starts, and so that the grid is testable without running anything.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from privatune.common.config import RunConfig
from privatune.common.models.modes import FINE_TUNING_MODES
from privatune.simulations.benchmarks.report import default_out

NAME = "modes"
DEFAULT_OUT = default_out(NAME)
PRESET = "trec6"
# The privacy levels: epsilon 1 and 8, and no DP (inf).
DEFAULT_EPSILONS: tuple[float, ...] = (1.0, 8.0, math.inf)


# What a preset-derived setting takes from its preset: how it trains, not which data.
PRESET_SETTING_KEYS = ("mode", "lr", "batch-size", "local-epochs", "num-server-rounds", "max-length")


def preset_setting(preset: str) -> dict[str, Any]:
    """The run-config values that train like the named preset (its mode and hyperparameters, resolved under DP).

    So a tuned preset (common/presets.py) is measured in the grid beside the other settings with one source for
    its values; the cell's own preset still picks the data."""
    values = RunConfig.create(preset=preset).to_flower()
    return {key: values[key] for key in PRESET_SETTING_KEYS}


# A mode setting: a name in the tables and the run-config values that make it. The mode's own defaults (its
# recommended hyperparameters) apply to everything a setting does not name. A setting whose mode this build
# does not have (FINE_TUNING_MODES) is left out of the default grid and refused when asked for by name.
MODE_SETTINGS: dict[str, dict[str, Any]] = {
    "head": {"mode": "head"},
    "partial": {"mode": "partial"},
    # The encoder modes' settings of the measured run (docs/benchmarks.md): the mode defaults were not yet wired.
    "last-k": {"mode": "last-k", "lr": 0.5, "batch-size": 32, "local-epochs": 2},
    "lora": {"mode": "lora", "lr": 1.0, "batch-size": 32, "local-epochs": 2},
    "ffa-lora": {"mode": "lora", "lr": 1.0, "batch-size": 32, "local-epochs": 2, "lora-freeze-a": True},
    # LoRA as the tuning runs left it: the trec6-lora preset's values.
    "lora-tuned": preset_setting("trec6-lora"),
    "full": {"mode": "full"},
}

# Keys the benchmark sets itself in every cell (an override may not change them).
FIXED_KEYS = frozenset({"preset", "dp", "target-epsilon", "partition", "alpha", "out-dir", "mode"})


def available_settings(modes: Sequence[str] = FINE_TUNING_MODES) -> tuple[str, ...]:
    """The settings whose mode exists in this build, in MODE_SETTINGS order."""
    return tuple(name for name, values in MODE_SETTINGS.items() if values["mode"] in modes)


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid: a mode setting at one privacy level."""

    setting: str
    epsilon: float  # inf = no DP
    preset: str = PRESET

    @property
    def dp(self) -> bool:
        return not math.isinf(self.epsilon)

    @property
    def mode(self) -> str:
        return str(MODE_SETTINGS[self.setting]["mode"])

    @property
    def tag(self) -> str:
        """The cell's folder name: ``<setting>-eps<epsilon>`` or ``<setting>-nodp``."""
        base = f"{self.setting}-eps{self.epsilon:g}" if self.dp else f"{self.setting}-nodp"
        return base if self.preset == PRESET else f"{self.preset}-{base}"

    @property
    def privacy(self) -> str:
        return f"eps={self.epsilon:g}" if self.dp else "no DP"


@dataclass(frozen=True)
class ModesPlan:
    """The grid (settings x epsilons) and the sizes every cell shares; the defaults are the issue's setting."""

    settings: tuple[str, ...] = field(default_factory=available_settings)
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    clients: int = 10
    alpha: float = 1.0
    rounds: int = 0  # 0 = the preset's
    local_epochs: int = 0  # 0 = the preset's
    max_records: int = 0  # 0 = the whole dataset
    max_length: int = 0  # 0 = the preset's (64 tokens); 32 truncates 0.3 % of TREC-6 questions
    preset: str = PRESET
    seed: int = 42
    client_cpus: float = 1.0
    overrides: Mapping[str, str] = field(default_factory=dict)
    quick: bool = False

    def cells(self) -> list[Cell]:
        """Every cell, setting by setting; within a setting no DP first, then epsilon from high to low."""
        order = sorted(self.epsilons, key=lambda e: (not math.isinf(e), -e))
        return [Cell(s, e, self.preset) for s in self.settings for e in order]

    def run_config(self, cell: Cell) -> dict[str, Any]:
        """The kebab-case run config of ``cell``: what ``privatune simulate`` would build for it.

        Later wins: the setting's values, then ``--run-config``'s overrides (so an override is never silently
        dropped for a key the setting names), then the grid's own keys and the plan's sizes."""
        values: dict[str, Any] = dict(MODE_SETTINGS[cell.setting])
        values.update(self.overrides)
        values.update(
            {
                "preset": cell.preset,
                "dp": cell.dp,
                "partition": "dirichlet",
                "alpha": self.alpha,
                "seed": self.seed,
            }
        )
        if cell.dp:
            values["target-epsilon"] = cell.epsilon
        if self.rounds:
            values["num-server-rounds"] = self.rounds
        if self.local_epochs:
            values["local-epochs"] = self.local_epochs
        if self.max_records:
            values["max-records"] = self.max_records
        if self.max_length:
            values["max-length"] = self.max_length
        return values

    def resolved(self, cell: Cell) -> RunConfig:
        """The cell's RunConfig, validated (an unknown or bad key raises ConfigError, a ValueError)."""
        return RunConfig.from_flower(self.run_config(cell))


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what}: give at least one value")
    return items


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"1,8,inf"`` -> (1.0, 8.0, inf); ``inf`` (or ``none``) is the no-DP run."""
    out: list[float] = []
    for item in parse_list(text, "epsilons"):
        if item.lower() in ("inf", "none", "nodp", "no-dp"):
            out.append(math.inf)
            continue
        try:
            eps = float(item)
        except ValueError:
            raise ValueError(f"--epsilons: {item!r} is not a number or 'inf' (e.g. --epsilons 1,8,inf)") from None
        if not eps > 0:
            raise ValueError(f"--epsilons: {item!r} must be > 0 (or 'inf' for no DP)")
        out.append(eps)
    if len(set(out)) != len(out):
        raise ValueError(f"--epsilons: {text!r} names a value twice")
    return tuple(out)


def parse_settings(text: str, modes: Sequence[str] = FINE_TUNING_MODES) -> tuple[str, ...]:
    """``"head,lora"`` -> the settings, each known and its mode built in."""
    names = parse_list(text, "modes")
    for name in names:
        if name not in MODE_SETTINGS:
            raise ValueError(f"--modes: unknown setting {name!r}; choose from {', '.join(MODE_SETTINGS)}")
        if MODE_SETTINGS[name]["mode"] not in modes:
            raise ValueError(
                f"--modes: {name!r} needs mode {MODE_SETTINGS[name]['mode']!r}, which this build does not have "
                f"(modes: {', '.join(modes)}); choose from {', '.join(available_settings(modes))}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"--modes: {text!r} names a setting twice")
    return tuple(names)


def parse_overrides(text: str) -> dict[str, str]:
    """``"lr=0.5 batch-size=128"`` -> dict (the syntax of ``--run-config``); the grid's own keys are refused."""
    out: dict[str, str] = {}
    for token in shlex.split(text or ""):
        key, sep, value = token.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f'--run-config: {token!r} is not key=value (e.g. "lr=0.5 batch-size=128")')
        out[key] = value.strip()
    clash = sorted(FIXED_KEYS & set(out))
    if clash:
        raise ValueError(f"--run-config: the benchmark sets {', '.join(clash)} itself; remove it from the overrides")
    return out


def checked_plan(plan: ModesPlan) -> ModesPlan:
    """``plan`` once every cell's run config has been built and validated (nothing runs before that)."""
    if plan.clients < 1:
        raise ValueError(f"--clients must be at least 1, got {plan.clients}")
    for n, what in ((plan.rounds, "rounds"), (plan.local_epochs, "local-epochs"), (plan.max_records, "max-records")):
        if n < 0:
            raise ValueError(f"--{what} must be >= 0 (0 = the preset's / all), got {n}")
    for cell in plan.cells():
        plan.resolved(cell)
    return plan


QUICK = {"clients": 3, "rounds": 2, "local_epochs": 1, "max_records": 600}
