"""What an audit produces: its violations, accounted rows, per-party summaries and the report that holds them.

Pure data (plus properties derived from a row's own fields): the checks fill these in, the renderings read them.
Kept apart so that neither side has to import the other to know the report's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from privatune.common.accountants import PLD, PRV
from privatune.common.audit.values import num
from privatune.common.mechanism import RELEASE_FIELDS

SITE = "site"
SERVER = "server"
VIOLATION_KINDS = (
    "unreadable",  # not a ledger, not readable, or its pages / structure are damaged (the file as a whole)
    "chain-malformed",  # the file, a table or a row is not a well-formed ledger (corrupt, wrong type, NULL...)
    "chain-edited",
    "chain-deleted",
    "chain-inserted",
    "chain-reordered",  # hash chain broken at a named row
    "invalid-entry",  # a row whose mechanism cannot be accounted (e.g. sample rate 0)
    "unverifiable",  # the recorded accountant cannot recompute this epsilon
    "epsilon-underreported",  # a recorded epsilon below the independent recomputation
    "budget-exceeded",  # the recomputed dataset epsilon is above the site budget in force
    "missing-at-site",  # the server has the client as trained in a round the client's ledger lacks
    "missing-at-server",  # the site recorded a spend in a run the server ledger knows nothing of for that round
    "report-mismatch",  # what the server recorded differs from the site's record
    "invalid-cohort",  # a cohort row whose ids do not match its id or size, or a spend naming a missing cohort
    "selection-mismatch",  # a private-selection record its site ledger's spends do not bear out (audit/selection.py)
)
SEEDED_FLAG = "reproducible noise: no protection against whoever knows the seed"
# The mechanism columns an entry carries as recorded (the ledgers name them like DPMechanism's fields).
MECHANISM_FIELDS = RELEASE_FIELDS  # the site ledger's augment_views is recorded only (common/mechanism.py)


@dataclass(frozen=True)
class Violation:
    kind: str  # one of VIOLATION_KINDS
    file: str
    seq: int | None  # the row (None: the file as a whole; 0: a chain's head record)
    message: str
    table: str | None = None  # spend (site), runs / reports (server)
    party: str | None = None  # the site / client concerned, when known


@dataclass
class AuditEntry:
    """One accounted row: a site's spend or a server's record of a client report, with recomputed epsilons."""

    source: str  # SITE or SERVER
    file: str
    seq: int
    run_id: str
    round: int
    party: str  # site_id (site rows) or client_id (server rows)
    status: str  # "trained" for site rows; the reported status for server rows
    node_id: str | None
    dataset_fingerprint: str | None
    params_fingerprint: str | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    max_grad_norm: float | None
    delta: float | None
    accountant: str | None
    epsilon_reported: float | None  # site: epsilon_run; server: what the client reported for the run
    epsilon_dataset_reported: float | None
    max_epsilon: float | None
    epsilon_rdp: float | None = None  # recomputed epsilon of the run after this round, RDP accountant
    epsilon_prv: float | None = None  # same with the PRV accountant (None when PRV cannot compute it)
    epsilon_dataset: float | None = None  # recomputed dataset epsilon (all runs), with the recorded accountant
    epsilon_pld: float | None = None  # run epsilon with dp-accounting's PLD (None when PLD cannot compute it)
    independent_accountant: str | None = None  # pld, or prv for rows accounted with pld
    epsilon_independent: float | None = None  # run epsilon with the independent accountant
    epsilon_dataset_independent: float | None = None  # dataset epsilon with the independent accountant (sites)
    aggregation: str | None = None
    recorded_at: str | None = None
    problems: list[str] = field(default_factory=list)  # violation kinds that name this row
    noise_source: str | None = None  # site rows: as recorded ("seeded" for ledgers older than the field)
    purpose: str = "train"  # site rows: "train" (DP-SGD) or "metrics" (a noised release of evaluation sums)

    @property
    def epsilon_recomputed(self) -> float | None:
        """The recomputed run epsilon with the accountant this row names."""
        return {PRV: self.epsilon_prv, PLD: self.epsilon_pld}.get(str(self.accountant), self.epsilon_rdp)

    @property
    def independent_ratio(self) -> float | None:
        """Recorded run epsilon over the independent recomputation (1.0 for equal values; < 1 under-reports)."""
        rep, ind = num(self.epsilon_reported), self.epsilon_independent
        if rep is None or ind is None or math.isnan(rep) or not ind > 0:
            return None
        if math.isinf(ind):
            return 1.0 if math.isinf(rep) else 0.0
        return rep / ind


@dataclass(frozen=True)
class LedgerFileInfo:
    path: str
    kind: str  # SITE, SERVER or "unknown"
    rows: int
    chain_ok: bool
    name: str = ""  # what the outputs call it: the site id its rows record, "server", or from its path


@dataclass
class PartySummary:
    source: str
    party: str
    file: str
    runs: list[str]
    rounds_trained: int
    budget_exhausted: int
    dropped: int
    accountant: str | None
    epsilon_run: float | None  # largest recomputed run epsilon (recorded accountant)
    epsilon_total: float | None  # sites: the site's total (its SiteSummary: the worst record over all datasets)
    max_epsilon: float | None  # the budget last in force (sites only)
    violations: int
    seeded_rounds: int = 0  # trained rounds whose noise came from a seed (reproducible: predictable by its holder)
    datasets: int = 0  # sites: the datasets its ledger spent on

    @property
    def budget_left(self) -> float | None:
        return _left(self.max_epsilon, self.epsilon_total)


def _left(budget: float | None, spent: float | None) -> float | None:
    return None if budget is None or spent is None else budget - spent


@dataclass
class DatasetSummary:
    """One dataset of one site ledger: its total (``common/ledger/totals.py``: the worst of the records its spends
    touched, composed over every spend holding it), computed once and shown alike by every output."""

    site: str  # the ledger's name (LedgerFileInfo.name)
    file: str
    dataset_fingerprint: str
    runs: list[str]
    spends: int  # accounted spend rows on it (training rounds and metric releases)
    rounds_trained: int
    records: int | None  # distinct keyed records its spends touched (None: spends from before cohorts only)
    shared_records: int  # of those, records that spends on another of the site's datasets touched too
    accountant: str
    delta: float
    epsilon: float | None  # None: the accountant cannot compute it (``error``)
    max_epsilon: float | None  # the site budget in force at its latest spend
    error: str | None = None

    @property
    def budget_left(self) -> float | None:
        return _left(self.max_epsilon, self.epsilon)


@dataclass
class SiteSummary:
    """One site ledger's total: the worst record at the site over all its datasets (the largest dataset total, and
    at least the composition of every spend from before cohorts)."""

    site: str
    file: str
    datasets: list[str]
    spends: int
    records: int | None
    accountant: str | None
    delta: float | None
    epsilon: float | None
    max_epsilon: float | None  # the site budget in force at its latest spend
    error: str | None = None

    @property
    def budget_left(self) -> float | None:
        return _left(self.max_epsilon, self.epsilon)


@dataclass
class AuditReport:
    tolerance: float
    files: list[LedgerFileInfo]
    entries: list[AuditEntry]
    violations: list[Violation]
    notes: list[str]
    summaries: list[PartySummary]
    datasets: list[DatasetSummary] = field(default_factory=list)
    sites: list[SiteSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def name(self, file: str) -> str:
        """What the outputs call the ledger at ``file`` (LedgerFileInfo.name; its file name if it has none)."""
        return next((f.name for f in self.files if f.path == file and f.name), Path(file).name)
