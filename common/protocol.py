"""The wire protocol: every record, key and status a message between the ServerApp and a site carries.

Both sides import these names instead of writing the strings; docs/privacy.md explains why each key may leave a
site, and docs/architecture.md shows where each message is built and read. A message's content is a RecordDict:

* server -> site (``train``/``evaluate``): ``RECORD_ARRAYS`` (the global trainable weights, plaintext) and
  ``RECORD_CONFIG`` (the run config in kebab-case, plus ``PROTOCOL_KEYS``);
* site -> server: ``RECORD_STATUS`` (a ConfigRecord of strings, always), ``RECORD_METRICS`` (numbers) and, for a
  trained round, ``RECORD_ARRAYS`` (the update, plaintext or CKKS ciphertexts: common/he/records.py).

The mechanism a site trained under travels as :class:`privatune.common.mechanism.DPMechanism` (its own conversion
to and from these records).
"""

from __future__ import annotations

# Message types (Flower's names) and the records of a message's RecordDict.
MSG_TRAIN = "train"
MSG_EVALUATE = "evaluate"
RECORD_ARRAYS = "arrays"
RECORD_CONFIG = "config"
RECORD_METRICS = "metrics"
RECORD_STATUS = "status"

# Keys the server adds to the run config it sends; they are not part of RunConfig.
KEY_SERVER_ROUND = "server-round"
KEY_RUN_ID = "run-id"
# sha256 of the coordinator's pretrained backbone (common/models/fingerprint.py): a site whose own differs refuses.
KEY_BACKBONE_FINGERPRINT = "backbone-fingerprint"
PROTOCOL_KEYS = frozenset({KEY_SERVER_ROUND, KEY_RUN_ID, KEY_BACKBONE_FINGERPRINT})

# "status" record of every reply.
KEY_STATUS = "status"
KEY_CLIENT_ID = "client-id"
KEY_REASON = "reason"
KEY_DATASET_FINGERPRINT = "dataset-fingerprint"  # keyed HMAC over the site's record ids (client/record_ids.py)
KEY_PARAMS_FINGERPRINT = "params-fingerprint"  # which trainable parameters the update covers

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
# The mechanism itself (common/mechanism.py DPMechanism maps its fields to these keys).
KEY_NOISE_MULTIPLIER = "noise-multiplier"
KEY_SAMPLE_RATE = "sample-rate"
KEY_STEPS = "steps"
KEY_MAX_GRAD_NORM = "max-grad-norm"
KEY_DELTA = "delta"
KEY_ACCOUNTANT = "accountant"  # in the "status" record: a string
KEY_EPSILON = "epsilon"  # this run's epsilon at the site after this round
KEY_EPSILON_DATASET = "epsilon-dataset"  # the dataset's epsilon over every run (per-record budgets)
TRAIN_MECHANISM_KEYS = (
    KEY_EPSILON,
    KEY_EPSILON_DATASET,
    KEY_NOISE_MULTIPLIER,
    KEY_SAMPLE_RATE,
    KEY_STEPS,
    KEY_DELTA,
    KEY_MAX_GRAD_NORM,
)

# Evaluate reply, "metrics" record, only with release-metrics=true: Gaussian-noised sums over the site's
# validation records (client/metrics_release.py) and what the release cost.
KEY_EVAL_CORRECT = "eval-correct-noised"  # number of correctly classified records + noise (sensitivity 1)
KEY_EVAL_LOSS_SUM = "eval-loss-sum-noised"  # sum of per-record losses clipped to [0, bound] + noise (sensitivity bound)
KEY_EVAL_COUNT = "eval-count-noised"  # number of validation records + noise (sensitivity 1)
KEY_METRICS_EPSILON = "metrics-epsilon"  # the run's epsilon at this site after this release (training included)
KEY_METRICS_NOISE = "metrics-noise-multiplier"
EVAL_RELEASE_KEYS = (KEY_EVAL_CORRECT, KEY_EVAL_LOSS_SUM, KEY_EVAL_COUNT, KEY_METRICS_EPSILON, KEY_METRICS_NOISE)

# Everything a reply's "status" record may hold.
STATUS_KEYS = (KEY_STATUS, KEY_CLIENT_ID, KEY_REASON)
TRAINED_STATUS_KEYS = (*STATUS_KEYS, KEY_ACCOUNTANT, KEY_DATASET_FINGERPRINT, KEY_PARAMS_FINGERPRINT, KEY_NOISE_SOURCE)


def allowed_train_metric_keys(secure_aggregation: str, weighting: str) -> frozenset[str]:
    """Every key a 'trained' reply's metrics may hold: the mechanism, plus the example count only where
    plaintext FedAvg weights by it (docs/privacy.md lists each key and why it leaves)."""
    keys = set(TRAIN_MECHANISM_KEYS)
    if secure_aggregation != "he" and weighting == "examples":
        keys.add(KEY_NUM_EXAMPLES)
    return frozenset(keys)


# Evaluate reply, "metrics" record, without release-metrics: nothing but the status (docs/privacy.md).
# Aggregated evaluation the server computes from released sums (server/aggregation.py), in its run records:
KEY_FED_ACCURACY = "eval-accuracy"
KEY_FED_LOSS = "eval-loss"
KEY_FED_NUM_SITES = "num-sites"
KEY_FED_MAX_SITE_EPSILON = "max-site-epsilon"
KEY_FED_NOISED = "noised"  # 1.0: the figures come from DP-noised site releases
# The server's central evaluation on its own test split (server/central_eval.py), in its run records:
KEY_CENTRAL_ACCURACY = "accuracy"
KEY_CENTRAL_MACRO_F1 = "macro-f1"
KEY_CENTRAL_LOSS = "loss"
# The aggregate's metrics record (what the strategy hands back to Flower's loop).
KEY_NUM_CLIENTS = "num-clients"
