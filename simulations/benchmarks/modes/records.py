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
    seconds: float  # every local epoch of the round together (the log's resolution: 0.1 s)


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
