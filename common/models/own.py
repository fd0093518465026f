"""Your own models in the registry: an ``hf:`` or ``torch:`` registry name (common/models/names.py) becomes a
registered model the first time a process asks for it, so every caller of ``get_model_spec`` works unchanged.
"""

from __future__ import annotations

from privatune.common.models.names import parse_registry_name
from privatune.common.models.registry import ModelSpec, register_loader, register_model


def register_own_model(name: str) -> ModelSpec:
    """Register ``name`` (``hf:...`` or ``torch:...``) and return its spec; errors name the folder or module."""
    own = parse_registry_name(name)
    if own.source == "hf":
        from privatune.common.models.hf import hf_spec, load_hf_encoder

        register_loader(name, lambda: load_hf_encoder(name, own))
        spec = hf_spec(name, own)
    else:
        from privatune.common.models.torch_backbone import load_torch_backbone, torch_spec

        register_loader(name, lambda: load_torch_backbone(name, own))
        spec = torch_spec(name, own)
    register_model(spec, replace=True)
    return spec
