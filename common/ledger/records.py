"""The ledger's rows as values: SpendEntry (a site's spend), ClientReport (what a client told the server), the
stored records around them (SpendRecord, RunRecord, ReportRecord), and the validation each row passes.

Separate from storage so that a row is checked the same way whether it is about to be written or was just read,
without any SQLite in sight; the statuses and purposes a row may hold are defined here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from privatune.common import protocol as wire
from privatune.common.accounting import ACCOUNTANTS, Mechanism
from privatune.common.ledger.errors import LedgerError
from privatune.common.mechanism import DPMechanism, MechanismError
from privatune.common.protocol import NOISE_SOURCE_SEEDED, NOISE_SOURCES

STATUS_TRAINED = wire.STATUS_TRAINED
STATUS_BUDGET_EXHAUSTED = wire.STATUS_BUDGET
STATUS_DROPPED = "dropped"  # the server's own status: a sampled client whose reply never arrived
STATUSES = (STATUS_TRAINED, STATUS_BUDGET_EXHAUSTED, STATUS_DROPPED)

#: Why a spend was made: DP-SGD training, or a noised release of metrics on validation records
#: (client/metrics_release.py).
PURPOSE_TRAIN = "train"
PURPOSE_METRICS = "metrics"
PURPOSE_PERSONALISE = "personalise"  # a site's DP fine-tuning of the final global model, kept at the site (issue 15)
PURPOSES = (PURPOSE_TRAIN, PURPOSE_METRICS, PURPOSE_PERSONALISE)


def utc_now() -> str:
    """The current time as ISO-8601 UTC with microseconds (the ledger's timestamp format)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _bad(where: str, name: str, value: Any, want: str) -> LedgerError:
    return LedgerError(f"{where}: {name} must be {want}, got {value!r}")


def _text(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(where, name, value, "a non-empty string")
    return value


def _int(where: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(where, name, value, f"an integer >= {minimum}")
    return value


def _real(
    where: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    allow_inf: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _bad(where, name, value, "a number")
    value = float(value)
    if math.isinf(value) and not allow_inf:
        raise _bad(where, name, value, "finite")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise _bad(where, name, value, f"in {bracket}{low:g}, {high:g}]")
    return value


#: The range of each real field a row holds: (low, high, low open, infinity allowed). A spend and a report check
#: their mechanism fields alike.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "noise_multiplier": (0.0, math.inf, False, False),
    "sample_rate": (0.0, 1.0, True, False),
    "max_grad_norm": (0.0, math.inf, False, True),
    "delta": (0.0, 1.0, True, False),
    "epsilon_run": (0.0, math.inf, False, True),
    "epsilon_dataset": (0.0, math.inf, False, True),
    "epsilon_reported": (0.0, math.inf, False, True),
    "epsilon_dataset_reported": (0.0, math.inf, False, True),
}
_MECHANISM_REALS = ("noise_multiplier", "sample_rate", "max_grad_norm", "delta")
_SPEND_REALS = (*_MECHANISM_REALS, "epsilon_run", "epsilon_dataset")
_REPORT_REALS = (*_MECHANISM_REALS, "epsilon_reported", "epsilon_dataset_reported")


def _ranged(where: str, name: str, value: Any) -> float:
    low, high, low_open, allow_inf = _RANGES[name]
    return _real(where, name, value, low=low, high=high, low_open=low_open, allow_inf=allow_inf)


def _timestamp(where: str, name: str, value: Any) -> str:
    _text(where, name, value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _bad(where, name, value, "an ISO-8601 timestamp") from None
    offset = parsed.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise _bad(where, name, value, "an ISO-8601 timestamp in UTC (ending +00:00 or Z)")
    return value


@dataclass(frozen=True)
class SpendEntry:
    """One training round at one site: the mechanism applied to the dataset and the epsilon it brings."""

    run_id: str
    round: int
    site_id: str
    dataset_fingerprint: str
    params_fingerprint: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_run: float  # epsilon of this run after this round (rounds 1..r of this run)
    epsilon_dataset: float  # epsilon of this dataset across ALL runs in the ledger after this round
    max_epsilon: float | None  # the site budget in force (None = none)
    started_at: str  # ISO-8601 UTC
    recorded_at: str  # ISO-8601 UTC
    # The cohort (row of the ``cohorts`` table) the mechanism sampled from; None in ledgers written before
    # per-record budgets: such a spend counts against every record of the site.
    cohort_id: str | None = None
    purpose: str = PURPOSE_TRAIN
    # Where the round's DP noise came from (common.protocol NOISE_SOURCES). Defaults to "seeded", the weaker claim:
    # a row says "site-csprng" only when the writer says so; rows of ledgers older than the field read as "seeded".
    noise_source: str = NOISE_SOURCE_SEEDED
    # Augmentation multiplicity K of the round (issue 16; no effect on epsilon); rows older than the field read 1.
    augment_views: int = 1

    def __post_init__(self) -> None:
        w = f"SpendEntry(run {self.run_id!r}, round {self.round!r})"
        _int(w, "augment_views", self.augment_views, 1)
        if self.cohort_id is not None:
            _text(w, "cohort_id", self.cohort_id)
        if self.purpose is None:  # a row written before purposes existed
            object.__setattr__(self, "purpose", PURPOSE_TRAIN)
        if self.purpose not in PURPOSES:
            raise _bad(w, "purpose", self.purpose, f"one of {PURPOSES}")
        for name in ("run_id", "site_id", "dataset_fingerprint", "params_fingerprint"):
            _text(w, name, getattr(self, name))
        _int(w, "round", self.round, 1)
        _int(w, "steps", self.steps, 0)
        norm = {name: _ranged(w, name, getattr(self, name)) for name in _SPEND_REALS}
        if norm["delta"] == 1.0:
            raise _bad(w, "delta", self.delta, "in (0, 1)")
        if self.max_epsilon is not None:
            norm["max_epsilon"] = _real(w, "max_epsilon", self.max_epsilon, low=0.0, low_open=True)
        if self.accountant not in ACCOUNTANTS:
            raise _bad(w, "accountant", self.accountant, f"one of {ACCOUNTANTS}")
        _timestamp(w, "started_at", self.started_at)
        _timestamp(w, "recorded_at", self.recorded_at)
        if self.noise_source not in NOISE_SOURCES:
            raise _bad(w, "noise_source", self.noise_source, f"one of {NOISE_SOURCES}")
        for name, value in norm.items():  # store ints given for float fields as floats (stable hashes)
            object.__setattr__(self, name, value)

    @classmethod
    def from_mechanism(cls, mechanism: DPMechanism, **rest: Any) -> SpendEntry:
        """The spend of ``mechanism``; ``rest`` holds every other field (run, round, site, epsilons, times ...)."""
        return cls(**mechanism.columns(), **rest)

    @property
    def mechanism(self) -> Mechanism:
        """The accountants' history entry ``(noise_multiplier, sample_rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def dp_mechanism(self) -> DPMechanism:
        """The whole mechanism as one value. A row the ledger accepts may still fall outside DPMechanism's ranges
        (a zero or infinite clip bound): that raises MechanismError."""
        return DPMechanism.from_columns(vars(self))


@dataclass(frozen=True)
class SpendRecord:
    """A stored site-ledger row."""

    seq: int
    entry: SpendEntry
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class RunRecord:
    """A stored server-ledger run row: the run's configuration and aggregation mode."""

    seq: int
    run_id: str
    config: dict[str, Any]
    aggregation: str
    recorded_at: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class ClientReport:
    """What one client reported to the server for one round. Mechanism fields are None unless it trained."""

    run_id: str
    round: int
    client_id: str  # must equal the site_id the client writes into its own ledger (the audit joins on it)
    node_id: str  # Flower node id (a uint64, stored as text)
    status: str  # one of STATUSES
    reason: str
    dataset_fingerprint: str | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    max_grad_norm: float | None
    delta: float | None
    accountant: str | None
    epsilon_reported: float | None  # the client's epsilon for this run after this round
    epsilon_dataset_reported: float | None  # the client's epsilon for its dataset across runs, if it reported one
    recorded_at: str
    noise_source: str | None = None  # what the client reported (NOISE_SOURCES); None when it reported none

    def __post_init__(self) -> None:
        w = f"ClientReport(run {self.run_id!r}, round {self.round!r}, client {self.client_id!r})"
        _text(w, "run_id", self.run_id)
        _text(w, "client_id", self.client_id)
        _int(w, "round", self.round, 1)
        if isinstance(self.node_id, bool) or not isinstance(self.node_id, (int, str)) or self.node_id == "":
            raise _bad(w, "node_id", self.node_id, "an integer or a non-empty string")
        object.__setattr__(self, "node_id", str(self.node_id))
        if self.status not in STATUSES:
            raise _bad(w, "status", self.status, f"one of {STATUSES}")
        if not isinstance(self.reason, str):
            raise _bad(w, "reason", self.reason, "a string")
        _timestamp(w, "recorded_at", self.recorded_at)
        mech = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta", "accountant", "epsilon_reported")
        if self.status == STATUS_TRAINED:
            missing = [n for n in mech if getattr(self, n) is None]
            if missing:
                raise LedgerError(f"{w}: a 'trained' report needs {', '.join(missing)}")
        for name in _REPORT_REALS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _ranged(w, name, getattr(self, name)))
        if self.steps is not None:
            _int(w, "steps", self.steps, 0)
        if self.accountant is not None and self.accountant not in ACCOUNTANTS:
            raise _bad(w, "accountant", self.accountant, f"one of {ACCOUNTANTS}")
        if self.noise_source is not None and self.noise_source not in NOISE_SOURCES:
            raise _bad(w, "noise_source", self.noise_source, f"one of {NOISE_SOURCES} or None")
        if self.dataset_fingerprint is not None and not isinstance(self.dataset_fingerprint, str):
            raise _bad(w, "dataset_fingerprint", self.dataset_fingerprint, "a string or None")

    @property
    def mechanism(self) -> Mechanism | None:
        """The accountants' history entry, when the report holds one."""
        if self.noise_multiplier is None or self.sample_rate is None or self.steps is None:
            return None
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def dp_mechanism(self) -> DPMechanism | None:
        """The whole mechanism as one value; None when the report holds only part of one (a dropped reply) or one
        out of DPMechanism's ranges."""
        try:
            return DPMechanism.from_columns(vars(self))
        except MechanismError:  # a None field fails DPMechanism's checks too
            return None


@dataclass(frozen=True)
class ReportRecord:
    """A stored server-ledger report row."""

    seq: int
    report: ClientReport
    prev_hash: str
    hash: str
