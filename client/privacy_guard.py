"""A site's privacy budget: plan a round's spend, refuse it if over budget, record it first.

The ledger on disk is the source of truth (Flower's in-memory node state dies with the SuperNode).
Order of events for one round, so that a crash at any point over-counts rather than under-counts:

1. plan: the mechanism this round will run (noise, sample rate, steps) and the epsilon it leads to,
   for this run and for the dataset across every run in the ledger;
2. refuse if the run's target or the site's ``max-epsilon`` would be passed;
3. append the spend to the ledger (committed, fsynced) -- *before* training starts;
4. train, and release the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from common.accounting import default_delta, epsilon_of, sample_rate, steps_per_epoch
from common.config import RunConfig
from common.ledger import SiteLedger, SpendEntry

# Calibration is a binary search over the accountant: memoise it, the inputs repeat every round.
_NOISE_CACHE: dict[tuple, float] = {}


@dataclass(frozen=True)
class RoundPlan:
    """The spend one round will make, computed before any data is touched."""

    allowed: bool
    reason: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_run: float
    epsilon_dataset: float


def plan_noise(cfg: RunConfig, num_records: int, delta: float) -> float:
    """Noise for this client: none without DP (an infinite spend, recorded as such), explicit, or
    calibrated so the whole run ends at ``target-epsilon`` -- metric releases included when the run
    releases metrics (``client.metrics_release.planned_releases``)."""
    from client.metrics_release import calibrate_with_reserve, planned_releases

    if not cfg.private:
        return 0.0
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    q = sample_rate(num_records, cfg.batch_size)
    total_steps = cfg.num_server_rounds * cfg.local_epochs * steps_per_epoch(num_records, cfg.batch_size)
    reserved = planned_releases(cfg)
    key = (cfg.target_epsilon, delta, q, total_steps, cfg.accountant, tuple(reserved))
    if key not in _NOISE_CACHE:
        _NOISE_CACHE[key] = calibrate_with_reserve(cfg.target_epsilon, delta, q, total_steps, reserved, cfg.accountant)
    return _NOISE_CACHE[key]


class PrivacyGuard:
    """Budget checks and write-ahead recording for one site and one dataset."""

    def __init__(self, ledger_path: str | Path, site_id: str, max_epsilon: float | None) -> None:
        self.ledger = SiteLedger(Path(ledger_path))
        self.site_id = site_id
        self.max_epsilon = max_epsilon

    def delta_for(self, cfg: RunConfig, num_records: int) -> float:
        delta = cfg.delta or default_delta(num_records)
        if delta >= 1.0 / num_records:
            raise ValueError(
                f"delta={delta} is not below 1/n = {1 / num_records:.3g} for this site's {num_records} "
                "records: such a delta allows releasing a record outright; lower delta"
            )
        return delta

    def spent(self, dataset_fingerprint: str, accountant: str, delta: float) -> float:
        """Epsilon already spent on this dataset across every run recorded here."""
        return epsilon_of(self.ledger.history(dataset_fingerprint), delta, accountant)

    def plan(self, cfg: RunConfig, run_id: str, num_records: int, dataset_fingerprint: str) -> RoundPlan:
        delta = self.delta_for(cfg, num_records)
        steps = cfg.local_epochs * steps_per_epoch(num_records, cfg.batch_size)
        q = sample_rate(num_records, cfg.batch_size)
        noise = plan_noise(cfg, num_records, delta)
        mech = (noise, q, steps)
        run_hist = self.ledger.run_history(run_id, dataset_fingerprint) + [mech]
        data_hist = self.ledger.history(dataset_fingerprint) + [mech]
        eps_run = epsilon_of(run_hist, delta, cfg.accountant)
        eps_data = epsilon_of(data_hist, delta, cfg.accountant)
        allowed, reason = True, ""
        if self.max_epsilon is not None and eps_data > self.max_epsilon + 1e-9:
            allowed = False
            spent = self.spent(dataset_fingerprint, cfg.accountant, delta)
            reason = (
                f"budget exhausted: this round would bring epsilon on this dataset to {eps_data:.3f}, "
                f"above the site budget max-epsilon={self.max_epsilon:g} (already spent {spent:.3f})"
            )
        elif cfg.private and eps_run > cfg.target_epsilon * 1.01 + 1e-6:
            allowed = False
            reason = (
                f"run target exhausted: this round would bring this run's epsilon to {eps_run:.3f}, "
                f"above target-epsilon={cfg.target_epsilon:g}"
            )
        return RoundPlan(allowed, reason, noise, q, steps, delta, eps_run, eps_data)

    def record(
        self,
        plan: RoundPlan,
        cfg: RunConfig,
        run_id: str,
        server_round: int,
        dataset_fingerprint: str,
        params_fingerprint: str,
        started_at: datetime,
    ) -> int:
        """Append the spend durably; returns the ledger sequence number."""
        entry = SpendEntry(
            run_id=run_id,
            round=server_round,
            site_id=self.site_id,
            dataset_fingerprint=dataset_fingerprint,
            params_fingerprint=params_fingerprint,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            max_grad_norm=cfg.max_grad_norm,
            delta=plan.delta,
            accountant=cfg.accountant,
            epsilon_run=plan.epsilon_run,
            epsilon_dataset=plan.epsilon_dataset,
            max_epsilon=self.max_epsilon,
            started_at=started_at.isoformat(),
            recorded_at=datetime.now(timezone.utc).isoformat(),
        )
        return self.ledger.append(entry)
