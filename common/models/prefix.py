"""A Classifier split at a block boundary into a frozen prefix (run once per record) and a trainable suffix.

In ``last-k`` nothing below block ``j`` trains, so the prefix's output for a record (the stem and blocks ``< j``)
is the same at every step, epoch and round. :func:`frozen_split` finds ``j`` (the first block holding a trainable
parameter, with nothing trainable below it), :func:`prefix_outputs` runs the prefix under ``torch.no_grad`` in eval
mode, and :class:`SuffixModule` is the rest of the model (blocks ``j..``, pooling, head) as a module Opacus wraps.
The suffix holds the Classifier's own ``backbone`` and ``head`` (the same parameter objects, not copies), so its
parameter names equal the Classifier's and what travels (``trainable_state`` of the Classifier) is unchanged.

Frozen blocks run in eval mode (dropout off) in both paths: :func:`frozen_prefix_modules` is what
``Classifier.train`` keeps in eval mode, so the whole model and the split compute the same function.
Known splits: BERT encoders (MiniLM's ``MeanPooledEncoder``; ``hf:`` folders of model type ``bert``) and the
digits CNN. Any other backbone gives ``None``: the caller trains the whole model (no speed-up, same results).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from privatune.common.models.classifier import Classifier

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class _Family:
    """How one backbone family splits at block ``start``: the prefix's modules, its pass and the suffix's pass."""

    modules: Callable[[nn.Module, int], list[nn.Module]]
    prefix: Callable[[nn.Module, int, Tensors], Tensors]
    suffix: Callable[[nn.Module, int, Tensors], torch.Tensor]
    text: bool


# -- BERT ------------------------------------------------------------------------------------------------------


def _bert_of(backbone: nn.Module) -> tuple[Any, str] | None:
    """The BertModel inside a pooled text backbone and its pooling ("mean" or "cls"), or None."""
    from privatune.common.models.hf import PooledEncoder
    from privatune.common.models.text import MeanPooledEncoder

    if isinstance(backbone, MeanPooledEncoder):
        bert, pooling = backbone.bert, "mean"
    elif isinstance(backbone, PooledEncoder) and backbone._pass_positions and backbone._pass_token_types:
        bert, pooling = backbone.model, backbone.pooling
    else:
        return None
    from transformers import BertModel

    if type(bert) is not BertModel or bert.config.is_decoder or getattr(bert, "pooler", None) is not None:
        return None
    return bert, pooling


def bert_layer_mask(bert: Any, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    """The attention mask BertLayer takes, built as ``BertModel.forward`` builds it.

    The one place that depends on transformers internals (checked against transformers 5.24:
    ``BertModel._create_attention_masks`` calls ``masking_utils.create_bidirectional_mask`` for an encoder).
    tests/test_prefix_cache.py compares the split with the whole model and fails loudly if this changes.
    """
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=mask)


def _bert(backbone: nn.Module) -> tuple[Any, str]:
    found = _bert_of(backbone)
    if found is None:
        raise TypeError(f"{type(backbone).__name__} is not a split BERT backbone")
    return found


def _bert_modules(backbone: nn.Module, start: int) -> list[nn.Module]:
    bert = _bert(backbone)[0]
    return [bert.embeddings, *list(bert.encoder.layer)[:start]]


def _bert_prefix(backbone: nn.Module, start: int, encoded: Tensors) -> Tensors:
    bert = _bert(backbone)[0]
    input_ids, mask = encoded
    batch, length = input_ids.shape
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)
    hidden = bert.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=torch.zeros_like(input_ids))
    layer_mask = bert_layer_mask(bert, hidden, mask)
    for layer in list(bert.encoder.layer)[:start]:
        hidden = layer(hidden, layer_mask)
    return hidden, mask


def _bert_suffix(backbone: nn.Module, start: int, inputs: Tensors) -> torch.Tensor:
    bert, pooling = _bert(backbone)
    hidden, mask = inputs
    if mask.numel():  # trim the batch to its longest record: padded keys are masked, real positions unchanged
        length = max(int(mask.sum(dim=1).max()), 1)
        hidden, mask = hidden[:, :length], mask[:, :length]
    layer_mask = bert_layer_mask(bert, hidden, mask)
    for layer in list(bert.encoder.layer)[start:]:
        hidden = layer(hidden, layer_mask)
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _bert_family(model: Classifier) -> _Family | None:
    found = _bert_of(model.backbone)
    if found is None:
        return None
    path = "bert" if hasattr(model.backbone, "bert") else "model"
    layers = len(found[0].encoder.layer)
    if model.block_prefixes != tuple(f"backbone.{path}.encoder.layer.{i}." for i in range(layers)):
        return None
    return _Family(_bert_modules, _bert_prefix, _bert_suffix, text=True)


# -- the digits CNN --------------------------------------------------------------------------------------------


def _cnn_cut(start: int) -> tuple[str, int]:
    """Block ``start`` of the digits CNN as (the Sequential it is in, its index there)."""
    from privatune.common.models.image import DIGITS_BLOCKS

    if start >= len(DIGITS_BLOCKS):  # nothing in the backbone trains: the prefix is all of it
        return "fc_layers", sys.maxsize
    _, seq, index = DIGITS_BLOCKS[start].rstrip(".").split(".")
    return seq, int(index)


def _layers(backbone: nn.Module, name: str) -> list[nn.Module]:
    """The layers of the CNN's ``conv_layers`` or ``fc_layers`` Sequential, in order."""
    seq = backbone.get_submodule(name)
    return list(seq.children())


def _cnn_modules(backbone: nn.Module, start: int) -> list[nn.Module]:
    seq, index = _cnn_cut(start)
    conv = _layers(backbone, "conv_layers")
    return conv[:index] if seq == "conv_layers" else [*conv, *_layers(backbone, "fc_layers")[:index]]


def _cnn_prefix(backbone: nn.Module, start: int, encoded: Tensors) -> Tensors:
    seq, index = _cnn_cut(start)
    x = encoded[0]
    for layer in _layers(backbone, "conv_layers")[: index if seq == "conv_layers" else None]:
        x = layer(x)
    if seq == "fc_layers":
        x = torch.flatten(x, 1)
        for layer in _layers(backbone, "fc_layers")[:index]:
            x = layer(x)
    return (x,)


def _cnn_suffix(backbone: nn.Module, start: int, inputs: Tensors) -> torch.Tensor:
    seq, index = _cnn_cut(start)
    x = inputs[0]
    if seq == "conv_layers":
        for layer in _layers(backbone, "conv_layers")[index:]:
            x = layer(x)
        x = torch.flatten(x, 1)
        index = 0
    for layer in _layers(backbone, "fc_layers")[index:]:
        x = layer(x)
    return x


def _cnn_family(model: Classifier) -> _Family | None:
    from privatune.common.models.image import DIGITS_BLOCKS, DigitsBackbone

    if type(model.backbone) is not DigitsBackbone or model.block_prefixes != DIGITS_BLOCKS:
        return None
    return _Family(_cnn_modules, _cnn_prefix, _cnn_suffix, text=False)


# -- the split -------------------------------------------------------------------------------------------------


def split_start(model: Classifier) -> int:
    """The first block ``j`` with nothing trainable before it: 0 when the stem (embeddings, a stem layer) or block 0
    trains, or when anything trainable outside the head lies outside blocks ``j..``."""
    blocks = model.block_prefixes
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    start = next((j for j, block in enumerate(blocks) if any(n.startswith(block) for n in trainable)), len(blocks))
    if any(not any(n.startswith(b) for b in blocks[start:]) for n in trainable):
        return 0
    return start


@dataclass(frozen=True)
class FrozenSplit:
    """Where ``model`` splits: the stem and blocks ``< start`` are the frozen prefix."""

    model: Classifier
    start: int
    family: _Family

    def prefix_modules(self) -> list[nn.Module]:
        return self.family.modules(self.model.backbone, self.start)


def frozen_split(model: nn.Module) -> FrozenSplit | None:
    """The split of ``model`` for its current ``requires_grad``, or None (not a Classifier, a backbone family
    without a known split, nothing frozen below the trained blocks, or LoRA adapters in the frozen part)."""
    if not isinstance(model, Classifier):
        return None
    family = _bert_family(model) or _cnn_family(model)
    if family is None:
        return None
    start = split_start(model)
    if start == 0:
        return None
    if model.lora_applied is not None and any(  # adapters below the split (lora-blocks 0): they would be cached
        ".lora_" in name for m in family.modules(model.backbone, start) for name, _ in m.named_parameters()
    ):
        return None
    return FrozenSplit(model, start, family)


def frozen_prefix_modules(model: Classifier) -> list[nn.Module]:
    """The modules of the frozen prefix (kept in eval mode while the model trains); [] when there is none."""
    split = frozen_split(model)
    return split.prefix_modules() if split is not None else []


class SuffixModule(nn.Module):
    """Blocks ``start..``, pooling and head of a Classifier, on the prefix's outputs.

    Holds the Classifier's ``backbone`` and ``head`` themselves, so parameter names (``backbone...``, ``head...``)
    and objects are the Classifier's; only the suffix's layers run, so Opacus computes per-sample gradients for
    exactly the trainable parameters (all of them are in the suffix) and the frozen prefix gets no hooks' work.
    """

    def __init__(self, split: FrozenSplit) -> None:
        super().__init__()
        self.backbone = split.model.backbone
        self.head = split.model.head
        self.block_prefixes = split.model.block_prefixes  # layer-lr-decay counts depth in them
        self._split = split

    def train(self, mode: bool = True) -> SuffixModule:
        super().train(mode)
        if mode:
            for module in self._split.prefix_modules():
                module.eval()
        return self

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self._split.family.suffix(self.backbone, self._split.start, inputs))


def prefix_outputs(split: FrozenSplit, encoded: Tensors, batch_size: int = 128) -> Tensors:
    """The prefix's outputs for ``encoded`` (float32, CPU), batch by batch, under no_grad in eval mode.

    Text: each batch is trimmed to its longest record and the result to the longest record overall (zeros beyond
    a record's length; the mask, returned with it, hides them): N x longest x hidden x 4 bytes.
    """
    modules = split.prefix_modules()
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    backbone = split.model.backbone
    device = next(split.model.parameters()).device
    n = int(encoded[0].shape[0])
    try:
        with torch.no_grad():
            if not split.family.text:
                outs = [
                    split.family.prefix(backbone, split.start, tuple(t[i : i + batch_size].to(device) for t in encoded))
                    for i in range(0, n, batch_size)
                ]
                if not outs:  # no records: the prefix's empty output, with its shape
                    outs = [split.family.prefix(backbone, split.start, tuple(t.to(device) for t in encoded))]
                return tuple(torch.cat([o[k].float().cpu() for o in outs]) for k in range(len(outs[0])))
            ids, mask = encoded
            lengths = mask.sum(dim=1)
            longest = max(int(lengths.max()) if n else 1, 1)
            hidden_out = torch.zeros((n, longest, split.model.feature_dim), dtype=torch.float32)
            order = torch.argsort(lengths, stable=True)  # similar lengths together: less padding per batch
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                length = max(int(lengths[idx].max()), 1)
                hidden, _ = split.family.prefix(
                    backbone, split.start, (ids[idx, :length].to(device), mask[idx, :length].to(device))
                )
                hidden_out[idx, :length] = hidden.float().cpu()
            return hidden_out, mask[:, :longest].clone()
    finally:
        for m, was in zip(modules, modes, strict=True):
            m.train(was)
