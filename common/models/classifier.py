"""The model shape every backbone shares: a pretrained backbone and a fresh, seeded linear head.

Separate so the model builders, the trainable-state code and the feature pass depend on one small class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """Pretrained backbone + linear head.

    ``block_prefixes`` names the backbone's blocks, first to last, as parameter prefixes relative to this
    module (e.g. ``"backbone.bert.encoder.layer.5."``): ``last-k`` trains the last ``k`` of them besides the
    head, and layer-wise learning-rate decay counts depth in them. ``lora_targets`` are the module names (or
    name suffixes, PEFT's ``target_modules``) that ``lora`` adapts by default. Each model builder sets both, so
    a new model only has to say what its blocks are. ``partial_prefixes`` (the older name) is taken as the
    blocks when ``block_prefixes`` is not given, and reads back as the last block.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Linear,
        partial_prefixes: Sequence[str] = (),
        *,
        block_prefixes: Sequence[str] | None = None,
        lora_targets: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        self.backbone = backbone
        self.head = head
        blocks = tuple(partial_prefixes if block_prefixes is None else block_prefixes)
        self.block_prefixes: tuple[str, ...] = blocks
        self.lora_targets: tuple[str, ...] = tuple(lora_targets)
        self.lora_applied: tuple[object, ...] | None = None  # set by common.models.lora.apply_lora
        names = [n for n, _ in self.named_parameters()]
        for prefix in blocks:
            if not prefix.startswith("backbone.") or not any(n.startswith(prefix) for n in names):
                raise ValueError(
                    f"block prefix {prefix!r} matches no backbone parameter; give a prefix such as 'backbone.<block>.'"
                )

    @property
    def partial_prefixes(self) -> tuple[str, ...]:
        """The last block: what ``partial`` (= ``last-k`` with k = 1) trains besides the head."""
        return self.block_prefixes[-1:]

    @property
    def feature_dim(self) -> int:
        return int(self.head.in_features)

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)

    def train(self, mode: bool = True) -> Classifier:
        """Train mode, except the frozen prefix of ``last-k`` (the stem and the frozen blocks below the first
        trained one, :mod:`privatune.common.models.prefix`): it stays in eval mode (no dropout), as a frozen
        feature extractor, so the whole model computes what the cached prefix + trained suffix computes."""
        super().train(mode)
        if mode:
            from privatune.common.models.prefix import frozen_prefix_modules  # prefix imports this module

            for module in frozen_prefix_modules(self):
                module.eval()
        return self

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


def unwrap(model: nn.Module) -> nn.Module:
    """Accept an Opacus GradSampleModule around a Classifier (its names gain a ``_module.`` prefix)."""
    while not isinstance(model, Classifier):
        inner = getattr(model, "_module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def classifier_on(
    backbone: nn.Module,
    feature_dim: int,
    num_classes: int,
    seed: int,
    block_prefixes: Sequence[str],
    lora_targets: Sequence[str],
) -> Classifier:
    """A fresh trainable Classifier over a copy of a loaded backbone (the template stays untouched and frozen);
    the builder of every model loaded at run time (``hf:``, ``torch:``)."""
    import copy

    model = Classifier(
        copy.deepcopy(backbone),
        new_head(feature_dim, num_classes, seed),
        block_prefixes=block_prefixes,
        lora_targets=lora_targets,
    )
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()
