"""One round at a site, without Flower: open the site's records and model, train under the privacy guard, evaluate.

Separate from the ClientApp (:mod:`privatune.client.app`, which only decodes messages and encodes replies) so that
a round can be run, tested and audited with plain values: configs, numpy state and tensors in, a result
dataclass out. No flwr import here. The order of events inside :func:`train_at_site` is the privacy argument
(docs/privacy.md): everything that can fail without touching a gradient, then the write-ahead spend, then training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privatune.client.metrics_release import exact_sums, noised_sums, per_record_outcomes, record_metrics_spend
from privatune.client.personal_head import keep_head, outgoing_state
from privatune.client.privacy_guard import DEFAULT_SITE_DELTA, PrivacyGuard, check_site_delta
from privatune.client.randomness import Randomness, SeededRandomness, SiteRandomness, reproducible_seed
from privatune.client.record_ids import dataset_fingerprint, key_check, record_ids, validation_split
from privatune.client.site_config import SiteConfig
from privatune.client.site_data import SiteDataError, load_site_data
from privatune.client.site_secret import key_for_ledger
from privatune.client.training import BatchAugment, LocalTrainResult, train_local
from privatune.common.augment.image import image_batch_augment
from privatune.common.augment.spec import IMAGE, TEXT, parse_augment
from privatune.common.augment.text_batch import TextAugmentSiteError, text_batch_augment
from privatune.common.config import RunConfig
from privatune.common.datasets import LabelledData
from privatune.common.evaluation import macro_f1
from privatune.common.features import cached_features, encode
from privatune.common.federation_data import client_records
from privatune.common.he import HEError
from privatune.common.ledger import PURPOSE_TRAIN, LedgerError
from privatune.common.mechanism import DPMechanism
from privatune.common.models import (
    Classifier,
    backbone_is_frozen,
    configure_trainable,
    get_model_spec,
    trainable_fingerprint,
)
from privatune.common.models.prefix import SuffixModule, frozen_split
from privatune.common.prefix_cache import cached_prefix_outputs
from privatune.common.protocol import (
    KEY_DATASET_FINGERPRINT,
    KEY_EPSILON,
    KEY_EPSILON_DATASET,
    KEY_METRICS_EPSILON,
    KEY_METRICS_NOISE,
    KEY_NOISE_SOURCE,
    KEY_NUM_EXAMPLES,
    KEY_PARAMS_FINGERPRINT,
    STATUS_BUDGET,
    STATUS_EVALUATED,
    STATUS_NO_VALIDATION,
    STATUS_REFUSED,
    allowed_train_metric_keys,
)

log = logging.getLogger("privatune.client")


# -- what one message needs at this site ---------------------------------------------------------------------


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


def open_run(cfg: RunConfig, site: SiteConfig, run_id: str, server_round: int) -> LocalRun:
    """The site's records and a fresh model with the mode's trainable set; the caller loads the global weights."""
    local = load_local_data(cfg, site)
    check_site_delta(site.delta, local.num_records)
    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
    names = configure_trainable(model, cfg.fine_tuning)
    return LocalRun(
        cfg,
        site,
        run_id,
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


def site_secret_path(site: SiteConfig) -> Path:
    if site.he_secret_context is None:
        raise ValueError("this run uses secure-aggregation=he but the site has no he-secret-context in its node config")
    return Path(site.he_secret_context)


def load_encryption_context(cfg: RunConfig, site: SiteConfig) -> Any:
    """The site's CKKS context (a TenSEAL context, untyped) for its update; None without HE."""
    if cfg.secure_aggregation != "he":
        return None
    from privatune.common import he

    return he.load_context(site_secret_path(site), require_secret=True)


# -- what the coordinator learns of a failure ------------------------------------------------------------------


def data_error_for_server(err: SiteDataError) -> str:
    """What the coordinator learns of a data error: where, not what (the value stays in the site log)."""
    where = f"record {err.record}" if err.record is not None else "the file"
    return f"site data refused: {err.path.name}, {where}; the site's log has the details and the fix"


def ledger_error_for_server(ledger_path: str | Path) -> str:
    """What the coordinator learns of a ledger error: the file's name, not its folder or contents."""
    return (
        f"site ledger refused: {Path(ledger_path).name} cannot be read or verified; the site's log has the "
        "details and the recovery steps"
    )


@dataclass(frozen=True)
class Refusal:
    """A round that sends nothing but its status (``STATUS_*``) and the reason the coordinator may read."""

    status: str
    reason: str
    site_id: str = ""  # empty when the site is not known yet


# -- training --------------------------------------------------------------------------------------------------


def module_and_inputs(
    run: LocalRun, data: LabelledData, *, per_step_inputs: bool = False
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """`head` mode trains the head alone on cached backbone features. Where nothing below block j trains
    (`last-k`) the suffix (blocks j.., pooling, head: the Classifier's own parameters) trains on the frozen
    prefix's cached outputs (common/models/prefix.py), unless ``per_step_inputs`` (augmented images change at
    every step); otherwise the whole model."""
    cfg = run.cfg
    if backbone_is_frozen(cfg.mode):
        feats = cached_features(run.model, cfg.model, data, cfg.max_length, run.site.cache_dir)
        return run.model.head, (feats,)
    split = None if per_step_inputs else frozen_split(run.model)
    if split is not None:
        return SuffixModule(split), cached_prefix_outputs(split, cfg.model, data, cfg.max_length, run.site.cache_dir)
    return run.model, encode(cfg.model, data, cfg.max_length)


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
    augment: BatchAugment | None = None  # issue 16: the run's augmentation of a batch (None: none)


def round_inputs(run: LocalRun, data: LabelledData, randomness: Randomness | None = None) -> RoundInputs:
    module, inputs, augment = augmented_inputs(run, data)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    return RoundInputs(module, inputs, labels, randomness if randomness is not None else round_randomness(run), augment)


def augmented_inputs(
    run: LocalRun, data: LabelledData
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], BatchAugment | None]:
    """The module, the loop's inputs and the run's augmentation of a batch (issue 16, docs/augmentation.md).

    Images: the encoded images, augmented per step (common/augment/image.py). Text with operations: the loop's
    inputs are the records' row numbers, and each step draws and tokenises its sampled records' K views
    (common/augment/text_batch.py; the model's encoder and max-length, as :func:`module_and_inputs` encodes);
    a site without the WordNet an operation needs is refused here, before the spend. The run config refused the
    other kind's operations and head mode already."""
    cfg = run.cfg
    spec = get_model_spec(cfg.model)
    steps = parse_augment(cfg.augment, spec.kind)
    if steps and spec.kind == TEXT:
        augment = text_batch_augment(data.inputs, steps, lambda texts: spec.encode(texts, max_length=cfg.max_length))
        return run.model, (torch.arange(len(data), dtype=torch.long),), augment
    module, inputs = module_and_inputs(run, data, per_step_inputs=bool(steps))
    return module, inputs, image_batch_augment(steps) if steps and spec.kind == IMAGE else None


def train_round(
    run: LocalRun,
    data: LabelledData,
    noise_multiplier: float,
    prepared: RoundInputs | None = None,
    delta: float = DEFAULT_SITE_DELTA,
) -> LocalTrainResult:
    """One round of local training exactly as the ClientApp runs it (the canary audit reuses it); ``delta``
    only states the result's mechanism (the round passes the plan's)."""
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
        delta=delta,
        accountant=cfg.accountant,
        optimizer_name=cfg.optimizer,
        max_physical_batch_size=cfg.max_physical_batch_size,
        ghost_clipping=cfg.ghost_clipping,
        layer_lr_decay=cfg.fine_tuning.layer_lr_decay,
        block_prefixes=run.model.block_prefixes,
        augment=prepared.augment,
        augment_views=cfg.augment_views,
        proximal_mu=cfg.proximal_mu,  # FedProx toward the global weights the round loaded (issue 15)
    )


def params_fingerprint(run: LocalRun) -> str:
    """Which trainable parameters (names and shapes) an update or a release covers."""
    return trainable_fingerprint([(n, tuple(p.shape)) for n, p in run.model.named_parameters() if p.requires_grad])


def open_guard(run: LocalRun) -> PrivacyGuard:
    site = run.site
    return PrivacyGuard(site.ledger_path, site.site_id, site.max_epsilon, site.delta, site.on_exhausted, run.key_check)


@dataclass(frozen=True)
class TrainedRound:
    """A trained round whose spend is on disk: the update to send and what the reply says of it."""

    state: dict[str, np.ndarray]  # the trainable weights after training (plaintext, on the CPU)
    mechanism: DPMechanism  # what training ran (noise multiplier 0 without DP)
    epsilon_run: float
    epsilon_dataset: float
    num_examples: int
    dataset_fingerprint: str
    params_fingerprint: str
    noise_source: str
    he_ctx: Any  # the site's CKKS context, loaded before the spend was written (None without HE)
    loss: float  # site log only
    seconds: float  # site log only

    def metrics(self, cfg: RunConfig) -> dict[str, float | int]:
        """The reply's metrics: the mechanism, its epsilons, and the example count only where plaintext
        FedAvg weights by it (docs/privacy.md)."""
        values: dict[str, float | int] = {
            KEY_EPSILON: float(self.epsilon_run),
            KEY_EPSILON_DATASET: float(self.epsilon_dataset),
            **self.mechanism.to_metrics(),
        }
        if KEY_NUM_EXAMPLES in allowed_train_metric_keys(cfg.secure_aggregation, cfg.weighting):
            values[KEY_NUM_EXAMPLES] = self.num_examples  # the plaintext FedAvg weight (docs/privacy.md)
        return values

    def status(self) -> dict[str, str]:
        """The reply's status fields besides status, client id and reason."""
        return {
            **self.mechanism.to_status(),
            KEY_DATASET_FINGERPRINT: self.dataset_fingerprint,
            KEY_PARAMS_FINGERPRINT: self.params_fingerprint,
            KEY_NOISE_SOURCE: self.noise_source,
        }


def train_at_site(run: LocalRun, purpose: str = PURPOSE_TRAIN) -> TrainedRound | Refusal:
    """Plan the round's spend, refuse or record it (write-ahead), then train on exactly the planned cohort.
    ``purpose``: the ledger row's (client/personalise.py runs the same path for a site's personalisation)."""
    cfg, site = run.cfg, run.site
    started = datetime.now(UTC)
    dataset_fp = run.dataset_fingerprint
    params_fp = params_fingerprint(run)
    try:
        guard = open_guard(run)
        plan = guard.plan(cfg, run.run_id, run.train_ids)
    except LedgerError as err:  # a ledger that cannot be trusted or written: no spend can be proven, no training
        log.error("[%s] round %d refused: %s", site.site_id, run.server_round, err)
        return Refusal(STATUS_REFUSED, ledger_error_for_server(site.ledger_path), site.site_id)
    except ValueError as err:  # e.g. a looser delta than the site's
        log.error("round refused: %s", err)
        return Refusal(STATUS_REFUSED, str(err), site.site_id)
    if not plan.allowed:
        log.warning("[%s] not training round %d: %s", site.site_id, run.server_round, plan.reason)
        return Refusal(STATUS_BUDGET, plan.reason, site.site_id)
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
    except TextAugmentSiteError as err:  # the site log names its WordNet folder; the coordinator learns the op
        log.error("[%s] round %d not started: %s", site.site_id, run.server_round, err)
        return Refusal(STATUS_REFUSED, f"round not started: {err.for_server()}", site.site_id)
    except (OSError, ValueError, HEError) as err:
        log.error("[%s] round %d not started: %s", site.site_id, run.server_round, err)
        return Refusal(STATUS_REFUSED, f"round not started: {err}", site.site_id)
    noise_source = prepared.randomness.kind
    # Write-ahead: the spend (and the cohort it samples from) is on disk before a single gradient is computed.
    # From here on it counts, whether or not the update is released.
    try:
        guard.record(
            plan,
            cfg,
            run.run_id,
            run.server_round,
            run.train_ids,
            dataset_fp,
            params_fp,
            started,
            noise_source,
            purpose,
        )
    except LedgerError as err:
        log.error("[%s] round %d refused: %s", site.site_id, run.server_round, err)
        return Refusal(STATUS_REFUSED, ledger_error_for_server(site.ledger_path), site.site_id)
    result = train_round(run, cohort, plan.noise_multiplier, prepared, delta=plan.delta)
    run.model.to("cpu")
    if cfg.personal_head and purpose == PURPOSE_TRAIN:
        keep_head(run.model, site, run.run_id)  # the head stays at the site; the reply carries the body alone
    return TrainedRound(
        state=outgoing_state(run.model, cfg.personal_head and purpose == PURPOSE_TRAIN),
        mechanism=result.mechanism,
        epsilon_run=plan.epsilon_run,
        epsilon_dataset=plan.epsilon_dataset,
        num_examples=len(cohort),
        dataset_fingerprint=dataset_fp,
        params_fingerprint=params_fp,
        noise_source=noise_source,
        he_ctx=he_ctx,
        loss=result.loss,
        seconds=result.seconds,
    )


def log_trained(run: LocalRun, trained: TrainedRound) -> None:
    """The round's line in the site's log: the loss and the timing are not DP-noised, so they never leave."""
    log.info(
        "[%s] round %d: %d records, train loss %.4f, epsilon %.3f, noise %s, %.3f s",
        run.site.site_id,
        run.server_round,
        trained.num_examples,
        trained.loss,
        trained.epsilon_run,
        trained.noise_source,
        trained.seconds,
    )


# -- evaluation ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """An evaluation's reply: its status (``STATUS_*``), a reason, and the released metrics (none by default)."""

    status: str
    reason: str = ""
    metrics: dict[str, float] | None = None


def evaluate_at_site(run: LocalRun) -> Evaluation | Refusal:
    """Evaluate the global model on the site's validation split; release noised sums only if asked and paid for."""
    cfg, site = run.cfg, run.site
    if not len(run.val):
        # Never evaluate on training records: a score on them measures memorisation and spends nothing.
        log.info(
            "[%s] round %d: no validation records (val-fraction=%g), nothing evaluated",
            site.site_id,
            run.server_round,
            cfg.val_fraction,
        )
        return Evaluation(STATUS_NO_VALIDATION, "this site has no validation records")
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
        return Evaluation(STATUS_EVALUATED)
    params_fp = params_fingerprint(run)
    try:
        guard = open_guard(run)
        # Write-ahead: the release's spend is on disk (or refused) before any number is noised or sent.
        spend = record_metrics_spend(
            guard, cfg, run.run_id, run.server_round, run.dataset_fingerprint, params_fp, run.val_ids
        )
    except LedgerError as err:
        log.error("[%s] round %d: metrics not released: %s", site.site_id, run.server_round, err)
        return Refusal(STATUS_REFUSED, ledger_error_for_server(site.ledger_path), site.site_id)
    except ValueError as err:
        log.error("[%s] round %d: metrics not released: %s", site.site_id, run.server_round, err)
        return Refusal(STATUS_REFUSED, str(err), site.site_id)
    if not spend.allowed:
        log.warning("[%s] round %d: %s", site.site_id, run.server_round, spend.reason)
        return Evaluation(STATUS_BUDGET, spend.reason)
    released = noised_sums(sums, cfg.metrics_noise_multiplier, SiteRandomness())
    metrics = {
        **released.as_metrics(),
        KEY_METRICS_EPSILON: float(spend.epsilon_run),
        KEY_METRICS_NOISE: float(cfg.metrics_noise_multiplier),
    }
    log.info(
        "[%s] round %d: released noised validation sums, run epsilon now %.3f",
        site.site_id,
        run.server_round,
        spend.epsilon_run,
    )
    return Evaluation(STATUS_EVALUATED, metrics=metrics)
