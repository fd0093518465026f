"""LoRA adapters (PEFT) in a Classifier's backbone, with A matrices every party initialises identically.

PEFT draws LoRA's A from the global torch RNG; here the draw is replaced by one from a generator seeded with the
run's seed and the module's name (what ``nn.init.kaiming_uniform_(a=sqrt(5))`` gives, as in PEFT), and B is
zero, so a site and the server build the same adapters without exchanging them (FFA-LoRA never sends its frozen
A). This is model initialisation, public like the head's; DP noise never comes from it. The global RNG is left
as it was.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from privatune.common.models.classifier import Classifier
from privatune.common.models.modes import FineTuning

LORA_MARKERS = (".lora_A.", ".lora_B.")


def is_lora_param(name: str) -> bool:
    return any(m in name for m in LORA_MARKERS)


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def lora_targets(model: Classifier, settings: FineTuning) -> tuple[str, ...]:
    targets = settings.lora_targets or model.lora_targets
    if not targets:
        raise ValueError(
            'lora-targets: this model names no default LoRA target modules; give lora-targets="name1,name2" '
            "(module names or name suffixes in the backbone, e.g. query,value)"
        )
    return tuple(targets) if not settings.lora_blocks else _in_last_blocks(model, tuple(targets), settings.lora_blocks)


def _in_last_blocks(model: Classifier, targets: tuple[str, ...], n: int) -> tuple[str, ...]:
    """The backbone modules matching ``targets`` (PEFT's rule: the name or a dotted suffix of it) inside the last
    ``n`` of ``model.block_prefixes``, as full names, so PEFT adapts those and no other."""
    blocks = model.block_prefixes
    if n > len(blocks):
        raise ValueError(f"lora-blocks: this model has {len(blocks)} blocks, got lora-blocks={n}; use 0 for all")
    last = blocks[len(blocks) - n :]
    names = tuple(
        name
        for name, _ in model.backbone.named_modules()
        if any(f"backbone.{name}.".startswith(b) for b in last)
        and any(name == t or name.endswith(f".{t}") for t in targets)
    )
    if not names:
        raise ValueError(
            f"lora-blocks: no module named {', '.join(targets)} in the last {n} block(s) of this backbone "
            f"({', '.join(b.removeprefix('backbone.').rstrip('.') for b in last)}); check lora-targets"
        )
    return names


def _settings_key(settings: FineTuning, targets: tuple[str, ...]) -> tuple[object, ...]:
    return (settings.lora_rank, settings.lora_alpha, settings.lora_dropout, targets, settings.seed)


def _module_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"privatune-lora-A|{int(seed)}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def apply_lora(model: Classifier, settings: FineTuning) -> None:
    """Put LoRA adapters on ``model.backbone`` (once; a second call with the same settings does nothing)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    targets = lora_targets(model, settings)
    key = _settings_key(settings, targets)
    done = model.lora_applied
    if done is not None:
        if done != key:
            raise ValueError(
                "this model already has LoRA adapters with other settings (rank, alpha, dropout, targets or "
                "seed); build a fresh model for new settings"
            )
        return
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,  # type: ignore[arg-type]  # PEFT scales by alpha / r in floats
        lora_dropout=settings.lora_dropout,
        target_modules=list(targets),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        try:
            inject_adapter_in_model(config, model.backbone)
        except ValueError as exc:
            raise ValueError(
                f"lora-targets: {', '.join(targets)} match no layer PEFT can adapt in this backbone ({exc}); "
                "name Linear (or Conv) modules of the backbone"
            ) from exc
    with torch.no_grad():
        for name, module in model.backbone.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in module.lora_A:
                a = module.lora_A[adapter]
                b = module.lora_B[adapter]
                assert isinstance(a, nn.Module) and isinstance(b, nn.Module)
                weight = a.weight
                assert isinstance(weight, torch.Tensor) and isinstance(b.weight, torch.Tensor)
                fan_in = int(weight[0].numel())
                bound = 1.0 / math.sqrt(fan_in)
                gen = torch.Generator().manual_seed(_module_seed(settings.seed, f"{name}.{adapter}"))
                weight.copy_(torch.empty_like(weight).uniform_(-bound, bound, generator=gen))
                b.weight.zero_()
    model.lora_applied = key
