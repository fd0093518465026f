"""Evaluation metrics a site may release: Gaussian-noised sums over its validation records, paid for.

By default a site releases no metric at all (its log keeps them). With run-config ``release-metrics=true``
an evaluation releases three sums over the validation records, each with Gaussian noise scaled to its
sensitivity to one record (add or remove one record):

============================  ==============================================  ===========
released key                  exact quantity                                   sensitivity
============================  ==============================================  ===========
``eval-correct-noised``       records the model classifies correctly           1
``eval-loss-sum-noised``      sum of per-record cross-entropy, each clipped    ``LOSS_BOUND``
                              to ``[0, LOSS_BOUND]``
``eval-count-noised``         number of validation records                     1
============================  ==============================================  ===========

Each sum gets noise of standard deviation ``metrics-noise-multiplier * sensitivity``: three Gaussian
mechanisms of that noise multiplier on the validation records, i.e. the mechanism
``(noise_multiplier, q=1, steps=3)`` in the accountant's terms. The spend goes to the site ledger with
purpose ``metrics`` before the reply leaves (write-ahead, like training). Its cohort is exactly the
validation records (per-record budgets, ``privatune.client.privacy_guard``), so it composes with the other spends on
those records only; the training records, disjoint from them, are not charged.

Accuracy and loss are ratios of the noised sums, formed by whoever pools them (the server): post-processing,
free of further cost. Macro-F1 would need per-class counts and is not released.

The noise comes from the site's own CSPRNG (``privatune.client.randomness.SiteRandomness``), never from a seed in
the message. Everything here but ``record_metrics_spend`` (the ledger) and ``per_record_outcomes`` (torch) is pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from privatune.common.accounting import Mechanism
from privatune.common.mechanism import DPMechanism
from privatune.common.protocol import KEY_EVAL_CORRECT, KEY_EVAL_COUNT, KEY_EVAL_LOSS_SUM

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from privatune.client.privacy_guard import PrivacyGuard
    from privatune.client.randomness import Randomness
    from privatune.common.config import RunConfig

LOSS_BOUND = 5.0  # per-record cross-entropy is clipped to [0, 5] (a uniform guess over 10 classes scores 2.3)
RELEASED_SUMS = (KEY_EVAL_CORRECT, KEY_EVAL_LOSS_SUM, KEY_EVAL_COUNT)
SENSITIVITY = {KEY_EVAL_CORRECT: 1.0, KEY_EVAL_LOSS_SUM: LOSS_BOUND, KEY_EVAL_COUNT: 1.0}


@dataclass(frozen=True)
class EvalSums:
    """The three sums of one evaluation (exact at the site, noised once released)."""

    correct: float
    loss_sum: float
    count: float

    def as_metrics(self) -> dict[str, float]:
        return {KEY_EVAL_CORRECT: self.correct, KEY_EVAL_LOSS_SUM: self.loss_sum, KEY_EVAL_COUNT: self.count}


def exact_sums(per_record_loss: np.ndarray, correct: np.ndarray, loss_bound: float = LOSS_BOUND) -> EvalSums:
    """The sums before noise; clipping each loss bounds what one record can move the loss sum."""
    loss = np.asarray(per_record_loss, dtype=np.float64)
    hits = np.asarray(correct, dtype=bool)
    if loss.shape != hits.shape or loss.ndim != 1:
        raise ValueError(f"per-record losses {loss.shape} and correctness {hits.shape} must be equal 1-D arrays")
    if not np.all(np.isfinite(loss)) and loss.size:
        loss = np.nan_to_num(loss, nan=loss_bound, posinf=loss_bound, neginf=0.0)
    return EvalSums(
        correct=float(hits.sum()),
        loss_sum=float(np.clip(loss, 0.0, loss_bound).sum()),
        count=float(loss.size),
    )


def release_mechanism(noise_multiplier: float) -> Mechanism:
    """One release: three Gaussian mechanisms (one per sum) on all validation records."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"metrics-noise-multiplier must be a finite number > 0, got {noise_multiplier!r}")
    return (float(noise_multiplier), 1.0, len(RELEASED_SUMS))


def noised_sums(
    sums: EvalSums, noise_multiplier: float, randomness: Randomness, loss_bound: float = LOSS_BOUND
) -> EvalSums:
    """Each sum plus Gaussian noise of std ``noise_multiplier * its sensitivity``, drawn from ``randomness``."""
    import torch

    release_mechanism(noise_multiplier)  # validates
    z = randomness.gaussian((3,), 1.0, device="cpu", dtype=torch.float64).numpy()
    scale = float(noise_multiplier)
    return EvalSums(
        correct=sums.correct + scale * 1.0 * float(z[0]),
        loss_sum=sums.loss_sum + scale * float(loss_bound) * float(z[1]),
        count=sums.count + scale * 1.0 * float(z[2]),
    )


def planned_releases(cfg: RunConfig) -> list[Mechanism]:
    """What a whole run's metric releases cost a site (one release per round): the training noise is
    calibrated so that training and these together stay within target-epsilon."""
    if not cfg.release_metrics:
        return []
    return [release_mechanism(cfg.metrics_noise_multiplier)] * cfg.num_server_rounds


@dataclass(frozen=True)
class MetricsSpend:
    """The outcome of planning (and, when allowed, recording) one release."""

    allowed: bool
    reason: str
    epsilon_run: float
    epsilon_dataset: float
    seq: int | None  # site-ledger row of the recorded spend


def record_metrics_spend(
    guard: PrivacyGuard,
    cfg: RunConfig,
    run_id: str,
    server_round: int,
    dataset_fingerprint: str,
    params_fingerprint: str,
    validation_ids: Sequence[bytes],
) -> MetricsSpend:
    """Check the budget of the validation records for one release and, if it fits, append the spend (purpose
    "metrics", cohort = exactly those records) to the site ledger before anything is released.

    The release touches only the validation records, so per-record accounting charges it to them alone; the
    training records' budgets are unaffected (the model is DP post-processing of their spends)."""
    from privatune.common.ledger import PURPOSE_METRICS
    from privatune.common.protocol import NOISE_SOURCE_SITE

    started = datetime.now(UTC)
    delta = guard.run_delta(cfg)
    mech = release_mechanism(cfg.metrics_noise_multiplier)
    eps = guard.epsilons(validation_ids, cfg.accountant, delta=delta, new=[mech], run_id=run_id)
    if guard.over_budget(eps):
        return MetricsSpend(
            False,
            (
                f"metrics withheld: releasing them would bring validation records to epsilon {eps.worst:.3f}, above "
                f"the site budget max-epsilon={guard.max_epsilon:g}"
            ),
            eps.worst_run,
            eps.worst,
            None,
        )
    if cfg.private and eps.worst_run > cfg.target_epsilon * 1.01 + 1e-6:
        return MetricsSpend(
            False,
            (
                f"metrics withheld: releasing them would bring this run's epsilon on the validation records to "
                f"{eps.worst_run:.3f}, above target-epsilon={cfg.target_epsilon:g}"
            ),
            eps.worst_run,
            eps.worst,
            None,
        )
    # The clip bound of this release is the loss bound (counts have sensitivity 1).
    release = DPMechanism(*mech, max_grad_norm=LOSS_BOUND, delta=delta, accountant=cfg.accountant)
    seq = guard.record_spend(
        purpose=PURPOSE_METRICS,
        record_ids=list(validation_ids),
        mechanism=release,
        run_id=run_id,
        server_round=max(1, int(server_round)),
        dataset_fingerprint=dataset_fingerprint,
        params_fingerprint=params_fingerprint,
        epsilon_run=eps.worst_run,
        epsilon_dataset=eps.worst,
        started_at=started,
        noise_source=NOISE_SOURCE_SITE,  # released noise comes from SiteRandomness (client/round.py)
    )
    return MetricsSpend(True, "", eps.worst_run, eps.worst, seq)


def per_record_outcomes(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(per-record cross-entropy, per-record predicted class) of ``module`` on the given records."""
    import torch
    from torch import nn

    n = int(labels.shape[0])
    module.to(device)
    module.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    losses, preds = [], []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            xs = [t[start : start + batch_size].to(device) for t in inputs]
            y = labels[start : start + batch_size].to(device)
            out = module(*xs)
            losses.append(loss_fn(out, y).double().cpu())
            preds.append(out.argmax(dim=1).cpu())
    if not losses:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(losses).numpy(), torch.cat(preds).numpy()
