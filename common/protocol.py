"""Names both sides agree on: message keys, reply statuses, and what a site may put in a reply."""

from __future__ import annotations

# Keys the server adds to the run config it sends; they are not part of RunConfig.
PROTOCOL_KEYS = frozenset({"server-round", "run-id"})

STATUS_TRAINED = "trained"  # an update is attached
STATUS_BUDGET = "budget-exhausted"  # the site's privacy budget (or the run's target) forbids this round
STATUS_DATA_ERROR = "data-error"  # the site's data failed validation; nothing was trained
STATUS_REFUSED = "refused"  # any other refusal (bad keys, bad config at this site)
STATUS_EVALUATED = "evaluated"

# Where a site's DP randomness came from (the reply's status record, the site and server ledgers, summary.json).
KEY_NOISE_SOURCE = "noise-source"
NOISE_SOURCE_SITE = "site-csprng"  # the default everywhere: unpredictable by anyone but the site
NOISE_SOURCE_SEEDED = "seeded"  # simulation only, an explicit and recorded choice
NOISE_SOURCES = (NOISE_SOURCE_SITE, NOISE_SOURCE_SEEDED)
STATUS_NO_VALIDATION = "no-validation-data"  # the site has no validation split: it evaluates nothing

# Train reply, "metrics" record: the mechanism and its epsilon (the audit and the server ledger need them).
KEY_NUM_EXAMPLES = "num-examples"  # plaintext FedAvg weight; never sent under HE or weighting="equal"
TRAIN_MECHANISM_KEYS = (
    "epsilon",
    "epsilon-dataset",
    "noise-multiplier",
    "sample-rate",
    "steps",
    "delta",
    "max-grad-norm",
)

# Evaluate reply, "metrics" record, only with release-metrics=true: Gaussian-noised sums over the site's
# validation records (client/metrics_release.py) and what the release cost.
KEY_EVAL_CORRECT = "eval-correct-noised"  # number of correctly classified records + noise (sensitivity 1)
KEY_EVAL_LOSS_SUM = "eval-loss-sum-noised"  # sum of per-record losses clipped to [0, bound] + noise (sensitivity bound)
KEY_EVAL_COUNT = "eval-count-noised"  # number of validation records + noise (sensitivity 1)
KEY_METRICS_EPSILON = "metrics-epsilon"  # the run's epsilon at this site after this release (training included)
KEY_METRICS_NOISE = "metrics-noise-multiplier"
EVAL_RELEASE_KEYS = (KEY_EVAL_CORRECT, KEY_EVAL_LOSS_SUM, KEY_EVAL_COUNT, KEY_METRICS_EPSILON, KEY_METRICS_NOISE)

# "status" record of every reply (a ConfigRecord of strings).
STATUS_KEYS = ("status", "client-id", "reason")
TRAINED_STATUS_KEYS = STATUS_KEYS + ("accountant", "dataset-fingerprint", "params-fingerprint", KEY_NOISE_SOURCE)


def allowed_train_metric_keys(secure_aggregation: str, weighting: str) -> frozenset[str]:
    """Every key a 'trained' reply's metrics may hold: the mechanism, plus the example count only where
    plaintext FedAvg weights by it (docs/privacy.md lists each key and why it leaves)."""
    keys = set(TRAIN_MECHANISM_KEYS)
    if secure_aggregation != "he" and weighting == "examples":
        keys.add(KEY_NUM_EXAMPLES)
    return frozenset(keys)
