"""The ClientApp: Flower glue around local data, the privacy guard and DP training.

Every message carries the full run config (``config`` ConfigRecord), so a client never depends on
how it was started (simulation, ``flwr run``, a SuperNode at a partner site). Replies:

- ``arrays``: the trainable weights (plaintext) or the encrypted, pre-weighted update (HE);
- ``metrics`` (train): the mechanism and its epsilon, plus ``num-examples`` only where plaintext FedAvg
  weights by it (``privatune.common.protocol.allowed_train_metric_keys``); no loss, no timing;
- ``metrics`` (evaluate): nothing by default; with ``release-metrics`` Gaussian-noised validation sums
  whose cost is in the site ledger first (``client/metrics_release.py``);
- ``status``: ``trained`` | ``evaluated`` | ``no-validation-data`` | ``budget-exhausted`` | ``data-error``
  | ``refused``, with a reason.

Losses, accuracies and timings stay in the site's log (one line per round). docs/privacy.md lists every
key that leaves a site.

Frozen weights never travel: only the parameters the fine-tuning mode trains are sent or received.

This module is the Flower glue alone: decode the message, call the round (``privatune.client.round``, where the
body of ``train`` and ``evaluate`` lives, framework-free), encode the reply.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privatune.client.backbone_check import backbone_refusal, site_run_config
from privatune.client.personal_head import load_head
from privatune.client.personalise import final_personalisation
from privatune.client.round import (
    Evaluation,
    LocalRun,
    Refusal,
    TrainedRound,
    data_error_for_server,
    evaluate_at_site,
    load_encryption_context,
    log_trained,
    open_run,
    site_secret_path,
    train_at_site,
)
from privatune.client.site_config import SiteConfig
from privatune.client.site_data import SiteDataError
from privatune.common.config import RunConfig
from privatune.common.he import HEError
from privatune.common.models import load_trainable_state
from privatune.common.protocol import (
    KEY_BACKBONE_FINGERPRINT,
    KEY_CLIENT_ID,
    KEY_REASON,
    KEY_SERVER_ROUND,
    KEY_STATUS,
    PROTOCOL_KEYS,
    RECORD_ARRAYS,
    RECORD_CONFIG,
    RECORD_METRICS,
    RECORD_STATUS,
    STATUS_DATA_ERROR,
    STATUS_REFUSED,
    STATUS_TRAINED,
)

log = logging.getLogger("privatune.client")
if not logging.getLogger("privatune").handlers:
    # A SuperNode runs each message in a fresh `flwr-clientapp` process whose root logger prints
    # nothing at INFO: give the site operator readable lines (round, loss, epsilon, refusals).
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s privatune %(levelname)s: %(message)s"))
    logging.getLogger("privatune").addHandler(_handler)
    logging.getLogger("privatune").setLevel(logging.INFO)
    logging.getLogger("privatune").propagate = False

app = ClientApp()


# -- decoding --------------------------------------------------------------------------------------------------


def read_run_config(msg: Message) -> tuple[RunConfig, int]:
    record = msg.content[RECORD_CONFIG]
    values = {k: v for k, v in record.items() if k not in PROTOCOL_KEYS}
    server_round = record.get(KEY_SERVER_ROUND, 0)
    if not isinstance(server_round, int | float | str):
        raise TypeError(f"{KEY_SERVER_ROUND} must be a number, got {server_round!r}")
    return RunConfig.from_flower(values), int(server_round)


def decode_global_state(msg: Message, cfg: RunConfig, site: SiteConfig) -> dict[str, np.ndarray]:
    """The global trainable weights, decrypted with this site's key under HE."""
    arrays = msg.content.array_records[RECORD_ARRAYS]
    if cfg.secure_aggregation != "he":
        return {k: v.numpy() for k, v in arrays.items()}
    from privatune.common import he
    from privatune.common.he.records import arrayrecord_to_state

    ctx = he.load_context(site_secret_path(site), require_secret=True)
    return he.decrypt_state(ctx, arrayrecord_to_state(arrays))


def prepare(msg: Message, context: Context) -> LocalRun | Refusal:
    """The round's run config, the site, its records and the model holding the global weights; a Refusal,
    before any record is read, when this site's backbone is not the coordinator's."""
    sent, server_round = read_run_config(msg)
    site = SiteConfig.from_node_config(dict(context.node_config), sent)
    cfg = site_run_config(sent, site)
    refusal = backbone_refusal(cfg, site, msg.content[RECORD_CONFIG].get(KEY_BACKBONE_FINGERPRINT), sent.model)
    if refusal is not None:
        return refusal
    run = open_run(cfg, site, str(context.run_id), server_round)
    load_trainable_state(run.model, decode_global_state(msg, cfg, site), keep_head=cfg.personal_head)
    if cfg.personal_head:  # the body came from the server, the head is the site's own (client/personal_head.py)
        load_head(run.model, site, run.run_id)
    return run


def _open(msg: Message, context: Context, data_refused: str, refused: str) -> LocalRun | Message:
    """The run, or the reply refusing the message (the two strings: how the site log names the refusal)."""
    try:
        run = prepare(msg, context)
    except SiteDataError as err:
        log.error("%s: %s", data_refused, err)
        return _reply_without_update(msg, context, STATUS_DATA_ERROR, data_error_for_server(err))
    except (ValueError, HEError) as err:
        log.error("%s: %s", refused, err)
        return _reply_without_update(msg, context, STATUS_REFUSED, str(err))
    if isinstance(run, Refusal):
        log.error("%s: %s", refused, run.reason)
        return _refusal_reply(msg, context, run)
    return run


# -- encoding --------------------------------------------------------------------------------------------------


def status_record(site_id: str, status: str, reason: str = "", **extra: str) -> ConfigRecord:
    return ConfigRecord({KEY_STATUS: status, KEY_CLIENT_ID: site_id, KEY_REASON: reason, **extra})


def encode_update(
    state: dict[str, np.ndarray], num_examples: int, cfg: RunConfig, site: SiteConfig, he_ctx: Any = None
) -> ArrayRecord:
    """Plaintext weights, or an encrypted update pre-weighted by its FedAvg weight (the example count, or 1
    with weighting="equal"); the weight travels only inside the ciphertext, in its extra slot. ``he_ctx``: the
    site's context when the caller already loaded it, as :func:`train` does before it writes the spend."""
    if cfg.secure_aggregation != "he":
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
    from privatune.common import he
    from privatune.common.he.records import update_to_arrayrecord

    if he_ctx is None:
        he_ctx = load_encryption_context(cfg, site)
    weight = float(num_examples) if cfg.weighting == "examples" else 1.0
    return update_to_arrayrecord(he.encrypt_update(he_ctx, state, weight=weight))


def _reply_without_update(msg: Message, context: Context, status: str, reason: str, site_id: str = "") -> Message:
    site_id = site_id or str(context.node_config.get("site-id", context.node_config.get("partition-id", "?")))
    if site_id and site_id[0].isdigit():
        site_id = f"client-{site_id}"
    return Message(RecordDict({RECORD_STATUS: status_record(site_id, status, reason)}), reply_to=msg)


def _refusal_reply(msg: Message, context: Context, refusal: Refusal) -> Message:
    return _reply_without_update(msg, context, refusal.status, refusal.reason, site_id=refusal.site_id)


def _trained_reply(msg: Message, context: Context, run: LocalRun, trained: TrainedRound) -> Message:
    cfg, site = run.cfg, run.site
    metrics = MetricRecord(dict(trained.metrics(cfg)))
    status = status_record(site.site_id, STATUS_TRAINED, **trained.status())
    try:
        arrays = encode_update(trained.state, trained.num_examples, cfg, site, trained.he_ctx)
    except HEError as err:  # e.g. a non-finite weight: refuse to encrypt, say why
        log.error("[%s] update not sent: %s", site.site_id, err)
        return _reply_without_update(msg, context, STATUS_REFUSED, f"update not encrypted: {err}", site_id=site.site_id)
    log_trained(run, trained)
    return Message(RecordDict({RECORD_ARRAYS: arrays, RECORD_METRICS: metrics, RECORD_STATUS: status}), reply_to=msg)


def _evaluation_reply(msg: Message, run: LocalRun, evaluation: Evaluation) -> Message:
    status = status_record(run.site.site_id, evaluation.status, evaluation.reason)
    if evaluation.metrics is None:
        return Message(RecordDict({RECORD_STATUS: status}), reply_to=msg)
    metrics = MetricRecord(dict(evaluation.metrics))
    return Message(RecordDict({RECORD_METRICS: metrics, RECORD_STATUS: status}), reply_to=msg)


# -- the hooks -------------------------------------------------------------------------------------------------


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of DP training at this site (privatune.client.round.train_at_site)."""
    run = _open(msg, context, "site data refused", "round refused")
    if isinstance(run, Message):
        return run
    outcome = train_at_site(run)
    if isinstance(outcome, Refusal):
        return _refusal_reply(msg, context, outcome)
    return _trained_reply(msg, context, run, outcome)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on this site's validation split."""
    run = _open(msg, context, "evaluation refused", "evaluation refused")
    if isinstance(run, Message):
        return run
    outcome = evaluate_at_site(run)
    final_personalisation(run)  # personalise-epochs > 0, last round: kept at the site, nothing in the reply
    if isinstance(outcome, Refusal):
        return _refusal_reply(msg, context, outcome)
    return _evaluation_reply(msg, run, outcome)
