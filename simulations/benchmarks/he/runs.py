"""The HE benchmark's federations: one plaintext or HE run through the real apps, its round times and accuracy.

One kind of thing: running and reading federations (the feature cache they share, ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from privatune.simulations.benchmarks.he.plan import Case
from privatune.simulations.benchmarks.report import Log


def round_durations(metrics_lines: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Seconds of each round from ``metrics.jsonl`` records, whose ``seconds`` are cumulative from the start.

    Round ``r`` lasts ``seconds[r] - seconds[r - 1]`` (round 0 is the initial evaluation, at ~0 s).
    """
    cumulative = {int(m["round"]): float(m["seconds"]) for m in metrics_lines}
    if 0 not in cumulative:
        cumulative[0] = 0.0
    out: dict[int, float] = {}
    for r in sorted(cumulative):
        if r == 0:
            continue
        if r - 1 not in cumulative:
            raise ValueError(f"metrics.jsonl has round {r} but not round {r - 1}: cannot time round {r}")
        out[r] = cumulative[r] - cumulative[r - 1]
    return out


@dataclass
class RunResult:
    case: str
    arm: str  # "plain" | "he"
    repeat: int
    rounds: dict[int, float] = field(default_factory=dict)  # round -> seconds
    max_train_seconds: dict[int, float] = field(default_factory=dict)  # round -> slowest client's training
    simulation_seconds: float = math.nan
    rounds_completed: int = 0
    dropped: int = 0
    test_accuracy: float = math.nan
    test_macro_f1: float = math.nan
    out_dir: str = ""
    error: str = ""

    @property
    def steady(self) -> list[float]:
        return [s for r, s in sorted(self.rounds.items()) if r >= 2]


def seed_feature_cache(case: Case, cache_dir: Path, log: Log) -> list[int]:
    """Compute every client's features through the client's own data path; returns the clients'
    training-set sizes (their FedAvg weights). Digits in ``full`` mode caches nothing."""
    from privatune.client.round import load_local_data
    from privatune.client.site_config import SiteConfig
    from privatune.common.features import cached_features
    from privatune.common.models import backbone_is_frozen, get_model_spec

    cfg = replace(case.config(), out_dir=str(cache_dir.parent))
    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed) if backbone_is_frozen(cfg.mode) else None
    t0 = time.perf_counter()
    sizes = []
    for pid in range(case.clients):
        site = SiteConfig.from_node_config({"partition-id": pid, "num-partitions": case.clients}, cfg)
        local = load_local_data(cfg, site)
        train, val = local.train, local.val
        sizes.append(len(train))
        if model is not None:
            for part in (train, val):
                if len(part):
                    cached_features(model, cfg.model, part, cfg.max_length, cache_dir)
    if model is not None:
        log(f"[data] {case.name}: client features cached in {time.perf_counter() - t0:.1f} s")
    return sizes


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def federated_run(
    case: Case, arm: str, repeat: int, runs_dir: Path, cache_dir: Path, evaluator: Any, log: Log
) -> RunResult:
    """One federation through the real apps, then its final model tested centrally."""
    from safetensors.numpy import load_file

    from privatune.common import he
    from privatune.server.app import HE_CHECKPOINT_NAME, PLAIN_WEIGHTS_NAME
    from privatune.simulations.simulate import run_simulation

    out = runs_dir / case.name / f"{arm}-r{repeat}"
    if out.exists():
        shutil.rmtree(out)  # fresh ledgers and keys
    if cache_dir.exists():
        shutil.copytree(cache_dir, out / "cache")
    cached_before = len(list((out / "cache").glob("*"))) if (out / "cache").exists() else 0
    cfg = replace(case.config("he" if arm == "he" else "none"), cache_dir=str((out / "cache").resolve()))
    res = RunResult(case.name, arm, repeat, out_dir=str(out))
    t0 = time.perf_counter()
    try:
        summary = run_simulation(cfg, case.clients, out)
    except Exception as err:
        res.error = f"{type(err).__name__}: {err}"
        res.simulation_seconds = time.perf_counter() - t0
        log(f"  [error] {case.name} {arm} r{repeat} failed, the benchmark goes on: {res.error}")
        return res
    res.simulation_seconds = float(summary.get("simulation_seconds", time.perf_counter() - t0))
    res.rounds_completed = int(summary.get("rounds_completed", 0))
    metrics = _read_metrics(out / "metrics.jsonl")
    res.rounds = round_durations(metrics)
    res.dropped = sum(len(m.get("dropped") or {}) for m in metrics)
    for m in metrics:
        secs = [float(c["train-seconds"]) for c in (m.get("clients") or {}).values() if "train-seconds" in c]
        if secs:
            res.max_train_seconds[int(m["round"])] = max(secs)
    cached_after = len(list((out / "cache").glob("*"))) if (out / "cache").exists() else 0
    if cached_after > cached_before:
        log(f"  [warn] the clients computed {cached_after - cached_before} feature file(s) the seeding missed")
    if arm == "he":
        weights_path = out / "global.decrypted.safetensors"
        he.decrypt_checkpoint_to_safetensors(out / "keys" / "secret.ctx", out / HE_CHECKPOINT_NAME, weights_path)
    else:
        weights_path = out / PLAIN_WEIGHTS_NAME
    ev = evaluator(load_file(str(weights_path)))
    res.test_accuracy, res.test_macro_f1 = float(ev.accuracy), float(ev.macro_f1)
    if res.rounds_completed != case.rounds or res.dropped:
        log(f"  [warn] {res.rounds_completed}/{case.rounds} rounds completed, {res.dropped} update(s) dropped")
    log(
        f"  {case.name} {arm:<5} r{repeat}: rounds "
        + ", ".join(f"{r}: {s:.1f} s" for r, s in sorted(res.rounds.items()))
        + f" | test acc {100 * res.test_accuracy:.2f} % | {res.simulation_seconds:.0f} s in all"
    )
    return res
