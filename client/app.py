"""The ClientApp: Flower glue around local data, the privacy guard and DP training.

Every message carries the full run config (``config`` ConfigRecord), so a client never depends on
how it was started (simulation, ``flwr run``, a SuperNode at a partner site). Replies:

- ``arrays``: the trainable weights (plaintext) or the encrypted, pre-weighted update (HE);
- ``metrics`` (train): the mechanism and its epsilon, plus ``num-examples`` only where plaintext FedAvg
  weights by it (``common.protocol.allowed_train_metric_keys``); no loss, no timing;
- ``metrics`` (evaluate): nothing by default; with ``release-metrics`` Gaussian-noised validation sums
  whose cost is in the site ledger first (``client/metrics_release.py``);
- ``status``: ``trained`` | ``evaluated`` | ``no-validation-data`` | ``budget-exhausted`` | ``data-error``
  | ``refused``, with a reason.

Losses, accuracies and timings stay in the site's log (one line per round). docs/privacy.md lists every
key that leaves a site.

Frozen weights never travel: only the parameters the fine-tuning mode trains are sent or received.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.metrics_release import exact_sums, noised_sums, per_record_outcomes, record_metrics_spend
from client.privacy_guard import PrivacyGuard
from client.randomness import SiteRandomness
from client.site_config import SiteConfig
from client.site_data import SiteDataError, load_site_data
from client.training import train_local
from common.config import RunConfig
from common.datasets import LabelledData
from common.evaluation import macro_f1
from common.he import HEError
from common.features import cached_features, encode
from common.federation_data import client_records
from common.models import (
    Classifier,
    backbone_is_frozen,
    configure_trainable,
    get_model_spec,
    load_trainable_state,
    trainable_fingerprint,
    trainable_state,
)
from common.protocol import (
    KEY_METRICS_EPSILON,
    KEY_METRICS_NOISE,
    KEY_NUM_EXAMPLES,
    PROTOCOL_KEYS,
    STATUS_BUDGET,
    STATUS_DATA_ERROR,
    STATUS_EVALUATED,
    STATUS_NO_VALIDATION,
    STATUS_REFUSED,
    STATUS_TRAINED,
    allowed_train_metric_keys,
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


@dataclass
class LocalRun:
    """Everything one message needs at this site, built fresh per message (deployment runs each
    message in a new process; heavy parts -- backbone weights, features -- are cached underneath)."""

    cfg: RunConfig
    site: SiteConfig
    run_id: str
    server_round: int
    train: LabelledData
    val: LabelledData
    dataset_fingerprint: str  # of all local records, before the validation split: budgets follow the data
    model: Classifier
    trainable_names: list[str]


def read_run_config(msg: Message) -> tuple[RunConfig, int]:
    record = msg.content["config"]
    values = {k: v for k, v in record.items() if k not in PROTOCOL_KEYS}
    return RunConfig.from_flower(values), int(record.get("server-round", 0))


def load_local_data(cfg: RunConfig, site: SiteConfig) -> tuple[LabelledData, LabelledData, str]:
    """(train, validation, fingerprint of all local records)."""
    from common.datasets import train_val_split

    if site.simulated:
        assert site.partition_id is not None and site.num_partitions
        data = client_records(cfg, site.partition_id, site.num_partitions)
    else:
        assert site.data is not None
        kind = get_model_spec(cfg.model).kind
        data = load_site_data(site.data, cfg.label_names, kind=kind, name=site.site_id)
    train, val = train_val_split(data, cfg.val_fraction, seed=cfg.seed)
    return train, val, data.fingerprint()


def prepare(msg: Message, context: Context) -> LocalRun:
    cfg, server_round = read_run_config(msg)
    site = SiteConfig.from_node_config(dict(context.node_config), cfg)
    train, val, data_fp = load_local_data(cfg, site)
    spec = get_model_spec(cfg.model)
    model = spec.build(len(cfg.label_names), cfg.seed)
    names = configure_trainable(model, cfg.mode)
    incoming = decode_global_state(msg, cfg, site)
    load_trainable_state(model, incoming)
    return LocalRun(cfg, site, str(context.run_id), server_round, train, val, data_fp, model, names)


def decode_global_state(msg: Message, cfg: RunConfig, site: SiteConfig) -> dict[str, np.ndarray]:
    """The global trainable weights, decrypted with this site's key under HE."""
    arrays: ArrayRecord = msg.content["arrays"]
    if cfg.secure_aggregation != "he":
        return {k: v.numpy() for k, v in arrays.items()}
    from common import he
    from common.he_records import arrayrecord_to_state

    ctx = he.load_context(site_secret_path(site), require_secret=True)
    return he.decrypt_state(ctx, arrayrecord_to_state(arrays))


def site_secret_path(site: SiteConfig):
    if site.he_secret_context is None:
        raise ValueError(
            "this run uses secure-aggregation=he but the site has no he-secret-context in its node config"
        )
    return site.he_secret_context


def module_and_inputs(run: LocalRun, data: LabelledData) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """`head` mode trains the head alone on cached backbone features; other modes the whole model."""
    cfg = run.cfg
    if backbone_is_frozen(cfg.mode):
        feats = cached_features(run.model, cfg.model, data, cfg.max_length, run.site.cache_dir)
        return run.model.head, (feats,)
    return run.model, encode(cfg.model, data, cfg.max_length)


def _data_error_for_server(err: SiteDataError) -> str:
    """What the coordinator learns of a data error: where, not what (the value stays in the site log)."""
    where = f"record {err.record}" if err.record is not None else "the file"
    return f"site data refused: {err.path.name}, {where}; the site's log has the details and the fix"


def train_round(run: LocalRun, data: LabelledData, noise_multiplier: float):
    """One round of local training exactly as the ClientApp runs it (the canary audit reuses it)."""
    cfg = run.cfg
    module, inputs = module_and_inputs(run, data)
    return train_local(
        module,
        inputs,
        torch.as_tensor(data.labels, dtype=torch.long),
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        dp=cfg.private,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        randomness=SiteRandomness(),
        backbone_lr_scale=cfg.backbone_lr_scale,
        device=run.site.device,
    )


def status_record(site_id: str, status: str, reason: str = "", **extra: str) -> ConfigRecord:
    return ConfigRecord({"status": status, "client-id": site_id, "reason": reason, **extra})


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        run = prepare(msg, context)
    except SiteDataError as err:
        log.error("site data refused: %s", err)
        return _reply_without_update(msg, context, STATUS_DATA_ERROR, _data_error_for_server(err))
    except (ValueError, HEError) as err:
        log.error("round refused: %s", err)
        return _reply_without_update(msg, context, STATUS_REFUSED, str(err))
    cfg, site = run.cfg, run.site
    started = datetime.now(timezone.utc)
    dataset_fp = run.dataset_fingerprint
    params_fp = trainable_fingerprint(
        [(n, tuple(p.shape)) for n, p in run.model.named_parameters() if p.requires_grad]
    )
    guard = PrivacyGuard(site.ledger_path, site.site_id, site.max_epsilon)
    plan = guard.plan(cfg, run.run_id, len(run.train), dataset_fp)
    if not plan.allowed:
        log.warning("[%s] not training round %d: %s", site.site_id, run.server_round, plan.reason)
        return _reply_without_update(msg, context, STATUS_BUDGET, plan.reason, site_id=site.site_id)
    # Write-ahead: the spend is on disk before a single gradient is computed.
    guard.record(plan, cfg, run.run_id, run.server_round, dataset_fp, params_fp, started)
    noise, delta = plan.noise_multiplier, plan.delta
    result = train_round(run, run.train, noise)
    run.model.to("cpu")
    state = trainable_state(run.model)
    values: dict[str, int | float] = {
        "epsilon": float(plan.epsilon_run),
        "epsilon-dataset": float(plan.epsilon_dataset),
        "noise-multiplier": float(result.noise_multiplier),
        "sample-rate": float(result.sample_rate),
        "steps": int(result.steps),
        "delta": float(delta),
        "max-grad-norm": float(cfg.max_grad_norm),
    }
    if KEY_NUM_EXAMPLES in allowed_train_metric_keys(cfg.secure_aggregation, cfg.weighting):
        values[KEY_NUM_EXAMPLES] = len(run.train)  # the plaintext FedAvg weight (docs/privacy.md)
    metrics = MetricRecord(values)
    status = status_record(
        site.site_id,
        STATUS_TRAINED,
        accountant=cfg.accountant,
        **{"dataset-fingerprint": dataset_fp, "params-fingerprint": params_fp},
    )
    try:
        arrays = encode_update(state, len(run.train), cfg, site)
    except HEError as err:  # e.g. a non-finite weight: refuse to encrypt, say why
        log.error("[%s] update not sent: %s", site.site_id, err)
        return _reply_without_update(msg, context, STATUS_REFUSED, f"update not encrypted: {err}", site_id=site.site_id)
    # The loss and the timing stay here, in the site's log: they are not DP-noised, so they never leave.
    log.info(
        "[%s] round %d: %d records, train loss %.4f, epsilon %.3f, %.1f s",
        site.site_id, run.server_round, len(run.train), result.loss, plan.epsilon_run, result.seconds,
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "status": status}), reply_to=msg)


def encode_update(state: dict[str, np.ndarray], num_examples: int, cfg: RunConfig, site: SiteConfig) -> ArrayRecord:
    """Plaintext weights, or an encrypted update pre-weighted by its FedAvg weight (the example count, or 1
    with weighting="equal"); the weight travels only inside the ciphertext, in its extra slot."""
    if cfg.secure_aggregation != "he":
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
    from common import he
    from common.he_records import update_to_arrayrecord

    weight = float(num_examples) if cfg.weighting == "examples" else 1.0
    ctx = he.load_context(site_secret_path(site), require_secret=True)
    return update_to_arrayrecord(he.encrypt_update(ctx, state, weight=weight))


def _reply_without_update(msg: Message, context: Context, status: str, reason: str, site_id: str = "") -> Message:
    site_id = site_id or str(context.node_config.get("site-id", context.node_config.get("partition-id", "?")))
    if site_id and site_id[0].isdigit():
        site_id = f"client-{site_id}"
    return Message(RecordDict({"status": status_record(site_id, status, reason)}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on this site's validation split."""
    try:
        run = prepare(msg, context)
    except SiteDataError as err:
        log.error("evaluation refused: %s", err)
        return _reply_without_update(msg, context, STATUS_DATA_ERROR, _data_error_for_server(err))
    except (ValueError, HEError) as err:
        log.error("evaluation refused: %s", err)
        return _reply_without_update(msg, context, STATUS_REFUSED, str(err))
    cfg, site = run.cfg, run.site
    if not len(run.val):
        # Never evaluate on training records: a score on them measures memorisation and spends nothing.
        log.info("[%s] round %d: no validation records (val-fraction=%g), nothing evaluated",
                 site.site_id, run.server_round, cfg.val_fraction)
        reason = "this site has no validation records"
        return Message(RecordDict({"status": status_record(site.site_id, STATUS_NO_VALIDATION, reason)}),
                       reply_to=msg)
    module, inputs = module_and_inputs(run, run.val)
    losses, preds = per_record_outcomes(module, inputs, torch.as_tensor(run.val.labels, dtype=torch.long),
                                        device=site.device)
    true = np.asarray(run.val.labels)
    sums = exact_sums(losses, preds == true)
    log.info(
        "[%s] round %d: validation on %d records: loss %.4f, accuracy %.4f, macro-F1 %.4f (site log only)",
        site.site_id, run.server_round, len(true), float(losses.mean()), float((preds == true).mean()),
        macro_f1(true, preds, len(cfg.label_names)),
    )
    if not cfg.release_metrics:
        return Message(RecordDict({"status": status_record(site.site_id, STATUS_EVALUATED)}), reply_to=msg)
    params_fp = trainable_fingerprint(
        [(n, tuple(p.shape)) for n, p in run.model.named_parameters() if p.requires_grad]
    )
    guard = PrivacyGuard(site.ledger_path, site.site_id, site.max_epsilon)
    # Write-ahead: the release's spend is on disk (or refused) before any number is noised or sent.
    spend = record_metrics_spend(guard, cfg, run.run_id, run.server_round, run.dataset_fingerprint, params_fp,
                                 len(run.train))
    if not spend.allowed:
        log.warning("[%s] round %d: %s", site.site_id, run.server_round, spend.reason)
        return Message(RecordDict({"status": status_record(site.site_id, STATUS_BUDGET, spend.reason)}),
                       reply_to=msg)
    released = noised_sums(sums, cfg.metrics_noise_multiplier, SiteRandomness())
    metrics = MetricRecord(
        {
            **released.as_metrics(),
            KEY_METRICS_EPSILON: float(spend.epsilon_run),
            KEY_METRICS_NOISE: float(cfg.metrics_noise_multiplier),
        }
    )
    log.info("[%s] round %d: released noised validation sums, run epsilon now %.3f",
             site.site_id, run.server_round, spend.epsilon_run)
    return Message(
        RecordDict({"metrics": metrics, "status": status_record(site.site_id, STATUS_EVALUATED)}),
        reply_to=msg,
    )
