"""The model card: what a saved global model needs to be used with nothing else (docs/evaluate.md).

Every model file a run leaves carries it as safetensors metadata (string keys, string values): the plaintext
``global.safetensors`` the server writes, and the file ``privatune decrypt`` writes from an encrypted checkpoint
(the checkpoint's header keeps the same metadata). ``privatune evaluate`` and a user's own code read it back.

It says which model (its registry name), how it was fine-tuned (the mode and every setting that shapes the
trainable parameters, LoRA's seeded A matrices included), the label names in index order, the preprocessing
(text: the tokenised length and the pooling; images: 28x28 grayscale, MNIST-normalised), the run and the
privacy the run spent as the server recorded it (its target, the largest epsilon a site reported, the delta the
sites stated it at, the accountant). Nothing in it comes from a site beyond what the sites already report.

The keys live here only (``KEY_*``), so the writer (server/app.py) and the readers share them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.imaging import IMAGE_SIDE, MNIST_MEAN, MNIST_STD
from privatune.common.models.modes import FineTuning

FORMAT = "privatune-model"
VERSION = 1

KEY_FORMAT = "format"
KEY_VERSION = "format-version"
KEY_MODEL = "model"
KEY_KIND = "kind"
KEY_LABELS = "labels"  # a JSON list, in index order
KEY_MAX_LENGTH = "max-length"  # text only
KEY_POOLING = "pooling"  # text only: mean or cls
KEY_INPUT = "input"  # the preprocessing, in words
KEY_IMAGE_SIDE = "image-side"  # images only
KEY_IMAGE_MEAN = "image-mean"
KEY_IMAGE_STD = "image-std"
KEY_RUN_ID = "run-id"
KEY_PRESET = "preset"
KEY_DATASET = "dataset"
KEY_BACKBONE = "backbone-fingerprint"
KEY_SECURE_AGGREGATION = "secure-aggregation"
KEY_ROUNDS = "rounds-completed"
KEY_PERSONAL_HEAD = "personal-head"  # "true": a personal-head run's body alone, the heads kept at the sites (extra)
KEY_DP = "dp"
KEY_TARGET_EPSILON = "target-epsilon"
KEY_MAX_CLIENT_EPSILON = "max-client-epsilon"  # "" when no site reported a spend
KEY_DELTA = "delta"  # "" when no site reported one
KEY_ACCOUNTANT = "accountant"
KEY_NOISE_SOURCE = "noise-source"
# FineTuning's fields, under the run-config key names.
FINE_TUNING_KEYS: dict[str, str] = {
    "mode": "mode",
    "last_k": "last-k",
    "lora_rank": "lora-rank",
    "lora_alpha": "lora-alpha",
    "lora_dropout": "lora-dropout",
    "lora_targets": "lora-targets",  # comma-separated; "" = the model's default targets
    "lora_freeze_a": "lora-freeze-a",
    "layer_lr_decay": "layer-lr-decay",
    "seed": "seed",  # the run's seed: the head's initialisation and LoRA's A matrices
    "lora_blocks": "lora-blocks",  # 0 (every block) where a file written before the key lacks it
}

TEXT_INPUT = (
    "text tokenised to max-length tokens by the model's tokenizer; the feature is the {pooling}-pooled token "
    "states, not normalised"
)
IMAGE_INPUT = (
    f"{IMAGE_SIDE}x{IMAGE_SIDE} grayscale, light digit on dark background, pixels scaled to [0, 1], then "
    f"MNIST-normalised ((x - {MNIST_MEAN}) / {MNIST_STD})"
)


class ModelCardError(ValueError):
    """A model file whose card is missing or wrong; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Privacy:
    """What the run spent, from the server's own record of what the sites reported."""

    dp: bool
    target_epsilon: float  # inf for a run without DP
    max_client_epsilon: float | None  # the largest run epsilon any site reported; None: none reported
    delta: float | None  # the largest delta the sites stated their epsilon at; None: none reported
    accountant: str
    noise_source: str = ""


@dataclass(frozen=True)
class ModelCard:
    model: str  # the registry name (minilm, digits-cnn, hf:/folder|pooling=cls, torch:module:function)
    kind: str  # text or image
    fine_tuning: FineTuning
    labels: tuple[str, ...]
    privacy: Privacy
    max_length: int | None = None  # text: tokenised length
    pooling: str = ""  # text: mean or cls
    run_id: str = ""
    preset: str = ""
    dataset: str = ""
    backbone_fingerprint: str = ""
    secure_aggregation: str = "none"
    rounds_completed: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)  # other metadata in the file (e.g. he_fingerprint)

    def __post_init__(self) -> None:
        if self.kind not in ("text", "image"):
            raise ModelCardError(f"model card field '{KEY_KIND}': must be text or image, got {self.kind!r}")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or not all(self.labels):
            raise ModelCardError(
                f"model card field '{KEY_LABELS}': needs at least 2 distinct, non-empty label names, got "
                f"{list(self.labels)}"
            )
        if self.kind == "text" and (self.max_length is None or self.max_length < 1):
            raise ModelCardError(f"model card field '{KEY_MAX_LENGTH}': a text model needs it (>= 1)")
        if self.kind == "text" and self.pooling not in ("mean", "cls"):
            raise ModelCardError(f"model card field '{KEY_POOLING}': must be mean or cls, got {self.pooling!r}")

    @property
    def input_description(self) -> str:
        return TEXT_INPUT.format(pooling=self.pooling) if self.kind == "text" else IMAGE_INPUT

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata (every value a string)."""
        ft = self.fine_tuning
        p = self.privacy
        meta = {
            KEY_FORMAT: FORMAT,
            KEY_VERSION: str(VERSION),
            KEY_MODEL: self.model,
            KEY_KIND: self.kind,
            KEY_LABELS: json.dumps(list(self.labels)),
            KEY_INPUT: self.input_description,
            KEY_RUN_ID: self.run_id,
            KEY_PRESET: self.preset,
            KEY_DATASET: self.dataset,
            KEY_BACKBONE: self.backbone_fingerprint,
            KEY_SECURE_AGGREGATION: self.secure_aggregation,
            KEY_ROUNDS: str(self.rounds_completed),
            KEY_DP: _bool(p.dp),
            KEY_TARGET_EPSILON: _float(p.target_epsilon),
            KEY_MAX_CLIENT_EPSILON: "" if p.max_client_epsilon is None else _float(p.max_client_epsilon),
            KEY_DELTA: "" if p.delta is None else _float(p.delta),
            KEY_ACCOUNTANT: p.accountant,
            KEY_NOISE_SOURCE: p.noise_source,
        }
        for name, key in FINE_TUNING_KEYS.items():
            value = getattr(ft, name)
            if isinstance(value, bool):
                meta[key] = _bool(value)
            elif isinstance(value, tuple):
                meta[key] = ",".join(value)
            elif isinstance(value, float):
                meta[key] = _float(value)
            else:
                meta[key] = str(value)
        if self.kind == "text":
            meta[KEY_MAX_LENGTH] = str(self.max_length)
            meta[KEY_POOLING] = self.pooling
        else:
            meta.update(
                {KEY_IMAGE_SIDE: str(IMAGE_SIDE), KEY_IMAGE_MEAN: str(MNIST_MEAN), KEY_IMAGE_STD: str(MNIST_STD)}
            )
        return {**{k: v for k, v in self.extra.items() if k not in meta}, **meta}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str] | None, source: str = "the model file") -> ModelCard:
        """The card in a file's metadata; a missing or bad field raises ModelCardError naming it."""
        meta = dict(meta or {})
        if meta.get(KEY_FORMAT) != FORMAT:
            raise ModelCardError(
                f"{source} carries no privatune model card (metadata '{KEY_FORMAT}' is "
                f"{meta.get(KEY_FORMAT)!r}, expected {FORMAT!r}); it was written by an older privatune or by "
                "another tool: run the federation again (or, for an encrypted checkpoint, decrypt one written by "
                "this version)"
            )
        if meta.get(KEY_VERSION) != str(VERSION):
            raise ModelCardError(
                f"{source}: model card version {meta.get(KEY_VERSION)!r} is not supported (this privatune reads "
                f"{VERSION}); evaluate it with the privatune version that wrote it"
            )
        reader = _Reader(meta, source)
        try:
            labels = json.loads(reader.text(KEY_LABELS))
        except json.JSONDecodeError:
            raise ModelCardError(f"{source}: model card field '{KEY_LABELS}' is not a JSON list of names") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ModelCardError(f"{source}: model card field '{KEY_LABELS}' is not a JSON list of names")
        values: dict[str, Any] = {}
        for name, key in FINE_TUNING_KEYS.items():
            if name == "mode":
                values[name] = reader.text(key)
            elif name == "lora_targets":
                values[name] = tuple(t for t in reader.text(key, "").split(",") if t)
            elif name == "lora_freeze_a":
                values[name] = reader.flag(key)
            elif name in ("lora_alpha", "lora_dropout", "layer_lr_decay"):
                values[name] = reader.number(key)
            elif name == "lora_blocks":
                values[name] = int(reader.number(key, 0, integer=True))
            else:
                values[name] = int(reader.number(key, integer=True))
        try:
            fine_tuning = FineTuning(**values)
        except ValueError as err:
            raise ModelCardError(f"{source}: model card: {err}") from None
        kind = reader.text(KEY_KIND)
        privacy = Privacy(
            dp=reader.flag(KEY_DP),
            target_epsilon=reader.number(KEY_TARGET_EPSILON),
            max_client_epsilon=reader.optional_number(KEY_MAX_CLIENT_EPSILON),
            delta=reader.optional_number(KEY_DELTA),
            accountant=reader.text(KEY_ACCOUNTANT, ""),
            noise_source=reader.text(KEY_NOISE_SOURCE, ""),
        )
        try:
            fields = dict(
                model=reader.text(KEY_MODEL),
                max_length=int(reader.number(KEY_MAX_LENGTH, integer=True)) if kind == "text" else None,
                pooling=reader.text(KEY_POOLING) if kind == "text" else "",
                run_id=reader.text(KEY_RUN_ID, ""),
                preset=reader.text(KEY_PRESET, ""),
                dataset=reader.text(KEY_DATASET, ""),
                backbone_fingerprint=reader.text(KEY_BACKBONE, ""),
                secure_aggregation=reader.text(KEY_SECURE_AGGREGATION, "none"),
                rounds_completed=int(reader.number(KEY_ROUNDS, 0, integer=True)),
            )
            known = {KEY_FORMAT, KEY_VERSION, KEY_INPUT, KEY_IMAGE_SIDE, KEY_IMAGE_MEAN, KEY_IMAGE_STD, *reader.read}
            return cls(
                kind=kind,
                fine_tuning=fine_tuning,
                labels=tuple(labels),
                privacy=privacy,
                extra={k: v for k, v in meta.items() if k not in known},
                **fields,  # type: ignore[arg-type]
            )
        except ModelCardError as err:
            raise ModelCardError(f"{source}: {err}") from None

    def describe(self) -> dict[str, Any]:
        """The card as plain JSON values (for --json and the terminal)."""
        p = self.privacy
        return {
            "model": self.model,
            "kind": self.kind,
            "mode": self.fine_tuning.mode,
            "labels": list(self.labels),
            "input": self.input_description,
            "run_id": self.run_id,
            "preset": self.preset,
            "dataset": self.dataset,
            "secure_aggregation": self.secure_aggregation,
            "rounds_completed": self.rounds_completed,
            "dp": p.dp,
            "target_epsilon": p.target_epsilon if math.isfinite(p.target_epsilon) else None,
            "max_client_epsilon": p.max_client_epsilon,
            "delta": p.delta,
            "accountant": p.accountant,
        }


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _float(value: float) -> str:
    return repr(float(value))  # exact round trip ("inf" for a run without DP)


class _Reader:
    """Typed reads of the metadata; every failure names the field."""

    def __init__(self, meta: Mapping[str, str], source: str) -> None:
        self.meta, self.source = meta, source
        self.read: set[str] = set()  # the keys asked for; the rest of the metadata is the card's ``extra``

    def _raw(self, key: str, default: str | None) -> str:
        self.read.add(key)
        if key in self.meta:
            return str(self.meta[key])
        if default is None:
            raise ModelCardError(f"{self.source}: model card field '{key}' is missing")
        return default

    def text(self, key: str, default: str | None = None) -> str:
        return self._raw(key, default)

    def flag(self, key: str) -> bool:
        value = self._raw(key, None)
        if value not in ("true", "false"):
            raise ModelCardError(f"{self.source}: model card field '{key}' must be true or false, got {value!r}")
        return value == "true"

    def number(self, key: str, default: float | None = None, integer: bool = False) -> float:
        value = self._raw(key, None if default is None else str(default))
        try:
            number = float(value) if not integer else float(int(value))
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise ModelCardError(f"{self.source}: model card field '{key}' must be {kind}, got {value!r}") from None
        if math.isnan(number):
            raise ModelCardError(f"{self.source}: model card field '{key}' must be a number, got {value!r}")
        return number

    def optional_number(self, key: str) -> float | None:
        if self._raw(key, "") == "":
            return None
        return self.number(key)


def read_model_file(path: str | Path) -> tuple[ModelCard, dict[str, Any]]:
    """(the card, the trainable weights as numpy arrays) of a model file; errors name the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelCardError(
            f"{path}: {'is a folder' if path.is_dir() else 'not found'}; give the run's global.safetensors "
            "(or the file `privatune decrypt` wrote)"
        )
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata()
            weights = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelCardError(f"{path} is not a safetensors model file ({err})") from None
    return ModelCard.from_metadata(meta, source=str(path)), weights


def pooling_of(model: str) -> str:
    """How a text model pools its token states into the feature: an hf: name says; the built-in MiniLM means."""
    from privatune.common.models.names import DEFAULT_POOLING, model_source, parse_registry_name

    return parse_registry_name(model).pooling if model_source(model) == "hf" else DEFAULT_POOLING
