"""What every benchmark shares: the run header, tables, number formats, JSON output and the common flags.

Separate from the benchmarks so that each of them holds only its plan and its measurements, and so that a
figure is written, formatted and reproduced the same way by all of them (the audits write their ``--json``
through :func:`write_json` too).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

PACKAGE = "privatune.simulations.benchmarks"
Log = Callable[[str], None]
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# The run: command, header, output folder, log
# --------------------------------------------------------------------------------------------------


def prog(name: str) -> str:
    """How a benchmark is started: ``python -m privatune.simulations.benchmarks.<name>``."""
    return f"python -m {PACKAGE}.{name}"


def command(name: str) -> str:
    """The command line that reproduces this run (the arguments of this process, shell-quoted)."""
    return prog(name) + " " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def default_out(name: str) -> Path:
    """A benchmark's default results folder, ``<tmp>/privatune-bench-<name>``."""
    return Path(tempfile.gettempdir()) / f"privatune-bench-{name}"


def environment(*packages: str, **extra: Any) -> dict[str, Any]:
    """Machine facts: Python, the versions of ``packages``, CPUs, architecture, and any ``extra`` facts."""
    facts: dict[str, Any] = {"python": platform.python_version()}
    for name in packages:
        facts[name] = importlib.import_module(name).__version__
    facts.update(cpus=os.cpu_count(), machine=platform.machine())
    facts.update(extra)
    return facts


def run_header(name: str, plan: Any, env: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every results file opens with: command, start time, the plan (a dataclass) and the machine."""
    return {
        "command": command(name),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": asdict(plan),
        "environment": dict(env),
    }


def load_average() -> list[float]:
    return list(os.getloadavg())


def results_folder(out: Path) -> Path:
    """``out`` made absolute and created."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def print_flush(line: str) -> None:
    """The log of a benchmark run from the command line: each line at once (runs last minutes)."""
    print(line, flush=True)


# --------------------------------------------------------------------------------------------------
# Command-line flags
# --------------------------------------------------------------------------------------------------


def bench_parser(name: str, description: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its ``python -m`` name, its description and the common flags."""
    parser = argparse.ArgumentParser(prog=prog(name), description=description)
    add_common_flags(parser, name)
    return parser


def plan_or_exit(parser: argparse.ArgumentParser, build: Callable[[], T]) -> T:
    """``build()`` the plan before anything runs; a ValueError becomes argparse's usage error (exit status 2)."""
    try:
        return build()
    except ValueError as err:
        parser.error(str(err))


def plan_from_options(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    make: Callable[..., Any],
    names: Sequence[str],
    quick: Mapping[str, Any],
) -> Any:
    """``make(**fields).checked()`` with each named field taken from the option of the same name (``--quick``
    overriding them with ``quick``), before anything runs; a ValueError is argparse's usage error."""

    def build() -> Any:
        kw: dict[str, Any] = {name: getattr(args, name) for name in names}
        if args.quick:
            kw.update(quick)
        return make(**kw).checked()

    return plan_or_exit(parser, build)


def add_common_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """``--quick`` and ``--out``, with the same meaning in every benchmark."""
    out = default_out(name)
    parser.add_argument("--quick", action="store_true", help="small smoke run of the same pipeline (not for figures)")
    parser.add_argument("--out", type=Path, default=out, help=f"results folder (default {out})")


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median; no values is an error (a timing that never ran)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def finite_median(values: Sequence[float | None]) -> float:
    """The median of the finite values; NaN when there are none (a failed run leaves NaN, not an error)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.median(vals) if vals else math.nan


def ratio(num: float, den: float) -> float:
    """``num / den``, NaN when either is not finite or ``den`` is 0."""
    return num / den if den and math.isfinite(num) and math.isfinite(den) else math.nan


def gap_points(value: float, baseline: float) -> float:
    """``value - baseline`` in percentage points (fractions in, points out); negative = worse."""
    return 100.0 * (float(value) - float(baseline))


# --------------------------------------------------------------------------------------------------
# Tables and number formats
# --------------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain Markdown table (also readable on a terminal), columns padded to their widest cell."""
    cells = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def aligned_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A terminal table: first column left-aligned, the others (numbers) right-aligned, a dashed rule."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def fmt_pct(x: float | None) -> str:
    """A fraction as a percentage, 2 decimals; "-" when missing or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def fmt_points(x: float | None) -> str:
    """Signed percentage points; empty when missing."""
    return "" if x is None else f"{x:+.2f}"


def fmt_eps(x: float | None) -> str:
    """An epsilon, 3 decimals or "inf"; "-" when missing."""
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.3f}"


def fmt_num(x: float | None, fmt: str = ".2f") -> str:
    """A number in ``fmt``; "n/a" when missing or not finite."""
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def fmt_bytes(n: float) -> str:
    """A byte count in KiB, or MiB from 1 MiB on."""
    return f"{n / 1024:,.1f} KiB" if n < 1024**2 else f"{n / 1024**2:,.2f} MiB"


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def json_safe(x: Any) -> Any:
    """JSON has no inf/NaN: write them as strings that float() reads back; keys become strings first."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path: Path, data: Any, *, make_parent: bool = True) -> None:
    """A result as written to a ``--json`` path: indented, as given (no key sorting), newline-terminated."""
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_results(path: Path, result: Mapping[str, Any]) -> None:
    """A benchmark's results file: JSON-safe, indented, keys sorted."""
    path.write_text(json.dumps(json_safe(result), indent=2, sort_keys=True) + "\n")
