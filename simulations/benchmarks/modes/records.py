"""What the modes benchmark reads back from a run: round times from ``metrics.jsonl``, training times from the sites' log.

Pure (text and rows in, numbers out), so it is tested without running a federation. A site's training time
never leaves the site (docs/privacy.md): a simulated site writes it to its own log, one line per round
(``client.round.log_trained``), and the benchmark reads those lines from the output of the run's process.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# client.round.log_trained: "[client-3] round 2: 431 records, train loss 1.2345, epsilon 7.995, noise site-csprng, 12.3 s"
TRAIN_LINE = re.compile(
    r"\[(?P<client>[^\]]+)\] round (?P<round>\d+): (?P<records>\d+) records, train loss (?P<loss>\S+), "
    r"epsilon (?P<epsilon>\S+), noise (?P<noise>\S+), (?P<seconds>[0-9.]+) s\b"
)


@dataclass(frozen=True)
class SiteRound:
    """One site's training in one round, as its log line says."""

    client: str
    round: int
    records: int
    seconds: float  # every local epoch of the round together (the log's resolution: 1 ms)


def site_rounds(log_text: str) -> list[SiteRound]:
    """Every training line in ``log_text``, once per (client, round) (a line Ray forwarded twice counts once)."""
    seen: dict[tuple[str, int], SiteRound] = {}
    for line in ANSI.sub("", log_text).splitlines():
        m = TRAIN_LINE.search(line)
        if m:
            key = (m["client"], int(m["round"]))
            seen.setdefault(key, SiteRound(m["client"], int(m["round"]), int(m["records"]), float(m["seconds"])))
    return sorted(seen.values(), key=lambda s: (s.round, s.client))


def epoch_seconds(rounds: Iterable[SiteRound], local_epochs: int) -> list[float]:
    """Seconds per local epoch of every site round: its training time over the round's local epochs."""
    if local_epochs < 1:
        raise ValueError(f"local_epochs must be at least 1, got {local_epochs}")
    return [r.seconds / local_epochs for r in rounds]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (one per closed round, round 0 = before training)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def round_seconds(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """The wall time of each trained round: ``seconds`` in metrics.jsonl counts from the run's start, so a round's
    time is the difference to the round before it (round 0 is the setup and the first evaluation)."""
    ordered = sorted(rows, key=lambda r: int(r["round"]))
    out: list[float] = []
    for before, after in itertools.pairwise(ordered):
        out.append(float(after["seconds"]) - float(before["seconds"]))
    return out


def central_curve(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """The server's test accuracy after each round (round 0 first); NaN where it was not evaluated."""
    out: list[float] = []
    for r in sorted(rows, key=lambda r: int(r["round"])):
        acc = (r.get("central") or {}).get("accuracy")
        out.append(float(acc) if isinstance(acc, (int, float)) else math.nan)
    return out


def client_peak_kib(peak_kib_by_title: Mapping[str, int]) -> int | None:
    """The simulated clients' peak resident memory (KiB): the highest ``VmHWM`` among the Ray client actors, whose
    process title is ``ray::ClientAppActor`` or ``ray::ClientAppActor.<method>`` while a call runs."""
    peaks = [int(v) for k, v in peak_kib_by_title.items() if k.startswith("ray::ClientAppActor")]
    return max(peaks) if peaks else None


def epoch_seconds_per_round(rounds: Iterable[SiteRound], local_epochs: int) -> dict[int, float]:
    """The federation's training time per local epoch in each round: every site's seconds summed, over the epochs
    (the same records in a DP and a non-DP run of one seed, so the two are comparable)."""
    if local_epochs < 1:
        raise ValueError(f"local_epochs must be at least 1, got {local_epochs}")
    out: dict[int, float] = {}
    for r in rounds:
        out[r.round] = out.get(r.round, 0.0) + r.seconds / local_epochs
    return dict(sorted(out.items()))


def cell_result(
    summary: Mapping[str, Any], child: Mapping[str, Any], log_text: str, local_epochs: int
) -> dict[str, Any]:
    """One cell's figures from its run folder's ``summary.json``, the child's ``child.json`` and its output."""
    rounds = site_rounds(log_text)
    per_round = epoch_seconds_per_round(rounds, local_epochs)
    steady = [s for r, s in per_round.items() if r >= 2] or list(per_round.values())
    eps = summary.get("per_client_epsilon") or {}
    return {
        "status": summary.get("status", child.get("status")),
        "accuracy": summary.get("test_accuracy"),
        "macro_f1": summary.get("test_macro_f1"),
        "per_client_epsilon": dict(eps),
        "max_client_epsilon": summary.get("max_client_epsilon"),
        "wall_seconds": child.get("seconds"),
        "site_rounds": len(rounds),
        "epoch_seconds_by_round": per_round,
        "epoch_seconds": sorted(steady)[len(steady) // 2] if steady else math.nan,
        "client_peak_kib": client_peak_kib(child.get("peak_kib_by_title") or {}),
    }
