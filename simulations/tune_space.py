"""A tuning study's search space: which run-config keys vary, over what, read from a TOML file or the command line.

Every key is a run-config key (common/config.py RunConfig) and takes that key's type: a float or int key may take
a range (``[lr] low = 1e-3  high = 1  log = true``, or ``--param lr=1e-3:1:log``) or a list of choices, any key
a list of choices (``[mode] choices = ["head", "lora"]``, or ``--param mode=head,lora``).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from privatune.common.config import ConfigError, RunConfig, _coerce

# Keys a study sets for each trial itself (where it writes, which ledgers): never part of a search space.
STUDY_KEYS = ("out-dir", "sim-ledger-dir", "run-name")
RANGE_KEYS = {"low", "high", "log", "step"}


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the key (and file) and the fix."""


@dataclass(frozen=True)
class Param:
    """One searched run-config key: a range (``low``..``high``) or ``choices``."""

    key: str  # the run-config key, kebab-case
    kind: str  # float | int | str | bool (the RunConfig field's type)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @property
    def is_range(self) -> bool:
        return not self.choices

    def grid(self) -> list[Any]:
        """The values a grid search tries: the choices, or every value of an int range."""
        if self.choices:
            return list(self.choices)
        if self.kind == "int" and self.low is not None and self.high is not None:
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        raise SpaceError(
            f"{self.key}: the grid sampler needs a finite set of values; give choices (--param "
            f"{self.key}=a,b,c or [{self.key}] choices = [...]) or use --sampler random|tpe|gp"
        )

    def suggest(self, trial: Any) -> Any:
        """This key's value for an Optuna trial."""
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.choices:
            return f"{self.key} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.key} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "")


def _field_types() -> dict[str, str]:
    return {f.name.replace("_", "-"): str(f.type) for f in fields(RunConfig)}


def _typed(key: str, kind: str, value: Any, where: str) -> Any:
    try:
        return _coerce(key, kind, value.strip() if isinstance(value, str) else value)
    except ConfigError:
        raise SpaceError(f"{where}{key}: cannot read {value!r} as {kind}") from None


def make_param(key: str, spec: dict[str, Any], where: str = "") -> Param:
    """Check one key's spec (``low``/``high``/``log``/``step`` or ``choices``) against its run-config type."""
    types = _field_types()
    if key in STUDY_KEYS:
        raise SpaceError(f"{where}{key}: the study sets it for every trial; it cannot be searched")
    if key not in types:
        near = sorted(k for k in types if k.split("-")[0] == key.split("-")[0])
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise SpaceError(f"{where}{key}: not a run-config key{hint}; see pyproject.toml [tool.flwr.app.config]")
    kind = types[key]
    unknown = sorted(set(spec) - RANGE_KEYS - {"choices"})
    if unknown:
        raise SpaceError(f"{where}{key}: unknown field(s) {', '.join(unknown)}; give low/high (log, step) or choices")
    if "choices" in spec:
        if set(spec) & RANGE_KEYS:
            raise SpaceError(f"{where}{key}: give either choices or low/high, not both")
        raw = spec["choices"]
        if not isinstance(raw, (list, tuple)) or not raw:
            raise SpaceError(f"{where}{key}: choices must be a non-empty list, e.g. choices = [16, 32, 64]")
        choices = tuple(dict.fromkeys(_typed(key, kind, v, where) for v in raw))
        return Param(key, kind, choices=choices)
    if kind not in ("float", "int"):
        raise SpaceError(f'{where}{key}: a {kind} key takes choices, not a range (e.g. choices = ["a", "b"])')
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}{key}: a range needs both low and high (or give choices)")
    low, high = (_typed(key, kind, spec[b], where) for b in ("low", "high"))
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise SpaceError(f"{where}{key}: low must be below high and both finite, got low={low} high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}{key}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise SpaceError(f"{where}{key}: a log range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _typed(key, kind, step, where)
        if step <= 0 or log:
            raise SpaceError(f"{where}{key}: step must be > 0 and cannot go with log=true")
    return Param(key, kind, float(low), float(high), log, None if step is None else float(step))


def space_from_toml(path: Path) -> list[Param]:
    """``--space FILE``: one table per key (``[lr]`` with ``low``, ``high``, ``log`` or ``choices``)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise SpaceError(f"--space {path}: cannot read it ({err.strerror or err})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpaceError(f"--space {path}: not valid TOML ({err})") from None
    out = []
    for key, spec in data.items():
        if not isinstance(spec, dict):
            raise SpaceError(
                f"--space {path}: {key}: write a table per key, e.g. [{key}] then low = ... high = ... or "
                "choices = [...]"
            )
        out.append(make_param(key, spec, where=f"--space {path}: "))
    return out


def param_from_cli(text: str) -> Param:
    """``--param KEY=LOW:HIGH[:log]`` (a range) or ``--param KEY=A,B,C`` (choices; one value fixes the key)."""
    key, eq, value = text.partition("=")
    key, value = key.strip(), value.strip()
    where = f"--param {text}: "
    if not eq or not key or not value:
        raise SpaceError(f"{where}write KEY=LOW:HIGH[:log] or KEY=A,B,C, e.g. --param lr=1e-3:1:log")
    if ":" in value:
        parts = [p.strip() for p in value.split(":")]
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise SpaceError(f"{where}a range is LOW:HIGH or LOW:HIGH:log, e.g. lr=1e-3:1:log")
        return make_param(key, {"low": parts[0], "high": parts[1], "log": len(parts) == 3}, where=where)
    return make_param(key, {"choices": [v.strip() for v in value.split(",")]}, where=where)


def build_space(space_file: Path | None, cli_params: list[str]) -> list[Param]:
    """The file's keys, then the command line's; a key given twice is refused (say which one wins instead)."""
    params = space_from_toml(space_file) if space_file is not None else []
    params += [param_from_cli(p) for p in cli_params]
    seen: set[str] = set()
    for p in params:
        if p.key in seen:
            raise SpaceError(f"{p.key}: searched twice (in --space and --param, or two --param); give it once")
        seen.add(p.key)
    if not params:
        raise SpaceError("the search space is empty: give --space FILE or --param KEY=LOW:HIGH (e.g. lr=1e-3:1:log)")
    return params


def grid_space(params: list[Param]) -> dict[str, list[Any]]:
    """Optuna's GridSampler search space; its size is the number of trials a full grid takes."""
    return {p.key: p.grid() for p in params}
