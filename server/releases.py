"""Federated evaluation: which evaluate replies are noised releases, and the figures pooled from them.

Only a site's Gaussian-noised validation sums (release-metrics, client/metrics_release.py) ever reach the
server; an 'evaluated' reply without them, 'no-validation-data' or a refusal adds nothing. Pooling the sums
is post-processing (``privatune.server.aggregation.pool_noised_eval``): no further privacy cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import Message

from privatune.common.protocol import (
    EVAL_RELEASE_KEYS,
    KEY_EVAL_CORRECT,
    KEY_EVAL_COUNT,
    KEY_EVAL_LOSS_SUM,
    KEY_FED_MAX_SITE_EPSILON,
    KEY_FED_NOISED,
    KEY_FED_NUM_SITES,
    KEY_METRICS_EPSILON,
    KEY_METRICS_NOISE,
    KEY_STATUS,
    STATUS_EVALUATED,
)
from privatune.server.aggregation import pool_noised_eval
from privatune.server.records import metrics_of, status_of
from privatune.server.replies import identify


@dataclass(frozen=True)
class Release:
    """One site's noised validation sums and what releasing them cost."""

    client_id: str
    correct: float
    loss_sum: float
    count: float
    epsilon: float  # the site's run epsilon after the release, training included
    noise_multiplier: float


def read_release(msg: Message) -> Release | None:
    """The release an evaluate reply carries, or None when it carries no well-formed one."""
    if msg.has_error():
        return None
    status = status_of(msg)
    if status is None:
        return None
    m = metrics_of(msg.content)
    if m is None or str(status.get(KEY_STATUS, "")) != STATUS_EVALUATED:
        return None
    if not all(isinstance(m.get(k), (int, float)) and math.isfinite(m[k]) for k in EVAL_RELEASE_KEYS):
        return None  # not a (well-formed) release
    return Release(
        client_id=identify(msg).client_id,
        correct=float(m[KEY_EVAL_CORRECT]),
        loss_sum=float(m[KEY_EVAL_LOSS_SUM]),
        count=float(m[KEY_EVAL_COUNT]),
        epsilon=float(m[KEY_METRICS_EPSILON]),
        noise_multiplier=float(m[KEY_METRICS_NOISE]),
    )


def federated_figures(releases: Sequence[Release]) -> dict[str, float] | None:
    """The pooled accuracy and loss with what they rest on; None when the pooled count is not positive."""
    pooled = pool_noised_eval([(r.correct, r.loss_sum, r.count) for r in releases])
    if pooled is None:
        return None
    return {
        **pooled,
        KEY_FED_NOISED: 1.0,  # 1.0 = these figures come from DP-noised site releases
        KEY_FED_NUM_SITES: float(len(releases)),
        KEY_METRICS_NOISE: releases[-1].noise_multiplier,
        KEY_FED_MAX_SITE_EPSILON: max(r.epsilon for r in releases),  # each site's run epsilon after the release
    }
