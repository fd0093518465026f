"""What a run leaves in its output folder, written as it goes so a crash loses at most one round.

- ``config.json``: the resolved run config;
- ``metrics.jsonl``: one line per round (per-client training reports -- the mechanism and epsilon each site
  sent --, federated evaluation when the sites released noised sums, central evaluation);
- ``summary.json``: the final figures (rewritten after every round, atomically), with ``noise_source`` (what the
  run asked every site for: ``site-csprng``, or ``seeded`` for reproducible simulations) and
  ``noise_sources_reported`` (what the sites said they used);
- ``global.safetensors`` (plaintext) or ``global.he-checkpoint`` (encrypted): the trainable weights, with their
  model card (common/model_card.py), written after the last round;
- ``rounds.png``: accuracy and epsilon per round;
- ``checkpoint/``: the global state and round counter after every completed round (server/checkpoint.py), what
  ``privatune simulate --resume`` continues from.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.jsonsafe import jsonable
from privatune.common.mechanism import DPMechanism
from privatune.common.protocol import (
    KEY_CENTRAL_ACCURACY,
    KEY_CENTRAL_LOSS,
    KEY_CENTRAL_MACRO_F1,
    KEY_EPSILON,
    KEY_EPSILON_DATASET,
    KEY_FED_ACCURACY,
    KEY_FED_LOSS,
    KEY_FED_MAX_SITE_EPSILON,
    KEY_FED_NOISED,
    KEY_NOISE_SOURCE,
    KEY_NUM_EXAMPLES,
)

# What summary.json's "status" can say: running (in progress, or the process died), completed (at least
# one round aggregated), failed (none did: see failure_reasons), interrupted (SIGINT/SIGTERM), stopped
# (the federation ended early after aggregating, e.g. budgets exhausted).
RUN_STATUSES = ("running", "completed", "failed", "interrupted", "stopped")

# Keys of a client's entry in a round's record besides the wire keys it reported.
NODE_ID = "node-id"
NOT_REPORTED = "not reported"  # a trained client that named no known noise source


def trained_entry(
    mechanism: DPMechanism,
    *,
    epsilon: float,
    epsilon_dataset: float | None,
    num_examples: int | None,
    node_id: int,
    noise_source: str | None,
) -> dict[str, Any]:
    """A trained client's entry in ``RoundReport.clients``: what it reported, under the reply's metric keys
    (numbers as floats), with its node and noise source."""
    entry: dict[str, Any] = {KEY_EPSILON: float(epsilon)}
    if epsilon_dataset is not None:
        entry[KEY_EPSILON_DATASET] = float(epsilon_dataset)
    entry.update({key: float(value) for key, value in mechanism.to_metrics().items()})
    if num_examples is not None:
        entry[KEY_NUM_EXAMPLES] = float(num_examples)
    entry[NODE_ID] = int(node_id)
    entry[KEY_NOISE_SOURCE] = noise_source or NOT_REPORTED
    return entry


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(jsonable(data), fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


@dataclass
class RoundReport:
    round: int
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)  # client id -> its training report
    # client id (or node-N; "id@node-N" for a second reply claiming an id already seen this round) -> reason
    dropped: dict[str, str] = field(default_factory=dict)
    # client id -> {KEY_EPSILON, NODE_ID} of an update that was trained (spent) but rejected by screening
    rejected_spends: dict[str, dict[str, Any]] = field(default_factory=dict)
    federated: dict[str, float] = field(default_factory=dict)  # pooled noised site releases only (release-metrics)
    released: dict[str, float] = field(default_factory=dict)  # client id -> its run epsilon after its metric release
    central: dict[str, float] = field(default_factory=dict)
    aggregated: bool = False
    seconds: float = 0.0
    sampled: int = 0  # clients sent a train message this round (server/sampling.py)


@dataclass
class RunRecorder:
    """Collects round reports and keeps the output folder current."""

    out_dir: Path
    summary_base: dict[str, Any]
    observer: Callable[[RoundReport], None] | None = None
    rounds: list[RoundReport] = field(default_factory=list)
    per_client_epsilon: dict[str, float] = field(default_factory=dict)
    noise_sources: set[str] = field(default_factory=set)  # what trained clients reported (KEY_NOISE_SOURCE)
    stopped_reason: str = ""
    # "running" until the run ends (a crashed run's summary says so), then one of RUN_STATUSES.
    status: str = "running"
    failure_reasons: dict[str, str] = field(default_factory=dict)  # client -> why it did not train
    warnings: list[str] = field(default_factory=list)
    # One summary write at a time: a signal handler's "interrupted" must not be overwritten by a write the
    # ServerApp's thread had already begun with "running" (re-entrant: the handler may run in a writing thread).
    _write_lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "metrics.jsonl").touch()

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.out_dir / "config.json", config)

    def restore(self, reports: list[RoundReport]) -> None:
        """A resumed run's earlier rounds (server/resume.py), already in metrics.jsonl: counted, not written again."""
        for report in reports:
            self._absorb(report)

    def finish_round(self, report: RoundReport) -> None:
        self._absorb(report)
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            row = {"run_id": self.summary_base.get("run_id"), **report.__dict__}
            fh.write(json.dumps(jsonable(row), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.write_summary()
        if self.observer is not None:
            self.observer(report)

    def _absorb(self, report: RoundReport) -> None:
        self.rounds.append(report)
        # A rejected update was still trained: its spend counts like an aggregated one.
        for cid, rep in [*report.clients.items(), *report.rejected_spends.items()]:
            eps = rep.get(KEY_EPSILON)
            if isinstance(eps, (int, float)):
                self.per_client_epsilon[cid] = float(eps)
            if isinstance(rep.get(KEY_NOISE_SOURCE), str):
                self.noise_sources.add(rep[KEY_NOISE_SOURCE])
        for cid, eps in report.released.items():  # a metric release comes after the round's training
            self.per_client_epsilon[cid] = max(float(eps), self.per_client_epsilon.get(cid, 0.0))

    def conclude(self) -> str:
        """Settle the final status: ``failed`` when no round aggregated (with every client's reason),
        ``completed`` otherwise (with a warning when later rounds did not aggregate)."""
        if self.status == "interrupted":
            return self.status
        trained = [r for r in self.rounds if r.round > 0 and r.aggregated]
        last_reason: dict[str, str] = {}
        for r in self.rounds:
            last_reason.update(r.dropped)
        if not trained:
            self.status = "failed"
            self.failure_reasons = dict(sorted(last_reason.items()))
            if not self.failure_reasons:
                self.failure_reasons = {"server": self.stopped_reason or "no client update was aggregated"}
            return self.status
        if self.status != "stopped":
            self.status = "completed"
        later = [r.round for r in self.rounds if r.round > trained[-1].round]
        if later:
            self.warnings.append(
                f"round(s) {', '.join(map(str, later))} aggregated nothing; the global model is the one of "
                f"round {trained[-1].round}"
            )
            self.failure_reasons = dict(sorted(last_reason.items()))
        return self.status

    def participation(self) -> dict[str, list[int]]:
        """Client id -> the rounds it trained in (aggregated or rejected: both spent), for sampled runs."""
        seen: dict[str, list[int]] = {}
        for r in self.rounds:
            for cid in [*r.clients, *r.rejected_spends]:
                seen.setdefault(cid, []).append(r.round)
        return dict(sorted(seen.items()))

    def summary(self) -> dict[str, Any]:
        trained_rounds = [r for r in self.rounds if r.round > 0 and r.aggregated]
        last_central = next((r.central for r in reversed(self.rounds) if r.central), {})
        last_fed = next((r.federated for r in reversed(self.rounds) if r.federated), {})
        return {
            **self.summary_base,
            "rounds_completed": len(trained_rounds),
            "test_accuracy": last_central.get(KEY_CENTRAL_ACCURACY),
            "test_macro_f1": last_central.get(KEY_CENTRAL_MACRO_F1),
            "test_loss": last_central.get(KEY_CENTRAL_LOSS),
            # Federated figures exist only when the sites released them, always DP-noised:
            "federated_accuracy": last_fed.get(KEY_FED_ACCURACY),
            "federated_loss": last_fed.get(KEY_FED_LOSS),
            "federated_noised": bool(last_fed.get(KEY_FED_NOISED)) if last_fed else None,
            "federated_max_site_epsilon": last_fed.get(KEY_FED_MAX_SITE_EPSILON),
            "per_client_epsilon": dict(sorted(self.per_client_epsilon.items())),
            "participation": self.participation(),
            "clients_sampled_per_round": [r.sampled for r in self.rounds if r.round > 0],
            "max_client_epsilon": max(self.per_client_epsilon.values(), default=None),
            "noise_sources_reported": sorted(self.noise_sources),
            "stopped_reason": self.stopped_reason,
            "status": self.status,
            "failure_reasons": dict(self.failure_reasons),
            "warnings": list(self.warnings),
        }

    def write_summary(self, **extra: Any) -> dict[str, Any]:
        with self._write_lock:
            data = {**self.summary(), **extra}
            write_json_atomic(self.out_dir / "summary.json", data)
        return data

    def mark_ended(self, status: str, reason: str) -> None:
        """Set the final status and write the summary, after any write in progress and before any later one."""
        with self._write_lock:
            self.status = status
            self.stopped_reason = reason
            self.write_summary()
