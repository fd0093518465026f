"""How a run names its model: a bundled preset (``minilm``, ``digits-cnn``), a local Hugging Face encoder folder
(``hf:PATH``) or an image backbone function (``torch:package.module:function``). Torch-free, so the run config can
check a name without loading anything.

The *registry name* of a model (what ``get_model_spec`` and the feature cache key on) says where this process
loads it from: ``hf:<absolute folder>`` (with ``|pooling=cls`` for CLS pooling) or ``torch:<target>`` (with
``|path=<folder>`` when a site names the folder its copy is imported from). A coordinator's folder means nothing
at a site, so a site builds its own registry name from its node-config ``model-path``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

HF_PREFIX = "hf:"
TORCH_PREFIX = "torch:"
POOLINGS: tuple[str, ...] = ("mean", "cls")
DEFAULT_POOLING = "mean"
_SEP = "|"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def model_source(model: str) -> Literal["preset", "hf", "torch"]:
    if model.startswith(HF_PREFIX):
        return "hf"
    if model.startswith(TORCH_PREFIX):
        return "torch"
    return "preset"


def model_name_error(model: str) -> str | None:
    """Why ``model`` (as a run config names it) cannot be a model name, or None."""
    source = model_source(model)
    if source == "hf":
        if not model[len(HF_PREFIX) :].strip():
            return 'hf: needs a folder, e.g. model="hf:/models/my-bert" (a Hugging Face checkpoint folder)'
        return None
    if source == "torch":
        target = model[len(TORCH_PREFIX) :]
        module, _, function = target.partition(":")
        if not _DOTTED.match(module) or not _IDENT.match(function):
            return (
                f"'{model}' is not torch:package.module:function (a function that returns (nn.Module, "
                'feature_size)), e.g. model="torch:my_models.backbones:small_cnn"'
            )
    return None


def canonical_model(model: str) -> str:
    """The run config's model with an ``hf:`` folder made absolute and ``~`` expanded (a no-op otherwise)."""
    if model_source(model) != "hf":
        return model
    folder = model[len(HF_PREFIX) :].strip()
    return HF_PREFIX + os.path.abspath(os.path.expanduser(folder))


def model_kind(model: str) -> Literal["text", "image"] | None:
    """``text`` for hf:, ``image`` for torch:, None for a preset (its spec says)."""
    source = model_source(model)
    return "text" if source == "hf" else "image" if source == "torch" else None


@dataclass(frozen=True)
class OwnModel:
    """A parsed ``hf:``/``torch:`` registry name."""

    source: Literal["hf", "torch"]
    target: str  # hf: the absolute folder; torch: "package.module:function"
    pooling: str = DEFAULT_POOLING  # hf only
    import_path: str = ""  # torch only: a folder put first on sys.path for the import ("" = none)

    @property
    def registry_name(self) -> str:
        if self.source == "hf":
            return (
                HF_PREFIX + self.target + ("" if self.pooling == DEFAULT_POOLING else f"{_SEP}pooling={self.pooling}")
            )
        return TORCH_PREFIX + self.target + (f"{_SEP}path={self.import_path}" if self.import_path else "")


def registry_name(model: str, pooling: str = DEFAULT_POOLING, local_path: str | Path | None = None) -> str:
    """Where this process loads the run's ``model`` from. ``local_path`` (a site's ``model-path``) replaces the
    coordinator's hf: folder, or is the folder a torch: target is imported from; presets ignore it."""
    source = model_source(model)
    if source == "preset":
        return model
    error = model_name_error(model)
    if error:
        raise ValueError(f"model: {error}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: '{pooling}' is not one of {', '.join(POOLINGS)}")
    local = os.path.abspath(os.path.expanduser(str(local_path))) if local_path else ""
    if source == "hf":
        folder = local or canonical_model(model)[len(HF_PREFIX) :]
        return OwnModel("hf", folder, pooling).registry_name
    return OwnModel("torch", model[len(TORCH_PREFIX) :], import_path=local).registry_name


def parse_registry_name(name: str) -> OwnModel:
    """The inverse of :func:`registry_name` for hf:/torch: names (a bare ``hf:FOLDER`` is mean-pooled)."""
    source = model_source(name)
    if source == "preset":
        raise ValueError(f"'{name}' is not an hf: or torch: model name")
    body = name[len(HF_PREFIX if source == "hf" else TORCH_PREFIX) :]
    options: dict[str, str] = {}
    if _SEP in body:
        body, _, rest = body.partition(_SEP)
        for item in rest.split(_SEP):
            key, _, value = item.partition("=")
            options[key] = value
    if source == "hf":
        pooling = options.get("pooling", DEFAULT_POOLING)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: '{pooling}' is not one of {', '.join(POOLINGS)}")
        return OwnModel("hf", os.path.abspath(os.path.expanduser(body.strip())), pooling)
    error = model_name_error(TORCH_PREFIX + body)
    if error:
        raise ValueError(f"model: {error}")
    return OwnModel("torch", body, import_path=options.get("path", ""))


def run_model_name(model: str, pooling: str = "") -> str:
    """The run config's ``model`` as its registry name (an hf: folder made absolute, a ``pooling`` other than
    mean folded in); a ValueError names the key (``model:`` or ``pooling:``) and the fix. Idempotent: a site
    reads back the name the coordinator sent, with the same ``pooling``."""
    pooling = pooling.strip()
    source = model_source(model)
    if source != "hf" and pooling:
        raise ValueError(
            f"pooling: '{pooling}' applies to hf: models only; '{model}' pools as it was built (leave pooling empty)"
        )
    if source == "preset":
        return model
    error = model_name_error(model)
    if error:
        raise ValueError(f"model: {error}")
    if pooling and pooling not in POOLINGS:
        raise ValueError(f"pooling: '{pooling}' is not one of {', '.join(POOLINGS)} (mean is the default)")
    own = parse_registry_name(model)
    if source == "hf":
        named = f"{_SEP}pooling=" in model
        if pooling and named and own.pooling != pooling:
            raise ValueError(f"pooling: '{pooling}' contradicts the model name '{model}'; give pooling once")
        own = OwnModel("hf", own.target, pooling or own.pooling)
    return own.registry_name


def relocate(name: str, local_path: str | Path | None) -> str:
    """A registry name as a site loads it: its own folder (node-config ``model-path``) for an hf: model, or the
    folder a torch: target is imported from; presets and an empty path are unchanged."""
    if model_source(name) == "preset" or not local_path:
        return name
    own = parse_registry_name(name)
    local = os.path.abspath(os.path.expanduser(str(local_path)))
    if own.source == "hf":
        return OwnModel("hf", local, own.pooling).registry_name
    return OwnModel("torch", own.target, import_path=local).registry_name
