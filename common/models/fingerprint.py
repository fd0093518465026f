"""The backbone fingerprint: a sha256 over a model's pretrained backbone as loaded (every parameter and buffer:
name, dtype, shape, bytes), before any adapter or training. The coordinator sends its own with every instruction;
a site whose backbone hashes differently refuses the round (client/backbone_check.py), because its frozen
weights would silently differ from the ones the global model was trained with.

Independent of the fine-tuning mode (the template the builders copy is never trained), and memoised per process:
hashing MiniLM's 22.7M parameters takes a fraction of a second, but every round asks.
"""

from __future__ import annotations

import hashlib
import threading

import torch

from privatune.common.models.registry import get_model_spec, load_pretrained_cached

_FINGERPRINTS: dict[str, str] = {}
_LOCK = threading.Lock()


def state_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over ``module.state_dict()`` in order: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_fingerprint(name: str) -> str:
    """The fingerprint of model ``name``'s pretrained backbone in this process (loads it once if needed)."""
    with _LOCK:
        if name in _FINGERPRINTS:
            return _FINGERPRINTS[name]
    get_model_spec(name)  # an hf:/torch: name registers its loader here
    value = state_fingerprint(load_pretrained_cached(name).backbone)
    with _LOCK:
        _FINGERPRINTS[name] = value
    return value
