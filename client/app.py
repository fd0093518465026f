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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privatune.client.metrics_release import exact_sums, noised_sums, per_record_outcomes, record_metrics_spend
from privatune.client.privacy_guard import PrivacyGuard, check_site_delta
from privatune.client.randomness import Randomness, SeededRandomness, SiteRandomness, reproducible_seed
from privatune.client.record_ids import dataset_fingerprint, key_check, record_ids, validation_split
from privatune.client.site_config import SiteConfig
from privatune.client.site_data import SiteDataError, load_site_data
from privatune.client.site_secret import key_for_ledger
from privatune.client.training import train_local
from privatune.common.config import RunConfig
from privatune.common.datasets import LabelledData
from privatune.common.evaluation import macro_f1
from privatune.common.features import cached_features, encode
from privatune.common.federation_data import client_records
from privatune.common.he import HEError
from privatune.common.ledger import LedgerError
from privatune.common.models import (
    Classifier,
    backbone_is_frozen,
    configure_trainable,
    get_model_spec,
    load_trainable_state,
    trainable_fingerprint,
    trainable_state,
)
from privatune.common.protocol import (
    KEY_METRICS_EPSILON,
    KEY_METRICS_NOISE,
    KEY_NOISE_SOURCE,
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
    train_ids: list[bytes]  # keyed record ids (client/record_ids.py), aligned with train
    val_ids: list[bytes]
    dataset_fingerprint: str  # keyed, of all local records: links this site's ledger rows to the server's
    key_check: str  # which site key made the ids (client/record_ids.key_check)
    model: Classifier
    trainable_names: list[str]


def read_run_config(msg: Message) -> tuple[RunConfig, int]:
    record = msg.content["config"]
    values = {k: v for k, v in record.items() if k not in PROTOCOL_KEYS}
    return RunConfig.from_flower(values), int(record.get("server-round", 0))


@dataclass(frozen=True)
class LocalData:
    """A site's records split by its own keyed ids: the split and the ids are the site's alone."""

    train: LabelledData
    val: LabelledData
    train_ids: list[bytes]
    val_ids: list[bytes]
    fingerprint: str
    num_records: int
    key_check: str


def load_local_data(cfg: RunConfig, site: SiteConfig) -> LocalData:
    """The site's records, their keyed ids, the keyed validation split and the keyed dataset fingerprint."""
    if site.simulated:
        assert site.partition_id is not None and site.num_partitions
        data = client_records(cfg, site.partition_id, site.num_partitions)
    else:
        assert site.data is not None
        kind = get_model_spec(cfg.model).kind
        data = load_site_data(site.data, cfg.label_names, kind=kind, name=site.site_id)
    key = key_for_ledger(site.key_path, site.ledger_path)
    ids = record_ids(key, data)
    train_idx, val_idx = validation_split(key, ids, cfg.val_fraction)
    return LocalData(
        train=data.subset(train_idx),
        val=data.subset(val_idx),
        train_ids=[ids[i] for i in train_idx],
        val_ids=[ids[i] for i in val_idx],
        fingerprint=dataset_fingerprint(key, ids),
        num_records=len(data),
        key_check=key_check(key),
    )


def prepare(msg: Message, context: Context) -> LocalRun:
    cfg, server_round = read_run_config(msg)
    site = SiteConfig.from_node_config(dict(context.node_config), cfg)
    local = load_local_data(cfg, site)
    check_site_delta(site.delta, local.num_records)
    spec = get_model_spec(cfg.model)
    model = spec.build(len(cfg.label_names), cfg.seed)
    names = configure_trainable(model, cfg.mode)
    incoming = decode_global_state(msg, cfg, site)
    load_trainable_state(model, incoming)
    return LocalRun(
        cfg,
        site,
        str(context.run_id),
        server_round,
        local.train,
        local.val,
        local.train_ids,
        local.val_ids,
        local.fingerprint,
        local.key_check,
        model,
        names,
    )


def decode_global_state(msg: Message, cfg: RunConfig, site: SiteConfig) -> dict[str, np.ndarray]:
    """The global trainable weights, decrypted with this site's key under HE."""
    arrays: ArrayRecord = msg.content["arrays"]
    if cfg.secure_aggregation != "he":
        return {k: v.numpy() for k, v in arrays.items()}
    from privatune.common import he
    from privatune.common.he.records import arrayrecord_to_state

    ctx = he.load_context(site_secret_path(site), require_secret=True)
    return he.decrypt_state(ctx, arrayrecord_to_state(arrays))


def site_secret_path(site: SiteConfig):
    if site.he_secret_context is None:
        raise ValueError("this run uses secure-aggregation=he but the site has no he-secret-context in its node config")
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


def _ledger_error_for_server(ledger_path: str | Path) -> str:
    """What the coordinator learns of a ledger error: the file's name, not its folder or contents."""
    return (
        f"site ledger refused: {Path(ledger_path).name} cannot be read or verified; the site's log has the "
        "details and the recovery steps"
    )


def round_randomness(run: LocalRun) -> Randomness:
    """This round's DP randomness: a fresh CSPRNG created here, unless the run asked for reproducible noise and
    the site allows it (checked in SiteConfig); then a seed from the run config, the round and the site."""
    if run.cfg.reproducible_noise:
        if not run.site.allow_reproducible_noise:  # SiteConfig refuses this earlier; never fall back silently
            raise ValueError("reproducible-noise=true is not allowed at this site (allow-reproducible-noise)")
        return SeededRandomness(reproducible_seed(run.cfg.seed, run.server_round, run.site.site_id))
    return SiteRandomness()


@dataclass
class RoundInputs:
    """Everything training needs that can fail without touching a gradient, built before the spend is written."""

    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    randomness: Randomness


def round_inputs(run: LocalRun, data: LabelledData, randomness: Randomness | None = None) -> RoundInputs:
    module, inputs = module_and_inputs(run, data)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    return RoundInputs(module, inputs, labels, randomness if randomness is not None else round_randomness(run))


def train_round(run: LocalRun, data: LabelledData, noise_multiplier: float, prepared: RoundInputs | None = None):
    """One round of local training exactly as the ClientApp runs it (the canary audit reuses it)."""
    cfg = run.cfg
    prepared = prepared or round_inputs(run, data)
    return train_local(
        prepared.module,
        prepared.inputs,
        prepared.labels,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        dp=cfg.private,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        randomness=prepared.randomness,
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
    started = datetime.now(UTC)
    dataset_fp = run.dataset_fingerprint
    params_fp = trainable_fingerprint([(n, tuple(p.shape)) for n, p in run.model.named_parameters() if p.requires_grad])
    try:
        guard = PrivacyGuard(
            site.ledger_path, site.site_id, site.max_epsilon, site.delta, site.on_exhausted, run.key_check
        )
        plan = guard.plan(cfg, run.run_id, run.train_ids)
    except LedgerError as err:  # a ledger that cannot be trusted or written: no spend can be proven, no training
        log.error("[%s] round %d refused: %s", site.site_id, run.server_round, err)
        return _reply_without_update(
            msg, context, STATUS_REFUSED, _ledger_error_for_server(site.ledger_path), site_id=site.site_id
        )
    except ValueError as err:  # e.g. a looser delta than the site's
        log.error("round refused: %s", err)
        return _reply_without_update(msg, context, STATUS_REFUSED, str(err), site_id=site.site_id)
    if not plan.allowed:
        log.warning("[%s] not training round %d: %s", site.site_id, run.server_round, plan.reason)
        return _reply_without_update(msg, context, STATUS_BUDGET, plan.reason, site_id=site.site_id)
    cohort = run.train.subset(np.asarray(plan.train, dtype=np.int64))
    if cfg.private and len(cohort) < cfg.batch_size:
        log.warning(
            "[%s] round %d: only %d training records for batch-size %d: every step samples the whole "
            "set (sample rate 1), so DP noise dominates; a site needs many batches of records",
            site.site_id,
            run.server_round,
            len(cohort),
            cfg.batch_size,
        )
    # Everything that can fail without touching a gradient comes before the spend is written (inputs and the
    # feature cache, the round's randomness, the HE key for the reply): a round that fails here costs nothing.
    try:
        prepared = round_inputs(run, cohort)
        he_ctx = load_encryption_context(cfg, site)
    except (OSError, ValueError, HEError) as err:
        log.error("[%s] round %d not started: %s", site.site_id, run.server_round, err)
        return _reply_without_update(msg, context, STATUS_REFUSED, f"round not started: {err}", site_id=site.site_id)
    noise_source = prepared.randomness.kind
    # Write-ahead: the spend (and the cohort it samples from) is on disk before a single gradient is computed.
    # From here on it counts, whether or not the update is released.
    try:
        guard.record(
            plan, cfg, run.run_id, run.server_round, run.train_ids, dataset_fp, params_fp, started, noise_source
        )
    except LedgerError as err:
        log.error("[%s] round %d refused: %s", site.site_id, run.server_round, err)
        return _reply_without_update(
            msg, context, STATUS_REFUSED, _ledger_error_for_server(site.ledger_path), site_id=site.site_id
        )
    noise, delta = plan.noise_multiplier, plan.delta
    result = train_round(run, cohort, noise, prepared)
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
        values[KEY_NUM_EXAMPLES] = len(cohort)  # the plaintext FedAvg weight (docs/privacy.md)
    metrics = MetricRecord(values)
    status = status_record(
        site.site_id,
        STATUS_TRAINED,
        accountant=cfg.accountant,
        **{"dataset-fingerprint": dataset_fp, "params-fingerprint": params_fp, KEY_NOISE_SOURCE: noise_source},
    )
    try:
        arrays = encode_update(state, len(cohort), cfg, site, he_ctx)
    except HEError as err:  # e.g. a non-finite weight: refuse to encrypt, say why
        log.error("[%s] update not sent: %s", site.site_id, err)
        return _reply_without_update(msg, context, STATUS_REFUSED, f"update not encrypted: {err}", site_id=site.site_id)
    # The loss and the timing stay here, in the site's log: they are not DP-noised, so they never leave.
    log.info(
        "[%s] round %d: %d records, train loss %.4f, epsilon %.3f, noise %s, %.1f s",
        site.site_id,
        run.server_round,
        len(cohort),
        result.loss,
        plan.epsilon_run,
        noise_source,
        result.seconds,
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "status": status}), reply_to=msg)


def load_encryption_context(cfg: RunConfig, site: SiteConfig):
    """The site's CKKS context for encrypting its update (None without HE)."""
    if cfg.secure_aggregation != "he":
        return None
    from privatune.common import he

    return he.load_context(site_secret_path(site), require_secret=True)


def encode_update(
    state: dict[str, np.ndarray], num_examples: int, cfg: RunConfig, site: SiteConfig, he_ctx=None
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
        log.info(
            "[%s] round %d: no validation records (val-fraction=%g), nothing evaluated",
            site.site_id,
            run.server_round,
            cfg.val_fraction,
        )
        reason = "this site has no validation records"
        return Message(RecordDict({"status": status_record(site.site_id, STATUS_NO_VALIDATION, reason)}), reply_to=msg)
    module, inputs = module_and_inputs(run, run.val)
    losses, preds = per_record_outcomes(
        module, inputs, torch.as_tensor(run.val.labels, dtype=torch.long), device=site.device
    )
    true = np.asarray(run.val.labels)
    sums = exact_sums(losses, preds == true)
    log.info(
        "[%s] round %d: validation on %d records: loss %.4f, accuracy %.4f, macro-F1 %.4f (site log only)",
        site.site_id,
        run.server_round,
        len(true),
        float(losses.mean()),
        float((preds == true).mean()),
        macro_f1(true, preds, len(cfg.label_names)),
    )
    if not cfg.release_metrics:
        return Message(RecordDict({"status": status_record(site.site_id, STATUS_EVALUATED)}), reply_to=msg)
    params_fp = trainable_fingerprint([(n, tuple(p.shape)) for n, p in run.model.named_parameters() if p.requires_grad])
    try:
        guard = PrivacyGuard(
            site.ledger_path, site.site_id, site.max_epsilon, site.delta, site.on_exhausted, run.key_check
        )
        # Write-ahead: the release's spend is on disk (or refused) before any number is noised or sent.
        spend = record_metrics_spend(
            guard, cfg, run.run_id, run.server_round, run.dataset_fingerprint, params_fp, run.val_ids
        )
    except LedgerError as err:
        log.error("[%s] round %d: metrics not released: %s", site.site_id, run.server_round, err)
        return _reply_without_update(
            msg, context, STATUS_REFUSED, _ledger_error_for_server(site.ledger_path), site_id=site.site_id
        )
    except ValueError as err:
        log.error("[%s] round %d: metrics not released: %s", site.site_id, run.server_round, err)
        return _reply_without_update(msg, context, STATUS_REFUSED, str(err), site_id=site.site_id)
    if not spend.allowed:
        log.warning("[%s] round %d: %s", site.site_id, run.server_round, spend.reason)
        return Message(RecordDict({"status": status_record(site.site_id, STATUS_BUDGET, spend.reason)}), reply_to=msg)
    released = noised_sums(sums, cfg.metrics_noise_multiplier, SiteRandomness())
    metrics = MetricRecord(
        {
            **released.as_metrics(),
            KEY_METRICS_EPSILON: float(spend.epsilon_run),
            KEY_METRICS_NOISE: float(cfg.metrics_noise_multiplier),
        }
    )
    log.info(
        "[%s] round %d: released noised validation sums, run epsilon now %.3f",
        site.site_id,
        run.server_round,
        spend.epsilon_run,
    )
    return Message(
        RecordDict({"metrics": metrics, "status": status_record(site.site_id, STATUS_EVALUATED)}),
        reply_to=msg,
    )
