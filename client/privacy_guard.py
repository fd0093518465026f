"""A site's privacy budget, per record: plan a round's spend, exclude or refuse what is over budget, record first.

The ledger on disk is the source of truth (Flower's in-memory node state dies with the SuperNode). Budgets follow
records, not files: every spend names the cohort (the exact set of keyed record ids) it sampled from, and a record's
epsilon composes every spend whose cohort holds it, at the site's delta (common/record_budget.py). Order of events
for one round, so that a crash at any point over-counts rather than under-counts:

1. plan: the mechanism this round will run for the training records whose budget allows it (records that would
   pass ``max-epsilon`` are left out and the mechanism recomputed for the smaller set, until nothing changes), and
   the epsilon it leads to for the worst record, in this run and over every run in the ledger;
2. refuse if nothing can train, if ``on-exhausted=refuse`` and a record is over budget, or if the run's target
   would be passed;
3. append the cohort and the spend to the ledger (committed, fsynced) -- *before* training starts;
4. train on exactly that cohort, and release the update.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from privatune.common.accounting import Mechanism, calibrate_noise, sample_rate, steps_per_epoch
from privatune.common.config import RunConfig
from privatune.common.ledger import PURPOSE_TRAIN, SiteLedger, SpendEntry, SpendRecord
from privatune.common.mechanism import DPMechanism
from privatune.common.protocol import NOISE_SOURCE_SEEDED
from privatune.common.record_budget import RecordEpsilons, Spend, record_epsilons

log = logging.getLogger("privatune.client")

DEFAULT_SITE_DELTA = 1e-5
ON_EXHAUSTED = ("exclude", "refuse")

# Calibration is a binary search over the accountant: memoise it, the inputs repeat every round. Bounded: a
# simulation worker serves many virtual clients, each with its own (q, steps).
_NOISE_CACHE: dict[tuple[float, float, float, int, str], float] = {}
_NOISE_CACHE_SIZE = 4096


@dataclass(frozen=True)
class RoundPlan:
    """The spend one round will make, computed before any data is touched (a refusal plans zero steps)."""

    allowed: bool
    reason: str
    mechanism: DPMechanism
    epsilon_run: float  # worst training record, this run, after this round
    epsilon_dataset: float  # worst training record, every run, after this round
    train: tuple[int, ...] = ()  # indices (into the training records offered) this round trains on
    excluded: int = 0  # records left out for their budget: kept in the site log, never sent

    # Shortcuts to the mechanism's fields.
    @property
    def noise_multiplier(self) -> float:
        return self.mechanism.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.mechanism.sample_rate

    @property
    def steps(self) -> int:
        return self.mechanism.steps

    @property
    def delta(self) -> float:
        return self.mechanism.delta


def plan_noise(cfg: RunConfig, num_records: int, delta: float) -> float:
    """Noise for this client: none without DP (an infinite spend, recorded as such), explicit, or
    calibrated so the whole run ends at ``target-epsilon``. Noised metric releases (release-metrics) touch
    only validation records, so with per-record budgets they take nothing from the training records' target."""
    if not cfg.private:
        return 0.0
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    q = sample_rate(num_records, cfg.batch_size)
    total_steps = cfg.num_server_rounds * cfg.local_epochs * steps_per_epoch(num_records, cfg.batch_size)
    key = (cfg.target_epsilon, delta, q, total_steps, cfg.accountant)
    if key not in _NOISE_CACHE:
        if len(_NOISE_CACHE) >= _NOISE_CACHE_SIZE:
            _NOISE_CACHE.pop(next(iter(_NOISE_CACHE)))  # the oldest entry
        _NOISE_CACHE[key] = calibrate_noise(cfg.target_epsilon, delta, q, total_steps, cfg.accountant)
    return _NOISE_CACHE[key]


def check_site_delta(delta: float, num_records: int) -> float:
    """The site's delta must be below 0.1/n: a delta near 1/n allows releasing a whole record."""
    if not 0.0 < delta < 0.1 / max(num_records, 1):
        raise ValueError(
            f"the site's delta={delta:g} is not below 0.1/n = {0.1 / max(num_records, 1):.3g} for its {num_records} "
            f"records: set node-config delta to at most {0.1 / max(num_records, 1) / 2:.2g}"
        )
    return delta


def run_delta(cfg: RunConfig, site_delta: float) -> float:
    """The delta every epsilon of a run is computed at: the site's, or the run's when it is stricter."""
    if cfg.delta > site_delta:
        raise ValueError(
            f"looser delta refused: the run asks for delta={cfg.delta:g} but this site's delta is "
            f"{site_delta:g}; run with delta=0 (the site's) or a smaller one"
        )
    return cfg.delta or site_delta


def ledger_spends(entries: Sequence[SpendRecord]) -> list[Spend]:
    """The budget's view of ledger rows: each row's mechanism, cohort and run."""
    return [Spend(r.entry.mechanism, r.entry.cohort_id, r.entry.run_id) for r in entries]


def _refusal(reason: str, cfg: RunConfig, delta: float) -> RoundPlan:
    return RoundPlan(False, reason, DPMechanism(0.0, 1.0, 0, cfg.max_grad_norm, delta, cfg.accountant), 0.0, 0.0)


def records_over_budget(eps: RecordEpsilons, max_epsilon: float | None) -> list[int]:
    if max_epsilon is None:
        return []
    return [i for i, e in enumerate(eps.spent) if e > max_epsilon + 1e-9]


def plan_round(
    cfg: RunConfig,
    run_id: str,
    record_ids: Sequence[bytes],
    cohorts: Mapping[str, frozenset[bytes]],
    spends: Sequence[Spend],
    *,
    max_epsilon: float | None,
    on_exhausted: str,
    delta: float,
    site_id: str = "",
) -> RoundPlan:
    """One round's plan from a ledger's state (its cohorts and spends), read-only: the guard plans from the ledger
    on disk, ``privatune site check`` from a copy it extends round by round (client/budget.py). A fixed point:
    leaving records out raises the sample rate, which may push more records over budget."""
    keep = list(range(len(record_ids)))
    while True:
        if not keep:
            return _refusal(
                "budget exhausted: every training record at this site would pass the site budget "
                f"max-epsilon={max_epsilon:g} with this round",
                cfg,
                delta,
            )
        n = len(keep)
        steps = cfg.local_epochs * steps_per_epoch(n, cfg.batch_size)
        mech = DPMechanism(
            plan_noise(cfg, n, delta),
            sample_rate(n, cfg.batch_size),
            steps,
            cfg.max_grad_norm,
            delta,
            cfg.accountant,
            augment_views=cfg.augment_views,  # recorded with the spend; no effect on epsilon (issue 16)
        )
        ids = [record_ids[i] for i in keep]
        eps = record_epsilons(ids, cohorts, spends, delta, cfg.accountant, new=[mech.gaussian], run_id=run_id)
        over = records_over_budget(eps, max_epsilon)
        if not over:
            break
        if on_exhausted == "refuse":
            return _refusal(
                f"budget exhausted: this round would bring some records past the site budget "
                f"max-epsilon={max_epsilon:g} (worst {eps.worst:.3f}); the site refuses "
                "(on-exhausted=refuse)",
                cfg,
                delta,
            )
        dropped = set(over)
        keep = [k for j, k in enumerate(keep) if j not in dropped]
    excluded = len(record_ids) - len(keep)
    if excluded and site_id:
        log.info("[%s] %d of %d training records left out: their budget is spent", site_id, excluded, len(record_ids))
    allowed, reason = True, ""
    if cfg.private and eps.worst_run > cfg.target_epsilon * 1.01 + 1e-6:
        allowed = False
        reason = (
            f"run target exhausted: this round would bring this run's epsilon to {eps.worst_run:.3f}, "
            f"above target-epsilon={cfg.target_epsilon:g}"
        )
    return RoundPlan(allowed, reason, mech, eps.worst_run, eps.worst, tuple(keep), excluded)


@dataclass
class PrivacyGuard:
    """Per-record budget checks and write-ahead recording for one site.

    ``delta`` is the site's (node-config ``delta``); a run may ask for a stricter one, never a looser one.
    ``key_check`` (client/record_ids.key_check of the site key) must match the one the ledger's cohorts were
    made with: record ids from another key would match no earlier spend and restart every budget at zero.
    """

    ledger_path: str | Path
    site_id: str
    max_epsilon: float | None
    delta: float = DEFAULT_SITE_DELTA
    on_exhausted: str = "exclude"
    key_check: str = "unkeyed"
    ledger: SiteLedger = field(init=False)

    def __post_init__(self) -> None:
        if self.on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on-exhausted must be one of {ON_EXHAUSTED}, got {self.on_exhausted!r}")
        self.ledger = SiteLedger(Path(self.ledger_path))
        others = self.ledger.key_checks() - {self.key_check}
        if others:
            raise ValueError(
                f"the site key does not match the key the spends in {Path(self.ledger_path).name} were recorded "
                "with: restore the site key backed up with this ledger (a new key would restart every record's "
                "budget at zero)"
            )

    # -- reading the budget ----------------------------------------------------------------------------------

    def run_delta(self, cfg: RunConfig) -> float:
        return run_delta(cfg, self.delta)

    def spends(self) -> list[Spend]:
        return ledger_spends(self.ledger.entries())

    def epsilons(
        self,
        record_ids: Sequence[bytes],
        accountant: str,
        *,
        delta: float | None = None,
        new: Sequence[Mechanism | DPMechanism] = (),
        run_id: str | None = None,
    ) -> RecordEpsilons:
        """Each record's epsilon after every recorded spend holding it (plus ``new``, applied to all of them):
        the generic budget read (training plans it; noised metric releases check it the same way)."""
        gaussian = [m.gaussian if isinstance(m, DPMechanism) else m for m in new]
        return record_epsilons(
            record_ids,
            self.ledger.cohorts(),
            self.spends(),
            delta or self.delta,
            accountant,
            new=gaussian,
            run_id=run_id,
        )

    def over_budget(self, eps: RecordEpsilons) -> list[int]:
        return records_over_budget(eps, self.max_epsilon)

    # -- planning a round ------------------------------------------------------------------------------------

    def plan(self, cfg: RunConfig, run_id: str, record_ids: Sequence[bytes]) -> RoundPlan:
        """The round's cohort and mechanism for the training records ``record_ids`` (see :func:`plan_round`)."""
        return plan_round(
            cfg,
            run_id,
            record_ids,
            self.ledger.cohorts(),
            self.spends(),
            max_epsilon=self.max_epsilon,
            on_exhausted=self.on_exhausted,
            delta=self.run_delta(cfg),
            site_id=self.site_id,
        )

    # -- recording -------------------------------------------------------------------------------------------

    def record_spend(
        self,
        *,
        purpose: str,
        record_ids: Sequence[bytes],
        mechanism: DPMechanism,
        run_id: str,
        server_round: int,
        dataset_fingerprint: str,
        params_fingerprint: str,
        epsilon_run: float,
        epsilon_dataset: float,
        started_at: datetime,
        noise_source: str = NOISE_SOURCE_SEEDED,
    ) -> int:
        """Append a spend on exactly ``record_ids`` durably (its cohort first); returns the spend's sequence
        number. Any release that costs privacy at this site goes through here (``purpose`` says which kind,
        ``noise_source`` where its noise comes from: ``privatune.client.randomness``)."""
        cohort = self.ledger.add_cohort(record_ids, self.key_check)
        entry = SpendEntry.from_mechanism(
            mechanism,
            run_id=run_id,
            round=server_round,
            site_id=self.site_id,
            dataset_fingerprint=dataset_fingerprint,
            params_fingerprint=params_fingerprint,
            epsilon_run=epsilon_run,
            epsilon_dataset=epsilon_dataset,
            max_epsilon=self.max_epsilon,
            started_at=started_at.isoformat(),
            recorded_at=datetime.now(UTC).isoformat(),
            cohort_id=cohort,
            purpose=purpose,
            noise_source=noise_source,
        )
        return self.ledger.append(entry)

    def record(
        self,
        plan: RoundPlan,
        cfg: RunConfig,
        run_id: str,
        server_round: int,
        record_ids: Sequence[bytes],
        dataset_fingerprint: str,
        params_fingerprint: str,
        started_at: datetime,
        noise_source: str = NOISE_SOURCE_SEEDED,
        purpose: str = PURPOSE_TRAIN,
    ) -> int:
        """Write-ahead record of a planned training round on the plan's cohort of ``record_ids`` (the plan carries
        the mechanism; ``cfg`` is the run it was planned for; ``purpose`` "personalise" for client/personalise.py)."""
        return self.record_spend(
            purpose=purpose,
            record_ids=[record_ids[i] for i in plan.train],
            mechanism=plan.mechanism,
            run_id=run_id,
            server_round=server_round,
            dataset_fingerprint=dataset_fingerprint,
            params_fingerprint=params_fingerprint,
            epsilon_run=plan.epsilon_run,
            epsilon_dataset=plan.epsilon_dataset,
            started_at=started_at,
            noise_source=noise_source,
        )
