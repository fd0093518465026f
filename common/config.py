"""One typed run configuration, validated at the edge.

Flower carries the run config as a flat dict of kebab-case keys (``[tool.flwr.app.config]`` in
pyproject.toml, overridable with ``--run-config``). Everything inside privatune works on the frozen
:class:`RunConfig` built here, so a typo or an impossible value fails once, before any training, with
a message that says which key and what to do.

Values that depend on the preset (model, dataset, learning rate, batch size, ...) use a neutral
sentinel in pyproject.toml (``""`` or ``0``) meaning "take the preset's default".
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from privatune.common.accountants import ACCOUNTANTS, DEFAULT_ACCOUNTANT
from privatune.common.augment.spec import AugmentSpecError, check_augment
from privatune.common.cache import CACHE_OFF
from privatune.common.config_checks import check_aggregation, check_dp, check_personalisation, check_scale
from privatune.common.fashion_mnist import FASHION_MNIST_LABELS
from privatune.common.models.modes import (
    ACCEPTED_MODES,
    MODE_ALIASES,
    FineTuning,
    ModeDefaults,
    recommended_hyperparameters,
)
from privatune.common.models.names import model_kind, run_model_name
from privatune.common.optimizers import OPTIMIZER_SGD, OPTIMIZERS, check_server_optimiser
from privatune.common.presets import PRESETS, Preset
from privatune.common.stages import check_stages

# Label sets of the preset datasets, so a site (which has no copy of them) knows the index order.
DATASET_LABELS: dict[str, tuple[str, ...]] = {
    "sms-spam": ("ham", "spam"),
    "trec6": ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
    "digits": tuple(str(i) for i in range(10)),
    "fashion-mnist": FASHION_MNIST_LABELS,
}

# The kind of each bundled model (its ModelSpec.kind; tests check they agree), so the config can pick a mode's
# recommended hyperparameters without loading torch. hf: models are text, torch: ones images (models/names.py).
MODEL_KINDS: dict[str, str] = {"minilm": "text", "digits-cnn": "image"}

#: The dataset name of a run on the user's own data (run config `sim-data`, common/sim_data.py).
SIM_DATASET = "sim-data"

PARTITION_SCHEMES = ("iid", "dirichlet")
SECURE_AGGREGATION = ("none", "he")
WEIGHTINGS = ("examples", "equal")
AGGREGATORS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")  # server.aggregation implements them
MAX_DELTA = 0.1  # a per-client delta at or above this protects nothing worth the name


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, resolved against its preset and validated."""

    preset: str = "sms-spam"  # "" = no preset: the run names its model (model_only_preset)
    model: str = ""  # a preset's model, hf:FOLDER (a Hugging Face encoder) or torch:module:function (docs/own-model.md)
    pooling: str = ""  # hf: models: mean (the default) or cls
    dataset: str = ""
    mode: str = ""
    num_server_rounds: int = 0
    local_epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0
    max_length: int = 0
    dp: bool = True
    target_epsilon: float = 8.0
    delta: float = 0.0  # 0 = each site's own (node-config delta); a site refuses a looser one
    noise_multiplier: float = 0.0  # 0 = calibrate to target_epsilon over the whole run; fixed, the target still caps
    max_grad_norm: float = 1.0
    accountant: str = DEFAULT_ACCOUNTANT  # prv; rdp (looser) and pld (dp-accounting) on request
    partition: str = "dirichlet"
    alpha: float = 1.0
    seed: int = 42
    fraction_train: float = 1.0
    # Clients sampled to train each round: 0 = fraction-train of those connected; n >= 1 = n (at least min-clients).
    # Drawn at the server from seed and round (server/sampling.py); a site composes epsilon over rounds it trained.
    clients_per_round: int = 0
    min_clients: int = 2
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_records: int = 0  # 0 = the whole dataset; >0 subsamples (fast tests)
    labels: str = ""  # "neg,pos" or ["neg", "pos"] (parse_labels); "" = the preset dataset's labels
    backbone_lr_scale: float = 0.1  # last-k/full: backbone learns at lr x this ("trained more slowly")
    # Fine-tuning mode settings (common/models/modes.py FineTuning; docs/fine-tuning.md)
    last_k: int = 1  # last-k: how many of the backbone's last blocks train besides the head
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""  # comma-separated module names; "" = the model's defaults (MiniLM: query,value)
    lora_freeze_a: bool = False  # FFA-LoRA (Sun et al. 2024): A frozen at its seeded init, only B trains
    lora_blocks: int = 0  # adapters only in the backbone's last n blocks (the blocks below are cached); 0 = all
    layer_lr_decay: float = 1.0  # <1: each block below the top learns at this factor x the one above
    central_eval: bool = True  # only where the server holds the task's own test data (server/central_plan.py)
    sim_max_epsilon: float = 0.0  # simulation only: every simulated site's budget (0 = none); real sites set max-epsilon in their node config
    round_timeout: float = 900.0  # seconds the server waits for a round's replies
    secure_aggregation: str = "none"
    # Simulation only: DP noise and sampling from a seed derived from `seed` (reproducible, and so no protection
    # against whoever knows the seed); recorded as noise-source=seeded; real sites refuse it unless allowed.
    reproducible_noise: bool = False
    he_public_context: str = ""
    aggregator: str = "fedavg"  # fedmedian / fedtrimmedavg / krum: robust, plaintext runs only
    trim_beta: float = 0.2  # fedtrimmedavg: fraction cut at each end of every coordinate
    krum_byzantine: int = 0  # krum: number of faulty or malicious clients to tolerate (f)
    krum_select: int = 1  # krum: replies averaged after selection (1 = Krum, >1 = MultiKrum)
    weighting: str = "examples"  # FedAvg weight: "examples" (plaintext: the count leaves the site) or "equal"
    release_metrics: bool = False  # sites release Gaussian-noised validation sums (cost in their ledger)
    metrics_noise_multiplier: float = 20.0  # noise std / sensitivity of each released sum (see docs/privacy.md)
    # Your own data in simulation: the canonical copy `privatune simulate --data FILE` writes (RUN/data/sim-data.npz);
    # "" = the preset's dataset. With it, dataset resolves to "sim-data" and labels must name the file's label set.
    sim_data: str = ""
    # DP training options (how a step is computed; none changes the mechanism or epsilon): docs/training.md
    optimizer: str = OPTIMIZER_SGD  # sgd | adam (DP-Adam under DP); the server bounds updates for the one named
    max_physical_batch_size: int = 0  # 0 = off; >0: each logical batch in chunks of at most this many records
    ghost_clipping: bool = False  # DP: Opacus' ghost clipping where the model allows it (else per-sample, logged)
    # Simulation only: the feature cache shared by runs ("" = the user's cache folder, off = none); a real site
    # keeps its node-config cache-dir (docs/datasets-and-cache.md)
    cache_dir: str = ""
    out_dir: str = ""
    run_name: str = ""
    # Data augmentation under DP (issue 16, docs/augmentation.md): "" = none, else "name=strength,..." (common/augment);
    # augment-views = K views of each sampled record, per-sample gradients averaged over them before clipping.
    augment: str = ""
    augment_views: int = 1
    # Server optimisers (issue 15, docs/server-optimisers.md): the step the server takes from the aggregate;
    # defaults are Flower 1.42's (FedAvgM, FedAdam, FedYogi); server-lr 0 = the chosen optimiser's Flower default
    server_optimiser: str = "fedavg"  # fedavgm / fedadam / fedyogi: plaintext runs only
    server_lr: float = 0.0  # eta: 0 = Flower's default for the optimiser (fedavgm 1.0, fedadam 0.1, fedyogi 0.01)
    server_momentum: float = 0.0  # fedavgm's beta (Flower's default 0.0: with server-lr 1 that is FedAvg)
    server_beta1: float = 0.9  # fedadam / fedyogi first moment
    server_beta2: float = 0.99  # fedadam / fedyogi second moment
    server_tau: float = 1e-3  # fedadam / fedyogi adaptivity (added to sqrt(v))
    proximal_mu: float = 0.0  # FedProx at the sites: mu/2 ||w - w_global||^2, added after DP noise; 0 = off
    # issue 15 (resume and warm start): a checkpoint folder, run folder or saved model file at the coordinator that
    # the run starts from instead of the pretrained weights (server/resume.py); "" = the pretrained weights
    initial_checkpoint: str = ""
    # issue 14 (privatune tune): simulation only: the folder of the simulated sites' ledgers ("" = OUT/ledgers); a
    # study passes one folder to all its trials so their spends compose there and a site budget stops the study
    sim_ledger_dir: str = ""
    # issue 15 (data that arrives over time; common/stages.py): simulation only, set per stage by
    # `privatune simulate --stages S`: how many stages, which one this run trains, iid chunks or class-incremental
    # label groups, and the fraction of earlier stages' records trained again (rehearsal)
    sim_stages: int = 0
    sim_stage: int = 0
    sim_stage_split: str = "iid"
    sim_rehearsal: float = 0.0
    # issue 15 (personalisation, docs/personalisation.md): personal-head = each site keeps its head, only the body
    # travels (FedRep/FedPer); personalise-epochs > 0 = after the last round each site fine-tunes the final model
    # with DP at its own target personalise-epsilon (personalise-mode run | head) and keeps it at the site
    personal_head: bool = False
    personalise_epochs: int = 0
    personalise_epsilon: float = 1.0
    personalise_mode: str = "run"
    # issue 13 (1,000 virtual clients, docs/scale.md): the share of the connected clients sent the federated
    # evaluation each round, drawn at the server like the training sample; 0 = none (central-eval still scores)
    fraction_evaluate: float = 1.0

    # ------------------------------------------------------------------ building
    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's kebab-case run config; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"unknown run-config key '{key}'; known keys: "
                    + ", ".join(sorted(k.replace("_", "-") for k in known))
                )
            values[name] = value
        return cls.create(**values)

    @classmethod
    def create(cls, **values: Any) -> RunConfig:
        """Coerce types, fill preset defaults and validate."""
        if isinstance(values.get("labels"), (list, tuple)):  # the list form, as TOML or Python gives it
            values = {**values, "labels": ",".join(parse_labels(values["labels"]))}
        typed: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in values:
                typed[f.name] = _coerce(f.name, f.type, values[f.name])
        cfg = cls(**typed)
        return cfg.resolved()

    def resolved(self) -> RunConfig:
        p = model_only_preset(self.model, self.mode) if not self.preset.strip() else PRESETS.get(self.preset)
        if p is None:
            raise ConfigError(
                f"preset: unknown preset '{self.preset}'; choose one of: {', '.join(PRESETS)}, or preset=\"\" with "
                "model=NAME for a task of your own"
            )
        mode = self.mode or p.mode
        if mode in MODE_ALIASES:  # partial = last-k with k = 1
            if self.last_k != 1:
                raise ConfigError(f"mode: 'partial' means last-k with k=1, got last-k={self.last_k}; use mode=last-k")
            mode = MODE_ALIASES[mode]
        try:
            model = run_model_name(self.model or p.model, self.pooling)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        # The preset's lr, batch size and epochs were tuned for its mode; another mode gets its own recommended
        # ones (common/models/modes.py) where the run leaves them at 0 and the model's kind is known.
        defaults: Preset | ModeDefaults = p
        kind = MODEL_KINDS.get(model) or model_kind(model)
        if mode in ACCEPTED_MODES and mode != MODE_ALIASES.get(p.mode, p.mode) and kind is not None:
            defaults = recommended_hyperparameters(mode, kind)
        cfg = replace(
            self,
            preset=self.preset.strip(),
            labels=",".join(parse_labels(self.labels)),
            model=model,
            dataset=self.dataset or (SIM_DATASET if self.sim_data.strip() else p.dataset),
            mode=mode,
            num_server_rounds=self.num_server_rounds or p.num_server_rounds,
            local_epochs=self.local_epochs or defaults.local_epochs,
            batch_size=self.batch_size or defaults.batch_size,
            lr=self.lr or (defaults.lr if self.dp or not defaults.lr_without_dp else defaults.lr_without_dp),
            max_length=self.max_length or p.max_length,
        )
        cfg.validate()
        return cfg

    @property
    def fine_tuning(self) -> FineTuning:
        """What trains and how (:class:`FineTuning`), with the run's seed for the LoRA A matrices."""
        return FineTuning(
            mode=self.mode,
            last_k=self.last_k,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            lora_targets=tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()),
            lora_freeze_a=self.lora_freeze_a,
            lora_blocks=self.lora_blocks,
            layer_lr_decay=self.layer_lr_decay,
            seed=self.seed,
        )

    @property
    def label_names(self) -> tuple[str, ...]:
        """The label set every site must use, in index order."""
        return parse_labels(self.labels) or DATASET_LABELS[self.dataset]

    def to_flower(self) -> dict[str, Any]:
        """Kebab-case dict for ``--run-config`` / ``ConfigRecord`` (floats stay floats)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    # ---------------------------------------------------------------- checking
    @property
    def private(self) -> bool:
        """True when clients train with DP-SGD."""
        return self.dp and not math.isinf(self.target_epsilon)

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        if self.sim_data.strip():
            need(
                self.dataset == SIM_DATASET,
                "dataset",
                f"sim-data brings the run's own data, so dataset must be empty (or '{SIM_DATASET}'), "
                f"not '{self.dataset}'; drop sim-data to train on the preset dataset '{self.dataset}'",
            )
            need(
                bool(self.labels.strip()),
                "labels",
                f'sim-data={self.sim_data} needs its label set in index order: give labels="a,b,..." as in '
                "the run's config.json (privatune simulate --data fills it in)",
            )
        need(
            self.dataset != SIM_DATASET or bool(self.sim_data.strip()),
            "dataset",
            f"'{SIM_DATASET}' means data from a file: give sim-data=PATH (privatune simulate --data FILE writes it)",
        )
        need(
            bool(self.labels.strip()) or self.dataset in DATASET_LABELS,
            "labels",
            f"dataset '{self.dataset}' has no built-in label set; give labels=\"a,b,...\""
            if self.dataset
            else f"a run without a preset (model={self.model}) trains on the sites' own data: give its label set "
            'in index order, labels="neg,pos" or labels=["neg","pos"]',
        )
        need(len(self.label_names) >= 2, "labels", "a classifier needs at least 2 labels")
        need(len(set(self.label_names)) == len(self.label_names), "labels", "labels must be unique")
        need(self.sim_max_epsilon >= 0, "sim-max-epsilon", "must be >= 0 (0 = no site budget)")
        need(self.round_timeout > 0, "round-timeout", "must be > 0 seconds")
        need(self.backbone_lr_scale >= 0, "backbone-lr-scale", "must be >= 0")
        need(self.mode in ACCEPTED_MODES, "mode", f"'{self.mode}' is not one of {ACCEPTED_MODES}")
        need(
            self.last_k >= 1, "last-k", f"must be at least 1 (the number of last blocks that train), got {self.last_k}"
        )
        need(self.lora_rank >= 1, "lora-rank", f"must be at least 1, got {self.lora_rank}")
        need(
            self.lora_alpha > 0 and math.isfinite(self.lora_alpha),
            "lora-alpha",
            f"must be a finite number > 0 (the adapter's scale is alpha / rank), got {self.lora_alpha:g}",
        )
        need(self.lora_blocks >= 0, "lora-blocks", f"must be >= 0 (0 = every block), got {self.lora_blocks}")
        need(0 <= self.lora_dropout < 1, "lora-dropout", f"must be in [0, 1), got {self.lora_dropout:g}")
        need(
            0 < self.layer_lr_decay <= 1,
            "layer-lr-decay",
            f"must be in (0, 1] (1 = every block at the same rate), got {self.layer_lr_decay:g}",
        )
        need(self.num_server_rounds >= 1, "num-server-rounds", "must be at least 1")
        need(self.local_epochs >= 1, "local-epochs", "must be at least 1")
        need(self.batch_size >= 1, "batch-size", "must be at least 1")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(self.max_length >= 4, "max-length", "must be at least 4 tokens")
        check_dp(self, need)  # target-epsilon, delta, noise-multiplier, max-grad-norm
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(math.isfinite(self.round_timeout), "round-timeout", "must be a finite number of seconds")
        need(math.isfinite(self.sim_max_epsilon), "sim-max-epsilon", "must be finite (0 = no site budget)")
        need(self.accountant in ACCOUNTANTS, "accountant", f"must be one of {ACCOUNTANTS}")
        need(self.partition in PARTITION_SCHEMES, "partition", f"must be one of {PARTITION_SCHEMES}")
        need(
            self.alpha > 0 and math.isfinite(self.alpha),
            "alpha",
            "the Dirichlet concentration must be a finite number > 0",
        )
        need(0 < self.fraction_train <= 1, "fraction-train", "must be in (0, 1]")
        need(self.clients_per_round >= 0, "clients-per-round", "must be 0 (use fraction-train) or a number of clients")
        need(self.min_clients >= 1, "min-clients", "must be at least 1")
        need(0 <= self.val_fraction < 0.5, "val-fraction", "must be in [0, 0.5)")
        need(0 < self.test_fraction < 0.5, "test-fraction", "must be in (0, 0.5)")
        need(self.max_records >= 0, "max-records", "must be >= 0 (0 = all records)")
        need(self.weighting in WEIGHTINGS, "weighting", f"must be one of {WEIGHTINGS}")
        need(
            self.metrics_noise_multiplier > 0 and math.isfinite(self.metrics_noise_multiplier),
            "metrics-noise-multiplier",
            "must be a finite number > 0 (released metrics are always noised; release-metrics=false sends none)",
        )
        need(
            self.optimizer in OPTIMIZERS,
            "optimizer",
            f"'{self.optimizer}' is not one of {OPTIMIZERS} (adam runs DP-Adam under DP)",
        )
        need(
            self.max_physical_batch_size >= 0,
            "max-physical-batch-size",
            f"must be >= 0 records (0 = no splitting), got {self.max_physical_batch_size}",
        )
        need(
            self.cache_dir.strip().lower() in ("", *CACHE_OFF) or os.path.isabs(os.path.expanduser(self.cache_dir)),
            "cache-dir",
            f"'{self.cache_dir}' is a relative path, which means a different folder in every process of a "
            'simulation; give an absolute folder (or ~/...), "" for the user\'s cache folder, or "off"',
        )
        check_aggregation(self, need)  # secure-aggregation, aggregator and its parameters
        try:  # issue 16: the augmentation spec, refused here (before any training) with the key, op and range
            check_augment(
                self.augment,
                self.augment_views,
                MODEL_KINDS.get(self.model) or model_kind(self.model),
                mode=self.mode,
                ghost_clipping=self.ghost_clipping,
                dp=self.private,
            )
        except AugmentSpecError as err:
            raise ConfigError(str(err)) from None
        check_server_optimiser(self, need)  # issue 15: server-optimiser, server-*, proximal-mu
        check_stages(self, need)  # issue 15: sim-stages, sim-stage, sim-stage-split, sim-rehearsal
        check_personalisation(self, need)  # issue 15: personal-head, personalise-*
        check_scale(self, need)  # issue 13: fraction-evaluate


#: How a run without a preset is filled in (docs/fine-tuning.md "A model without a preset"): the model's kind (text or
#: image) picks the mode's recommended lr, batch size and local epochs (common/models/modes.py); the mode defaults
#: to head, the rounds to MODEL_ONLY_ROUNDS and max-length to 64 tokens; there is no dataset, so labels is required.
MODEL_ONLY_MODE = "head"
MODEL_ONLY_ROUNDS = 5
MODEL_NAMES_HINT = f"{', '.join(MODEL_KINDS)}, hf:FOLDER (docs/own-model.md) or torch:package.module:function"


def model_only_preset(model: str, mode: str) -> Preset:
    """The defaults of a run that names its model and no preset (``preset=""``, ``model=minilm``)."""
    name = model.strip()
    if not name:
        raise ConfigError(f'preset: preset="" (a task of your own) needs model=NAME: one of {MODEL_NAMES_HINT}')
    kind = MODEL_KINDS.get(name) or model_kind(name)
    if kind is None:
        raise ConfigError(f"model: '{name}' is not a model; give one of {MODEL_NAMES_HINT}")
    chosen = MODE_ALIASES.get(mode, mode) or MODEL_ONLY_MODE
    rec = recommended_hyperparameters(chosen if chosen in ACCEPTED_MODES else MODEL_ONLY_MODE, kind)
    return Preset(
        model=name,
        dataset="",
        mode=chosen,
        lr=rec.lr,
        batch_size=rec.batch_size,
        local_epochs=rec.local_epochs,
        num_server_rounds=MODEL_ONLY_ROUNDS,
        description=f"your own task on a {kind} model",
    )


def parse_labels(value: Any, key: str = "labels") -> tuple[str, ...]:
    """A label set in index order, as a user writes it: a comma string ("neg,pos"), a list (TOML's or Python's
    ["neg", "pos"]) or the list form as text ('["neg","pos"]', [neg,pos]: what a shell leaves of it); () for
    "". Errors name ``key``."""
    example = f'write {key}="neg,pos" or {key}=["neg","pos"]'
    listed = isinstance(value, (list, tuple))
    if listed:
        items = [str(v).strip() for v in value]
        with_comma = [v for v in items if "," in v]
        if with_comma:
            raise ConfigError(f"{key}: label {with_comma[0]!r} contains a comma, which separates labels; rename it")
    else:
        text = str(value).strip()
        if text.startswith("[") != text.endswith("]"):
            raise ConfigError(f"{key}: {value!r} opens or closes a list without the other bracket; {example}")
        listed = text.startswith("[")
        if listed:
            text = text[1:-1].strip()
        items = [_unquote(x.strip()) for x in text.split(",")] if text else []
    if listed and not items:
        raise ConfigError(f"{key}: the list is empty; {example} (or leave {key} out for the preset's labels)")
    if any(not item for item in items):
        raise ConfigError(f"{key}: {value!r} has an empty label name (two commas, or one at an end); {example}")
    return tuple(items)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1].strip()
    return text


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    """Flower hands back TOML scalars; `--run-config` may hand back strings."""
    t = str(type_name)
    key = name.replace("_", "-")
    try:
        if t == "bool":
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {t}") from None
