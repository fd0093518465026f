"""Accounting benchmark: what calibrating with a tight accountant (PRV) instead of RDP buys, measured side by side.

    python -m privatune.simulations.benchmarks.accounting             # TREC-6 and SMS Spam, eps 1 and 8, rdp vs prv (~20 min)
    python -m privatune.simulations.benchmarks.accounting --quick     # smoke run of the same pipeline (not for figures)

For each preset (head mode, 10 clients, Dirichlet 1.0: the default simulation) and each target epsilon, two
federations run through the real ServerApp/ClientApp (:func:`privatune.simulations.benchmarks.dp.federated_run`): one whose
clients calibrate their noise and report with the RDP accountant (the old default), one with PRV (the new one).
Each row gives the clients' noise multipliers, the largest epsilon any client reported, that client's epsilon
recomputed from its ledger with dp-accounting's PLD (independent of Opacus), and test accuracy / macro-F1.

A pure part (:func:`calibration_rows`, no training) gives the same comparison per client from the record counts
alone; it is what the tiny test exercises. Results go to ``DIR/bench_accounting.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from privatune.common.accounting import calibrate_noise, default_delta, epsilon_of, sample_rate, steps_per_epoch
from privatune.common.config import RunConfig
from privatune.common.ledger import LEDGER_GLOB, SITE_SCHEMA, ledger_schema, read_rows
from privatune.simulations.benchmarks.dp.accuracy import federated_run
from privatune.simulations.benchmarks.dp.bench import dp_environment
from privatune.simulations.benchmarks.dp.data import PreparedData, prepare_data
from privatune.simulations.benchmarks.dp.plan import (
    ACCURACY_PRESETS,
    FED_EPSILONS,
    BenchPlan,
    checked_plan,
    parse_overrides,
)
from privatune.simulations.benchmarks.report import (
    Log,
    bench_parser,
    default_out,
    fmt_eps,
    fmt_pct,
    markdown_table,
    plan_or_exit,
    print_flush,
    results_folder,
    run_header,
    write_results,
)

NAME = "accounting"
OLD, NEW, INDEPENDENT = "rdp", "prv", "pld"
DEFAULT_OUT = default_out(NAME)


# --------------------------------------------------------------------------------------------------
# Pure part: calibration per client from record counts (no training)
# --------------------------------------------------------------------------------------------------


@dataclass
class CalibrationRow:
    """One client's calibrated noise under one accountant, and what its whole run then costs."""

    records: int
    accountant: str
    target_epsilon: float
    noise_multiplier: float
    epsilon: float  # the run's epsilon under the calibrating accountant (<= target)
    epsilon_pld: float  # the same run recomputed with dp-accounting's PLD


def run_mechanism(cfg: RunConfig, records: int) -> tuple[float, int, float]:
    """(sample rate, total steps, delta) of one client's whole run: what its calibration targets."""
    steps = cfg.num_server_rounds * cfg.local_epochs * steps_per_epoch(records, cfg.batch_size)
    return sample_rate(records, cfg.batch_size), steps, cfg.delta or default_delta(records)


def calibration_rows(
    cfg: RunConfig, records: Sequence[int], accountants: Sequence[str] = (OLD, NEW)
) -> list[CalibrationRow]:
    """Each client's noise when calibrated with each accountant, with the epsilon it reaches (both accountants)."""
    rows = []
    for n in records:
        q, steps, delta = run_mechanism(cfg, n)
        for acc in accountants:
            sigma = calibrate_noise(cfg.target_epsilon, delta, q, steps, acc)
            mech = [(sigma, q, steps)]
            rows.append(
                CalibrationRow(
                    n,
                    acc,
                    cfg.target_epsilon,
                    sigma,
                    epsilon_of(mech, delta, acc),
                    epsilon_of(mech, delta, INDEPENDENT),
                )
            )
    return rows


def noise_saving(rows: Sequence[CalibrationRow], old: str = OLD, new: str = NEW) -> list[float]:
    """Per client and target: 1 - sigma_new / sigma_old (the fraction of noise the new accountant saves)."""
    by = {(r.records, r.target_epsilon, r.accountant): r.noise_multiplier for r in rows}
    return [1.0 - by[(n, t, new)] / by[(n, t, old)] for (n, t, a) in by if a == old and (n, t, new) in by]


# --------------------------------------------------------------------------------------------------
# Federated part
# --------------------------------------------------------------------------------------------------


@dataclass
class LedgerSpend:
    """A site's run as its ledger recorded it, with the PLD recomputation."""

    site: str
    noise_multiplier: float
    epsilon_reported: float
    epsilon_pld: float


def ledger_spends(folder: Path) -> list[LedgerSpend]:
    """Every site ledger under ``folder``: the last recorded run epsilon and its independent PLD value."""
    out = []
    for path in sorted(folder.rglob(LEDGER_GLOB)):
        if ledger_schema(path) != SITE_SCHEMA:
            continue
        rows = read_rows(path, "spend")
        if not rows:
            continue
        last = rows[-1]
        run = [r for r in rows if r["run_id"] == last["run_id"]]
        hist = [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in run]
        out.append(
            LedgerSpend(
                str(last["site_id"]),
                float(last["noise_multiplier"]),
                float(last["epsilon_run"]),
                epsilon_of(hist, float(last["delta"]), INDEPENDENT),
            )
        )
    return out


@dataclass
class AccountingRow:
    preset: str
    accountant: str
    target_epsilon: float
    noise_min: float | None
    noise_max: float | None
    epsilon_reported: float | None  # the largest run epsilon any site recorded
    epsilon_pld: float | None  # that site's run recomputed with PLD
    accuracy: float
    macro_f1: float
    seconds: float
    error: str = ""


def federated_row(
    data: PreparedData, plan: BenchPlan, runs_dir: Path, accountant: str, epsilon: float, log: Log
) -> AccountingRow:
    """One federation with ``accountant`` for calibration and reporting, and what its ledgers say."""
    data = replace(data, cfg=replace(data.cfg, accountant=accountant))
    acc = federated_run(data, plan, runs_dir / accountant, dp=True, epsilon=epsilon, log=log)
    spends = ledger_spends(Path(acc.out_dir)) if acc.out_dir and not acc.error else []
    worst = max(spends, key=lambda s: s.epsilon_reported) if spends else None
    noises = [s.noise_multiplier for s in spends]
    return AccountingRow(
        preset=data.cfg.preset,
        accountant=accountant,
        target_epsilon=epsilon,
        noise_min=min(noises) if noises else None,
        noise_max=max(noises) if noises else None,
        epsilon_reported=worst.epsilon_reported if worst else None,
        epsilon_pld=worst.epsilon_pld if worst else None,
        accuracy=acc.accuracy,
        macro_f1=acc.macro_f1,
        seconds=acc.seconds,
        error=acc.error,
    )


def _sigma(lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None:
        return "-"
    return f"{lo:.3f}" if math.isclose(lo, hi) else f"{lo:.3f}-{hi:.3f}"


def accounting_table(rows: Sequence[AccountingRow]) -> str:
    return markdown_table(
        [
            "preset",
            "target eps",
            "accountant",
            "noise multiplier (clients)",
            "reported eps",
            "PLD eps",
            "reported / PLD",
            "accuracy %",
            "macro-F1 %",
        ],
        [
            [
                r.preset,
                f"{r.target_epsilon:g}",
                r.accountant,
                _sigma(r.noise_min, r.noise_max),
                fmt_eps(r.epsilon_reported),
                fmt_eps(r.epsilon_pld),
                f"{r.epsilon_reported / r.epsilon_pld:.3f}" if r.epsilon_reported and r.epsilon_pld else "-",
                fmt_pct(r.accuracy) + (" FAILED" if r.error else ""),
                fmt_pct(r.macro_f1),
            ]
            for r in rows
        ],
    )


def calibration_table(rows: Sequence[CalibrationRow]) -> str:
    return markdown_table(
        ["records", "target eps", "accountant", "noise multiplier", "eps (own)", "eps PLD", "own / PLD"],
        [
            [
                str(r.records),
                f"{r.target_epsilon:g}",
                r.accountant,
                f"{r.noise_multiplier:.4f}",
                f"{r.epsilon:.4f}",
                f"{r.epsilon_pld:.4f}",
                f"{r.epsilon / r.epsilon_pld:.3f}",
            ]
            for r in rows
        ],
    )


def run(plan: BenchPlan, out: Path, log: Log = print) -> dict[str, Any]:
    out = results_folder(out)
    t_start = time.perf_counter()
    result = run_header(NAME, plan, dp_environment())
    prepared = {p: prepare_data(p, plan, out / "feature-cache" / p, log) for p in ACCURACY_PRESETS}
    calib: list[CalibrationRow] = []
    fed: list[AccountingRow] = []
    for preset, data in prepared.items():
        records = [len(t) for t in data.client_train]
        for eps in FED_EPSILONS:
            rows = calibration_rows(replace(data.cfg, target_epsilon=eps), records)
            calib.extend(rows)
            saving = noise_saving(rows)
            log(
                f"[calibrate] {preset} eps={eps:g}: prv needs {100 * min(saving):.1f}-{100 * max(saving):.1f} % "
                "less noise than rdp"
            )
    log(calibration_table(calib))
    for preset, data in prepared.items():
        for eps in FED_EPSILONS:
            for acc in (OLD, NEW):
                row = federated_row(data, plan, out / "runs", acc, eps, log)
                log(
                    f"  -> {preset} eps={eps:g} {acc}: accuracy {fmt_pct(row.accuracy)} %, reported eps "
                    f"{fmt_eps(row.epsilon_reported)}, PLD {fmt_eps(row.epsilon_pld)}"
                )
                fed.append(row)
    result["calibration"] = [asdict(r) for r in calib]
    result["noise_saving"] = {"min": min(noise_saving(calib)), "max": max(noise_saving(calib))}
    result["federated"] = [asdict(r) for r in fed]
    result["total_seconds"] = time.perf_counter() - t_start
    log("\n" + calibration_table(calib) + "\n")
    log(accounting_table(fed))
    path = out / "bench_accounting.json"
    write_results(path, result)
    log(f"\nresults in {path}; total {result['total_seconds']:.0f} s")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(NAME, "RDP vs PRV calibration: noise, epsilon (and PLD), accuracy.")
    parser.add_argument("--run-config", default="", help='overrides for every run, e.g. "lr=1.0"')
    args = parser.parse_args(argv)

    def checked() -> BenchPlan:
        overrides = parse_overrides(args.run_config)
        if "accountant" in overrides:
            raise ValueError("--run-config: the benchmark sets accountant itself; remove it from the overrides")
        return checked_plan(args.quick, overrides)

    plan = plan_or_exit(parser, checked)
    run(plan, args.out, log=print_flush)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
