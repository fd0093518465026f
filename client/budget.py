"""A site's budget, planned before it spends: the whole announced run projected, and what each dataset has spent.

``privatune site check --run-config`` and ``privatune budget`` (privatune/cli/budget.py) read the site ledger and
never write it. A projection replays the privacy guard's own planning (client/privacy_guard.plan_round) for every
round of the run on an in-memory copy of the ledger's cohorts and spends, so it refuses the round the guard would
refuse, at the same delta, with the same noise calibration and accountant. It assumes the site trains in every
round (the coordinator may sample fewer: then the run costs less).

Why budgets do not add up by hand: a record's epsilon is the accountant's epsilon of *every* spend on it composed
together, which is less than the sum of each run's epsilon (8.0 then 6.76 can compose to 9.52). Only the ledger's
composition says what is left; this module computes it the way the guard does, per record, and reports the worst
record of each dataset.

Nothing here leaves the site: projections and ledger contents are shown to the site operator only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from privatune.client.metrics_release import release_mechanism
from privatune.client.privacy_guard import RoundPlan, ledger_spends, plan_round, records_over_budget
from privatune.common.accounting import Mechanism, epsilon_of
from privatune.common.config import RunConfig
from privatune.common.ledger import SpendRecord
from privatune.common.record_budget import Spend, cohort_id_of, pack_ids, record_epsilons

# The run id a projection's virtual spends carry: never one a coordinator issues (those are Flower run ids).
PROJECTED_RUN_ID = "privatune:projected-run"
# A stand-in record for spends written before cohorts (they count for every record of the site).
_NO_COHORT_RECORD = b"\x00" * 16
COMPOSITION_NOTE = (
    "epsilons compose, they do not add: a record's epsilon is the accountant's epsilon of all its spends together, "
    "less than the sum of each run's epsilon (8.0 then 6.76 can compose to 9.52)"
)


@dataclass(frozen=True)
class ProjectedRound:
    round: int
    allowed: bool
    epsilon_run: float  # worst training record, this run, after the round
    epsilon_dataset: float  # worst training record, all runs, after the round
    trained: int  # training records in the round's cohort
    excluded: int  # records left out for their budget (on-exhausted=exclude)
    reason: str = ""


@dataclass
class RunProjection:
    """The announced run replayed through the guard's planning: what fits and what is left after it."""

    rounds: int  # rounds announced (num-server-rounds)
    max_epsilon: float | None
    delta: float
    accountant: str
    per_round: list[ProjectedRound] = field(default_factory=list)
    epsilon_before: float = 0.0  # worst training record, all runs, before the run
    epsilon_after: float = 0.0  # worst training record (trained or left out), all runs, after the rounds that fit
    epsilon_run: float = 0.0  # worst training record, this run, after the rounds that fit
    target_epsilon: float | None = None  # the run's target when its noise is calibrated to it (None: fixed or no DP)
    private: bool = True
    metrics_rounds_fit: int | None = None  # release-metrics: rounds whose validation release fits (None: off)

    @property
    def rounds_fit(self) -> int:
        """Rounds the site would train before its first refusal (nothing is spent on a refused round, so every
        later one is refused too)."""
        return next((r.round - 1 for r in self.per_round if not r.allowed), len(self.per_round))

    @property
    def fits(self) -> bool:
        return self.rounds_fit >= self.rounds

    @property
    def refusal(self) -> str:
        return next((r.reason for r in self.per_round if not r.allowed), "")

    @property
    def remaining_after(self) -> float | None:
        return None if self.max_epsilon is None else max(self.max_epsilon - self.epsilon_after, 0.0)

    @property
    def first_exclusion(self) -> ProjectedRound | None:
        return next((r for r in self.per_round if r.allowed and r.excluded), None)

    def advice(self) -> str:
        """What would make the run fit (empty when it does)."""
        if self.fits:
            return ""
        if not self.private:
            return "a run without DP (dp=false) spends an unbounded epsilon: a site with max-epsilon refuses it"
        if self.target_epsilon is None:
            return (
                f"with the noise multiplier fixed every round costs the same: num-server-rounds={self.rounds_fit} "
                "fits, or raise max-epsilon"
            )
        left = None if self.max_epsilon is None else max(self.max_epsilon - self.epsilon_before, 0.0)
        return (
            f"the run's noise is calibrated so that all its rounds end at target-epsilon={self.target_epsilon:g}, "
            "so announcing fewer rounds costs the same; the whole run fits when its target-epsilon is at most about "
            f"what the worst record has left ({left:.3f}; composition with earlier spends lets a little more "
            "through), or with a larger max-epsilon"
            if left is not None
            else f"the run's own target-epsilon={self.target_epsilon:g} is refused: see the reason above"
        )

    def summary(self) -> str:
        """One line for the site check's table."""
        budget = "no max-epsilon" if self.max_epsilon is None else f"max-epsilon {self.max_epsilon:g}"
        head = (
            f"the whole run fits ({self.rounds} rounds)"
            if self.fits
            else f"only {self.rounds_fit} of {self.rounds} rounds fit: round {self.rounds_fit + 1} would be refused "
            f"({self.refusal})"
        )
        text = (
            f"{head}; worst training record {self.epsilon_before:.3f} now, {self.epsilon_after:.3f} after "
            f"(this run {self.epsilon_run:.3f}) of {budget}"
        )
        if self.remaining_after is not None:
            text += f", {self.remaining_after:.3f} left"
        text += f" [delta {self.delta:g}, {self.accountant}]"
        excl = self.first_exclusion
        if excl is not None:
            text += f"; from round {excl.round} {excl.excluded} records are left out for their budget"
        if self.metrics_rounds_fit is not None and self.metrics_rounds_fit < self.rounds:
            text += f"; metric releases fit {self.metrics_rounds_fit} rounds, then they are withheld"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "rounds_fit": self.rounds_fit,
            "fits": self.fits,
            "refusal": self.refusal,
            "max_epsilon": self.max_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon_before": self.epsilon_before,
            "epsilon_run": self.epsilon_run,
            "epsilon_after": self.epsilon_after,
            "remaining_after": self.remaining_after,
            "metrics_rounds_fit": self.metrics_rounds_fit,
            "advice": self.advice(),
            "per_round": [vars(r) for r in self.per_round],
        }


def project_run(
    cfg: RunConfig,
    train_ids: Sequence[bytes],
    cohorts: Mapping[str, frozenset[bytes]],
    spends: Sequence[Spend],
    *,
    max_epsilon: float | None,
    on_exhausted: str,
    delta: float,
    val_ids: Sequence[bytes] = (),
) -> RunProjection:
    """Plan rounds 1..num-server-rounds as the guard would, each planned spend added to a copy of the ledger's
    state before the next round is planned; stops at the first refusal. ``delta``: the guard's run delta."""
    cohorts, spends = dict(cohorts), list(spends)
    before = record_epsilons(train_ids, cohorts, spends, delta, cfg.accountant).worst
    out = RunProjection(
        cfg.num_server_rounds,
        max_epsilon,
        delta,
        cfg.accountant,
        epsilon_before=before,
        target_epsilon=cfg.target_epsilon if cfg.private and cfg.noise_multiplier <= 0 else None,
        private=cfg.private,
    )
    release = release_mechanism(cfg.metrics_noise_multiplier) if cfg.release_metrics else None
    metrics_fit: int | None = None if release is None else 0
    for rnd in range(1, cfg.num_server_rounds + 1):
        plan: RoundPlan = plan_round(
            cfg,
            PROJECTED_RUN_ID,
            train_ids,
            cohorts,
            spends,
            max_epsilon=max_epsilon,
            on_exhausted=on_exhausted,
            delta=delta,
        )
        out.per_round.append(
            ProjectedRound(
                rnd, plan.allowed, plan.epsilon_run, plan.epsilon_dataset, len(plan.train), plan.excluded, plan.reason
            )
        )
        if not plan.allowed:
            break
        _add_spend(cohorts, spends, [train_ids[i] for i in plan.train], plan.mechanism.gaussian)
        if release is not None and val_ids and metrics_fit == rnd - 1:
            eps = record_epsilons(
                val_ids, cohorts, spends, delta, cfg.accountant, new=[release], run_id=PROJECTED_RUN_ID
            )
            if not records_over_budget(eps, max_epsilon) and not (
                cfg.private and eps.worst_run > cfg.target_epsilon * 1.01 + 1e-6
            ):
                _add_spend(cohorts, spends, val_ids, release)
                metrics_fit = rnd
    out.metrics_rounds_fit = metrics_fit
    final = record_epsilons(train_ids, cohorts, spends, delta, cfg.accountant, run_id=PROJECTED_RUN_ID)
    out.epsilon_after, out.epsilon_run = final.worst, final.worst_run
    return out


def _add_spend(
    cohorts: dict[str, frozenset[bytes]], spends: list[Spend], ids: Sequence[bytes], mech: tuple[float, float, int]
) -> None:
    cid = cohort_id_of(pack_ids(ids))
    cohorts.setdefault(cid, frozenset(ids))
    spends.append(Spend(mech, cid, PROJECTED_RUN_ID))


# -- what each dataset has spent ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetBudget:
    """One dataset (keyed fingerprint) of a site ledger, each value the worst record's composed epsilon.

    Budgets follow records, not files: a record that is also in another dataset (an appended or edited copy of the
    file) carries the other dataset's spends too. ``own`` composes this dataset's rows alone; ``spent`` every spend
    holding its records, which is what ``max-epsilon`` is checked against."""

    fingerprint: str
    rows: int
    records: int  # distinct records its spends sampled from
    runs: dict[str, float]  # run id -> this dataset's rows of that run, composed
    own: float  # this dataset's rows, composed
    spent: float  # every spend (any dataset, any run) holding its records, composed
    max_epsilon: float | None

    @property
    def sum_of_runs(self) -> float:
        """What adding the runs by hand gives: an over-estimate, shown to explain the composed value."""
        return sum(self.runs.values())

    @property
    def remaining(self) -> float | None:
        return None if self.max_epsilon is None else max(self.max_epsilon - self.spent, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset_fingerprint": self.fingerprint,
            "rows": self.rows,
            "records": self.records,
            "runs": self.runs,
            "sum_of_runs": self.sum_of_runs,
            "own": self.own,
            "spent": self.spent,
            "max_epsilon": self.max_epsilon,
            "remaining": self.remaining,
        }


def dataset_budgets(
    entries: Sequence[SpendRecord],
    cohorts: Mapping[str, frozenset[bytes]],
    *,
    delta: float,
    accountant: str,
    max_epsilon: float | None,
) -> list[DatasetBudget]:
    """Per dataset in the ledger, in order of first spend: the worst of its records' epsilons, composed per record
    as the guard composes them (each record: every spend whose cohort holds it), over its own rows and over all."""
    spends = ledger_spends(entries)
    memo: dict[tuple[Any, ...], float] = {}

    def eps(history: Sequence[Mechanism], delta: float, accountant: str) -> float:
        """Datasets and runs share histories (the same records, the same spends): one accountant call each."""
        key = (tuple(sorted(history)), delta, accountant)
        if key not in memo:
            memo[key] = epsilon_of(history, delta, accountant)
        return memo[key]

    by_fp: dict[str, list[int]] = {}
    for i, rec in enumerate(entries):
        by_fp.setdefault(rec.entry.dataset_fingerprint, []).append(i)
    out = []
    for fp, rows in by_fp.items():
        ids: set[bytes] = set()
        for i in rows:
            cid = entries[i].entry.cohort_id
            ids |= cohorts.get(cid, frozenset()) if cid is not None else {_NO_COHORT_RECORD}
        members = sorted(ids)
        own = [spends[i] for i in rows]

        runs = {
            run_id: record_epsilons(members, cohorts, own, delta, accountant, run_id=run_id, eps=eps).worst_run
            for run_id in dict.fromkeys(s.run_id for s in own)
        }
        own_eps = record_epsilons(members, cohorts, own, delta, accountant, eps=eps).worst
        spent = record_epsilons(members, cohorts, spends, delta, accountant, eps=eps).worst
        records = len(ids - {_NO_COHORT_RECORD})
        out.append(DatasetBudget(fp, len(rows), records, runs, own_eps, spent, max_epsilon))
    return out


# -- `privatune budget` -----------------------------------------------------------------------------------------


@dataclass
class SiteBudget:
    """What ``privatune budget`` shows: every dataset of the site's ledger and, given a run, its projection."""

    site_id: str
    ledger_path: str
    delta: float
    accountant: str
    max_epsilon: float | None
    datasets: list[DatasetBudget] = field(default_factory=list)
    current_fingerprint: str | None = None  # the dataset at data-path now (known with a run config)
    projection: RunProjection | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "ledger": self.ledger_path,
            "delta": self.delta,
            "accountant": self.accountant,
            "max_epsilon": self.max_epsilon,
            "note": COMPOSITION_NOTE,
            "datasets": [{**d.as_dict(), "current": d.fingerprint == self.current_fingerprint} for d in self.datasets],
            "current_dataset": self.current_fingerprint,
            "projection": self.projection.as_dict() if self.projection else None,
        }


def site_budget(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None, accountant: str | None = None
) -> SiteBudget:
    """Read the site ledger (never write it) and compose every dataset's spends; with ``run_config``, also load
    the site's data and project that run as ``privatune site check`` does. ``accountant``: the run config's
    unless given (composition at another accountant gives another, equally valid, epsilon)."""
    from pathlib import Path

    from privatune.client.privacy_guard import PrivacyGuard, run_delta
    from privatune.client.site_config import SiteConfig, SiteConfigError
    from privatune.common.ledger import SiteLedger

    cfg = RunConfig.from_flower({**(run_config or {}), **({"accountant": accountant} if accountant else {})})
    if "data-path" not in node_config:
        raise SiteConfigError("--node-config has no data-path: give the SuperNode's node config (docs/deploy-site.md)")
    site = SiteConfig.from_node_config(node_config, cfg)
    delta = run_delta(cfg, site.delta) if run_config else site.delta
    exists = Path(site.ledger_path).exists()
    ledger = SiteLedger(site.ledger_path) if exists else None  # a missing ledger is not created: nothing spent
    entries = ledger.entries() if ledger else []
    cohorts = ledger.cohorts() if ledger else {}
    out = SiteBudget(site.site_id, str(site.ledger_path), delta, cfg.accountant, site.max_epsilon)
    out.datasets = dataset_budgets(
        entries, cohorts, delta=delta, accountant=cfg.accountant, max_epsilon=site.max_epsilon
    )
    if not run_config:
        return out
    from privatune.client.round import load_local_data

    local = load_local_data(cfg, site)
    if exists:  # the key must be the one the ledger's cohorts were made with
        PrivacyGuard(site.ledger_path, site.site_id, site.max_epsilon, site.delta, site.on_exhausted, local.key_check)
    out.current_fingerprint = local.fingerprint
    out.projection = project_run(
        cfg,
        local.train_ids,
        cohorts,
        ledger_spends(entries),
        max_epsilon=site.max_epsilon,
        on_exhausted=site.on_exhausted,
        delta=delta,
        val_ids=local.val_ids,
    )
    return out
