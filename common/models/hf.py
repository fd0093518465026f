"""Your own text encoder: any local Hugging Face encoder checkpoint folder (BERT, DistilBERT, RoBERTa, MiniLM
families), with the tokenizer from the same folder, loaded offline (``local_files_only``), mean- or CLS-pooled.

The folder is checked before anything heavy loads (it exists, has a config.json of an encoder type, a tokenizer
and weights) and every failure names the folder and the fix. Nothing is downloaded.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privatune.common.models.classifier import Classifier, classifier_on
from privatune.common.models.names import OwnModel
from privatune.common.models.registry import ModelSpec, PretrainedAssets, load_pretrained_cached
from privatune.common.offline import set_offline_env

HF_DEFAULT_MAX_LENGTH = 64
# model_type values (config.json) of the encoder families privatune builds; MiniLM checkpoints are "bert".
ENCODER_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "camembert", "electra")
# Families whose position ids start after the padding index (the model computes them from input_ids).
_PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert")
# LoRA's default targets per family: the attention's query and value projections (Hu et al. 2021).
LORA_TARGETS: dict[str, tuple[str, ...]] = {"distilbert": ("q_lin", "v_lin")}
DEFAULT_LORA_TARGETS = ("query", "value")  # BERT, MiniLM, RoBERTa, XLM-R, CamemBERT, ELECTRA
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; the message names the folder and the fix."""


class PooledEncoder(nn.Module):
    """A Hugging Face encoder whose sentence feature is the masked mean of its token states, or the first token's.

    Position ids (where the family counts from 0) and token-type ids are passed with the batch dimension: the
    models' default buffers have batch size 1, which breaks Opacus' per-sample gradients for the embeddings.
    """

    def __init__(self, model: nn.Module, pooling: str, model_type: str) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        self.model = model
        self.pooling = pooling
        accepted = set(inspect.signature(model.forward).parameters)
        self._pass_positions = "position_ids" in accepted and model_type not in _PADDING_OFFSET_TYPES
        self._pass_token_types = "token_type_ids" in accepted

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        kwargs: dict[str, torch.Tensor] = {}
        if self._pass_positions:
            kwargs["position_ids"] = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)
        if self._pass_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def read_encoder_config(name: str, folder: Path) -> Any:
    """The folder's transformers config, after checking it is a supported encoder's (errors name the fix)."""
    if not folder.exists():
        raise ModelFolderError(
            f"model '{name}': folder {folder} does not exist; give the folder of a Hugging Face checkpoint "
            "(model.save_pretrained(folder) and tokenizer.save_pretrained(folder)); a site sets model-path in its "
            "node config to its own copy"
        )
    if not folder.is_dir():
        raise ModelFolderError(f"model '{name}': {folder} is a file; give the checkpoint's folder")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(
            f"model '{name}': {folder} has no config.json, so it is not a Hugging Face checkpoint folder; save the "
            "model there with model.save_pretrained(folder)"
        )
    set_offline_env(force=True)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelFolderError(f"model '{name}': cannot read {folder / 'config.json'}: {err}") from None
    model_type = str(getattr(config, "model_type", ""))
    if (
        model_type not in ENCODER_TYPES
        or getattr(config, "is_encoder_decoder", False)
        or getattr(config, "is_decoder", False)
    ):
        raise ModelFolderError(
            f"model '{name}': config.json says model_type '{model_type}'"
            + (" as a decoder" if model_type in ENCODER_TYPES else "")
            + f", not an encoder privatune builds ({', '.join(ENCODER_TYPES)}); give a BERT, DistilBERT, RoBERTa "
            "or MiniLM encoder checkpoint"
        )
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelFolderError(
            f"model '{name}': {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
            "model's tokenizer into the same folder with tokenizer.save_pretrained(folder)"
        )
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ModelFolderError(
            f"model '{name}': {folder} has no weights (none of {', '.join(WEIGHT_FILES)}); save them with "
            "model.save_pretrained(folder)"
        )
    return config


def max_positions(config: Any) -> int:
    """The longest tokenised input the checkpoint's position embeddings allow."""
    limit = int(getattr(config, "max_position_embeddings", 512))
    if config.model_type in _PADDING_OFFSET_TYPES:
        limit -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return limit


def load_hf_encoder(name: str, own: OwnModel) -> PretrainedAssets:
    """Tokenizer and frozen, pooled encoder from the folder (offline; no pooler: its output is unused, and
    untouched trainable parameters break Opacus in full mode)."""
    folder = Path(own.target)
    config = read_encoder_config(name, folder)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # clients may run in forked workers
    start = time.perf_counter()
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelFolderError(
            f"model '{name}': the tokenizer in {folder} does not load ({err}); save it with "
            "tokenizer.save_pretrained(folder)"
        ) from None
    tokenizer.padding_side = "right"  # the feature pass trims right padding
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # an absent pooler is expected
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelFolderError(f"model '{name}': the weights in {folder} do not load: {err}") from None
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        raise ModelFolderError(
            f"model '{name}': {folder} lacks {len(missing)} encoder weight(s) ({', '.join(sorted(missing)[:3])}"
            f"{' ...' if len(missing) > 3 else ''}); they would start random, and differently at every site: "
            "save the whole pretrained encoder"
        )
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    backbone = PooledEncoder(model, own.pooling, config.model_type)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return PretrainedAssets(
        name=name,
        backbone=backbone,
        tokenizer=tokenizer,
        load_seconds=time.perf_counter() - start,
        extra={
            "max_positions": max_positions(config),
            "block_prefixes": _block_prefixes(model, _num_layers(config)),
            "lora_targets": LORA_TARGETS.get(config.model_type, DEFAULT_LORA_TARGETS),
            "folder": str(folder),
        },
    )


def _num_layers(config: Any) -> int:
    """How many transformer blocks the encoder has (DistilBERT's config calls them ``n_layers``)."""
    return int(getattr(config, "num_hidden_layers", None) or config.n_layers)


def _block_prefixes(model: nn.Module, num_layers: int) -> tuple[str, ...]:
    """The parameter prefixes of the encoder's blocks, first to last (``backbone.model.<layer list>.<i>.``):
    BERT and RoBERTa keep them in ``encoder.layer``, DistilBERT in ``transformer.layer``."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and path:
            return tuple(f"backbone.model.{path}.{i}." for i in range(num_layers))
    raise ModelFolderError(f"cannot find the {num_layers} encoder layers of {type(model).__name__}")


def hf_spec(name: str, own: OwnModel) -> ModelSpec:
    """The spec of an hf: model; its config is read (and checked) now, the weights on first use."""
    config = read_encoder_config(name, Path(own.target))
    dim = int(getattr(config, "hidden_size", None) or config.dim)  # DistilBERT: dim

    def build(num_classes: int, seed: int) -> Classifier:
        assets = load_pretrained_cached(name)
        return classifier_on(
            assets.backbone, dim, num_classes, seed, assets.extra["block_prefixes"], assets.extra["lora_targets"]
        )

    def encode(inputs: Sequence[str] | np.ndarray, *, max_length: int | None = None) -> tuple[torch.Tensor, ...]:
        return tokenize(load_pretrained_cached(name), inputs, max_length)

    return ModelSpec(
        name=name,
        kind="text",
        feature_dim=dim,
        description=f"{config.model_type} encoder from {own.target}, {own.pooling}-pooled {dim}-dim features",
        build=build,
        encode=encode,
        default_max_length=min(HF_DEFAULT_MAX_LENGTH, max_positions(config)),
    )


def tokenize(
    assets: PretrainedAssets, inputs: Sequence[str] | np.ndarray, max_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise to a fixed length (pad + truncate): ``(input_ids, attention_mask)``, both ``[N, L]`` int64."""
    from privatune.common.models.text import tokenize_texts

    length = HF_DEFAULT_MAX_LENGTH if max_length is None else int(max_length)
    limit = int(assets.extra["max_positions"])
    if not 2 <= length <= limit:
        raise ValueError(f"max-length must be in [2, {limit}] for model '{assets.name}', got {max_length}")
    return tokenize_texts(assets.tokenizer, inputs, length, caller="encode")
