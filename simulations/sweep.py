"""`privatune sweep`: accuracy and macro-F1 against epsilon, one simulation per (mode, epsilon).

The runs themselves go through ``privatune simulate`` (the CLI passes :func:`run_sweep` a callable that runs one
point); this module holds what a sweep adds around them: the points and their run folders, which points a rerun
may skip (their ``summary.json`` says finished), each point's result read back from its summary and ledgers, the
centralised non-DP baseline, what the sweep spent on which data, the JSON and the plot.

The privacy statement is the point of the command: every point is a separate run on the *same* private records,
so what a site has spent after a sweep is the composition of all its DP runs (composed here with the project's
accountant from the mechanisms in the runs' site ledgers), and a no-DP point or the centralised baseline (which
sees every site's records) gives no guarantee at all. A sweep is a simulation tool: run it on data you may spend.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from privatune.common.accounting import epsilon_of
from privatune.common.config import RunConfig
from privatune.common.jsonsafe import jsonable
from privatune.common.ledger import LEDGER_GLOB, read_rows, site_id_from_ledger_name
from privatune.common.ledger.totals import LedgerSpend, ledger_spend
from privatune.common.models import FINE_TUNING_MODES
from privatune.server.run_record import write_json_atomic

SWEEP_JSON = "sweep.json"
SWEEP_PLOT = "sweep.png"
# A point whose summary.json says one of these is done: a rerun of the sweep skips it (server/run_record.py).
FINISHED_STATUSES = ("completed", "stopped")
NO_DP_WORDS = ("inf", "infinity", "none", "no-dp", "nodp")


class SweepError(ValueError):
    """A bad --epsilon/--mode list or a sweep folder that holds another sweep; the message names the fix."""


# -- the points ----------------------------------------------------------------------------------------------------


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"0.5,1,inf"`` -> (0.5, 1.0, inf), ascending with ``inf`` (no DP) last."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SweepError("--epsilon: give at least one value, e.g. --epsilon 0.5,1,2,4,8,inf")
    out: list[float] = []
    for item in items:
        if item.lower() in NO_DP_WORDS:
            out.append(math.inf)
            continue
        try:
            eps = float(item)
        except ValueError:
            raise SweepError(f"--epsilon: {item!r} is not a number or 'inf' (e.g. --epsilon 0.5,1,2,4,8,inf)") from None
        if not (eps > 0 and math.isfinite(eps)):
            raise SweepError(f"--epsilon: {item!r} must be a number > 0 (or 'inf' for no DP)")
        out.append(eps)
    if len(set(out)) != len(out):
        raise SweepError(f"--epsilon: {text!r} names a value twice; give each epsilon once")
    return tuple(sorted(out))


def parse_modes(text: str, default: str) -> tuple[str, ...]:
    """``"head,lora"`` -> ("head", "lora"); empty -> (``default``,), the preset's or model's own mode."""
    items = [t.strip() for t in text.split(",") if t.strip()] or [default]
    for item in items:
        if item not in FINE_TUNING_MODES:
            raise SweepError(f"--mode: unknown mode {item!r}; choose from {', '.join(FINE_TUNING_MODES)}")
    if len(set(items)) != len(items):
        raise SweepError(f"--mode: {text!r} names a mode twice; give each mode once")
    return tuple(items)


@dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep: a fine-tuning mode at a target epsilon (inf: no DP)."""

    mode: str
    epsilon: float

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def tag(self) -> str:
        """The point's run folder name inside the sweep folder."""
        return f"{self.mode}-eps{self.epsilon:g}" if self.private else f"{self.mode}-nodp"

    @property
    def label(self) -> str:
        return f"{self.mode}, {'epsilon ' + format(self.epsilon, 'g') if self.private else 'no DP'}"


def build_points(modes: Sequence[str], epsilons: Sequence[float]) -> list[SweepPoint]:
    """Every (mode, epsilon), mode by mode, epsilons ascending and no DP last."""
    return [SweepPoint(m, e) for m in modes for e in sorted(epsilons)]


def is_finished(run_dir: Path) -> bool:
    """True when the point's summary.json says its run finished (a rerun skips it)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("status") in FINISHED_STATUSES


# -- one point's result --------------------------------------------------------------------------------------------


def site_spends(run_dir: Path) -> dict[str, list[LedgerSpend]]:
    """Every spend row of the point's site ledgers (``run_dir/ledgers``), by site id."""
    out: dict[str, list[LedgerSpend]] = {}
    for path in sorted((run_dir / "ledgers").glob(LEDGER_GLOB)):
        site = site_id_from_ledger_name(path.name)
        if site is not None:
            out[site] = [ledger_spend(r) for r in read_rows(path, "spend")]
    return out


def _float(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def point_result(point: SweepPoint, run_dir: Path, summary: Mapping[str, Any], skipped: bool) -> dict[str, Any]:
    """A point as the JSON, the table and the plot show it; the spent epsilon is the largest any site reports."""
    spent = [e for e in (_float(v) for v in (summary.get("per_client_epsilon") or {}).values()) if e is not None]
    return {
        "mode": point.mode,
        "target_epsilon": point.epsilon,
        "dp": point.private,
        "epsilon_spent": (max(spent) if spent else None) if point.private else math.inf,
        "accuracy": _float(summary.get("test_accuracy")),
        "macro_f1": _float(summary.get("test_macro_f1")),
        "status": summary.get("status", "missing"),
        "rounds_completed": summary.get("rounds_completed"),
        "skipped": skipped,
        "run_folder": str(run_dir),
    }


# -- what the sweep spent ------------------------------------------------------------------------------------------


def spend_statement(
    results: Sequence[Mapping[str, Any]],
    spends: Mapping[str, Mapping[str, Sequence[LedgerSpend]]],
    data: str,
    baseline: bool,
) -> dict[str, Any]:
    """What the sweep spent on ``data``: per site, the composition of every DP point's ledger spends.

    ``spends`` maps a point's run folder to its site ledgers' spends by site id. Each point is a separate run on
    the same records, so the spends compose; they are composed with the project's accountant at the largest
    delta any of them was accounted at. A point whose ledgers are missing leaves its run's reported spend, and
    the note that it composes with the rest.
    """
    dp = [r for r in results if r["dp"]]
    no_dp = [r for r in results if not r["dp"]]
    by_site: dict[str, list[LedgerSpend]] = {}
    missing = []
    for r in dp:
        sites = spends.get(r["run_folder"]) or {}
        if not sites:
            missing.append(r["run_folder"])
        for site, rows in sites.items():
            by_site.setdefault(site, []).extend(rows)
    per_site: dict[str, float] = {}
    delta = None
    for site, rows in sorted(by_site.items(), key=lambda kv: (len(kv[0]), kv[0])):
        if rows:
            delta = max(s.delta for s in rows)
            per_site[site] = epsilon_of([s.mechanism for s in rows], delta, rows[-1].accountant)
    worst = max(per_site.values()) if per_site else None
    parts = [
        f"The sweep trained on {data}: {len(results)} runs on the same private records, {len(dp)} with DP.",
        "Each point is a separate run, so what each site spent is the composition of all its DP runs, not the "
        "epsilon of one point"
        + (f": at most epsilon {worst:.3g} per site (composed from the run ledgers)." if worst is not None else "."),
    ]
    if missing:
        parts.append(
            f"{len(missing)} DP run(s) have no site ledgers to compose; their reported spends compose with the rest."
        )
    if no_dp:
        parts.append(f"{len(no_dp)} no-DP run(s) trained on the same records with no privacy guarantee (epsilon inf).")
    if baseline:
        parts.append(
            "The centralised baseline is non-private: it pools every site's records in one place (simulation only)."
        )
    if no_dp or baseline:
        parts.append("On real private data this sweep as a whole would give no DP guarantee.")
    return {
        "data": data,
        "runs": len(results),
        "dp_runs": len(dp),
        "per_run_epsilon_spent": {Path(r["run_folder"]).name: r["epsilon_spent"] for r in results},
        "dp_runs_composed_per_site": per_site,
        "dp_runs_composed_max": worst,
        "composed_at_delta": delta,
        "runs_without_ledgers": missing,
        "total_guarantee": "none (no-DP runs or the baseline saw the records)"
        if (no_dp or baseline)
        else "the DP composition above",
        "statement": " ".join(parts),
    }


# -- the centralised baseline --------------------------------------------------------------------------------------


def central_baseline(cfg: RunConfig) -> dict[str, Any]:
    """The same model and mode trained without DP on the pool the sites share out, for rounds x local-epochs epochs
    with the run's hyperparameters, and tested on the same central test set (the clients' training code)."""
    import torch

    from privatune.client.randomness import SeededRandomness
    from privatune.client.training import train_local
    from privatune.common.cache import resolve_cache_dir
    from privatune.common.features import cached_features, encode
    from privatune.common.federation_data import central_split
    from privatune.common.models import backbone_is_frozen, configure_trainable, get_model_spec, trainable_state
    from privatune.server.central_eval import CentralEvaluator

    cfg = replace(cfg, dp=False)
    cache = resolve_cache_dir(cfg.cache_dir)
    pool, _ = central_split(cfg)
    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
    configure_trainable(model, cfg.fine_tuning)
    module: torch.nn.Module = model
    inputs: tuple[torch.Tensor, ...]
    if backbone_is_frozen(cfg.mode):  # as at a site: the head alone, on cached backbone features
        module, inputs = model.head, (cached_features(model, cfg.model, pool, cfg.max_length, cache),)
    else:
        inputs = encode(cfg.model, pool, cfg.max_length)
    t0 = time.perf_counter()
    train_local(
        module,
        inputs,
        torch.as_tensor(pool.labels, dtype=torch.long),
        epochs=cfg.num_server_rounds * cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        dp=False,
        noise_multiplier=0.0,
        max_grad_norm=cfg.max_grad_norm,
        randomness=SeededRandomness(cfg.seed),
        backbone_lr_scale=cfg.backbone_lr_scale,
        optimizer_name=cfg.optimizer,
        max_physical_batch_size=cfg.max_physical_batch_size,
        layer_lr_decay=cfg.fine_tuning.layer_lr_decay,
        block_prefixes=model.block_prefixes,
    )
    seconds = time.perf_counter() - t0
    res = CentralEvaluator(cfg, cache)(trainable_state(model))
    return {
        "mode": cfg.mode,
        "accuracy": res.accuracy,
        "macro_f1": res.macro_f1,
        "records": len(pool),
        "epochs": cfg.num_server_rounds * cfg.local_epochs,
        "seconds": seconds,
        "private": False,
    }


# -- the sweep -----------------------------------------------------------------------------------------------------


RunPoint = Callable[[SweepPoint, Path, bool], None]  # (point, run folder, overwrite an unfinished run there)
Say = Callable[[str], None]


def check_same_sweep(folder: Path, options: Mapping[str, Any]) -> None:
    """A rerun may reuse the finished points of the sweep in ``folder`` only if it is the same sweep."""
    try:
        old = json.loads((folder / SWEEP_JSON).read_text()).get("options")
    except (OSError, ValueError, AttributeError):
        return
    if old is not None and old != jsonable(dict(options)):
        changed = sorted(k for k in set(old) | set(options) if old.get(k) != jsonable(options.get(k)))
        raise SweepError(
            f"--out {folder} holds a sweep with other options ({', '.join(changed)}); its finished points would "
            "not be comparable: give the same options to resume it, or choose another --out folder"
        )


def run_sweep(
    folder: Path,
    points: Sequence[SweepPoint],
    run_point: RunPoint,
    *,
    options: Mapping[str, Any],
    data: str,
    baseline: bool,
    say: Say = print,
) -> dict[str, Any]:
    """Run every point not finished yet (in order), the baselines, and write ``sweep.json`` after each step."""
    check_same_sweep(folder, options)
    results: list[dict[str, Any]] = []
    baselines: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {}

    def write() -> None:
        spends = {r["run_folder"]: _spends_or_none(Path(r["run_folder"])) for r in results if r["dp"]}
        report.clear()
        report.update(
            options=dict(options),
            points=list(results),
            baselines=baselines,
            privacy=spend_statement(results, {k: v for k, v in spends.items() if v}, data, bool(baselines)),
            plot=str(folder / SWEEP_PLOT),
        )
        write_json_atomic(folder / SWEEP_JSON, jsonable(report))

    for i, point in enumerate(points, start=1):
        run_dir = folder / point.tag
        skipped = is_finished(run_dir)
        if skipped:
            say(f"point {i}/{len(points)}: {point.label}: finished in {run_dir.name}/, skipped")
        else:
            say(f"point {i}/{len(points)}: {point.label}")
            run_point(point, run_dir, run_dir.exists())
        summary = _summary(run_dir)
        results.append(point_result(point, run_dir, summary, skipped))
        write()
        if baseline and point.mode not in baselines and summary.get("status") in FINISHED_STATUSES:
            baselines[point.mode] = _baseline(folder, run_dir, point.mode, say)
            write()
    plot_sweep(report, folder / SWEEP_PLOT)
    return report


def _summary(run_dir: Path) -> dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {"status": "missing"}
    return summary if isinstance(summary, dict) else {"status": "missing"}


def _spends_or_none(run_dir: Path) -> dict[str, list[LedgerSpend]] | None:
    from privatune.common.ledger import LedgerError

    try:
        return site_spends(run_dir)
    except LedgerError:
        return None


def _baseline(folder: Path, run_dir: Path, mode: str, say: Say) -> dict[str, Any]:
    """The mode's centralised baseline, from its first finished run's config; kept in the sweep folder."""
    path = folder / f"baseline-{mode}.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    say(f"centralised non-DP baseline for {mode} (all sites' records pooled; simulation only)")
    cfg = RunConfig.from_flower(json.loads((run_dir / "config.json").read_text()))
    result = central_baseline(cfg)
    write_json_atomic(path, jsonable(result))
    return result


# -- the plot ------------------------------------------------------------------------------------------------------


def plot_positions(epsilons: Iterable[float]) -> tuple[dict[float, float], float | None]:
    """Log-x positions: each finite epsilon at itself, no DP (inf) one decade-ish step right of the largest."""
    finite = sorted({e for e in epsilons if math.isfinite(e)})
    pos = {e: e for e in finite}
    no_dp = (finite[-1] * 2.5 if finite else 1.0) if any(math.isinf(e) for e in epsilons) else None
    if no_dp is not None:
        pos[math.inf] = no_dp
    return pos, no_dp


def plot_sweep(report: Mapping[str, Any], path: Path) -> Path:
    """Accuracy against epsilon (log x), one line per mode, each mode's baseline a dashed horizontal line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [p for p in report["points"] if p.get("accuracy") is not None]
    pos, no_dp = plot_positions([float(p["target_epsilon"]) for p in report["points"]])
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    modes = list(dict.fromkeys(p["mode"] for p in report["points"]))
    for i, mode in enumerate(modes):
        color = f"C{i}"
        pts = sorted((pos[float(p["target_epsilon"])], 100 * p["accuracy"]) for p in points if p["mode"] == mode)
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=color, label=mode)
        base = (report.get("baselines") or {}).get(mode)
        if base:
            ax.axhline(
                100 * base["accuracy"], color=color, linestyle="--", alpha=0.7, label=f"{mode}: centralised, no DP"
            )
    ticks = sorted(pos.values())
    ax.set_xticks(ticks, ["no DP" if t == no_dp else f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("target epsilon per site (log scale)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("privatune sweep: accuracy against epsilon")
    ax.grid(alpha=0.3)
    if modes:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return path
