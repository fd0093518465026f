"""Backbone features, computed once per (backbone, data) and reused across rounds and across runs.

In `head` mode nothing changes the backbone, so its output for a client's records is the same in every round
and in every run on the same data and backbone: computing it once turns a MiniLM forward pass per step into a
matrix product. The cache is in-process (simulation actors live across rounds) and on disk (a deployed ClientApp
runs in a fresh process per message; a second simulation reads what the first computed). An entry is named
after everything its content depends on (common/cache.py): the model's name, a fingerprint of the frozen
backbone's weights, the tokenizer and tokenised length (text models), and the records' inputs in order; so a
changed model or dataset misses and computes afresh, never reading a stale file.

Where the disk cache is: a simulation's run-config ``cache-dir`` (default the user's cache folder), a site's
node-config ``cache-dir`` (default next to its ledger); see docs/datasets-and-cache.md.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privatune.common.cache import (
    atomic_write,
    cache_key,
    inputs_fingerprint,
    private_dir,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from privatune.common.datasets import LabelledData
from privatune.common.models import Classifier, compute_features, get_model_spec

log = logging.getLogger("privatune.cache")

#: A features entry's file name: ``features-<key>.npz`` in the cache folder.
FEATURES_PREFIX = "features-"
FEATURES_SUFFIX = ".npz"

_MEMORY: dict[str, torch.Tensor] = {}
_TOKENIZER_FP: dict[int, str] = {}  # id(tokenizer) -> fingerprint (a model's tokenizer is loaded once per process)
_TEMPLATE_FP: dict[str, tuple[torch.nn.Module, str]] = {}  # model name -> (its pretrained backbone, fingerprint)


def encode(model_name: str, data: LabelledData, max_length: int | None) -> tuple[torch.Tensor, ...]:
    """Raw records to the tensors the classifier takes."""
    spec = get_model_spec(model_name)
    return spec.encode(data.inputs, max_length=max_length)


def _tokenizer_identity(model_name: str) -> str:
    """The fingerprint of the tokenizer ``model_name`` loads with, or "" for a model without one."""
    from privatune.common.models import load_pretrained_cached

    try:
        tokenizer = load_pretrained_cached(model_name).tokenizer
    except ValueError:  # no pretrained loader: the model's encoder is its own business (still keyed by name)
        return ""
    if tokenizer is None:
        return ""
    key = id(tokenizer)
    if key not in _TOKENIZER_FP:
        _TOKENIZER_FP[key] = tokenizer_fingerprint(tokenizer)
    return _TOKENIZER_FP[key]


def _same_bytes(module: torch.nn.Module, template: torch.nn.Module) -> bool:
    """Whether two modules have the same structure and every parameter and buffer the same bytes (what
    :func:`weights_fingerprint` hashes), compared without hashing."""
    if [(n, type(m)) for n, m in module.named_modules()] != [(n, type(m)) for n, m in template.named_modules()]:
        return False
    mine, theirs = module.state_dict(), template.state_dict()
    if list(mine) != list(theirs):
        return False
    for name, a in mine.items():
        b = theirs[name]
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        if not torch.equal(_bit_pattern(a), _bit_pattern(b)):
            return False
    return True


#: The signed integer type of each element size: comparing a tensor's bits as these is byte equality (NaNs and
#: -0.0 included), and fewer, wider comparisons than byte by byte.
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_pattern(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool or flat.element_size() not in _BITS_OF_SIZE:
        return flat.view(torch.uint8)
    return flat.view(_BITS_OF_SIZE[flat.element_size()])


def backbone_weights_fingerprint(backbone: torch.nn.Module, model_name: str) -> str:
    """``weights_fingerprint(backbone)``: for a copy of the model's pretrained backbone (every build in head mode,
    twice a round at a site), that of the template, hashed once per process after a byte-for-byte comparison
    (a few ms, against a fraction of a second to hash MiniLM). The template is never trained
    (common/models/fingerprint.py relies on the same)."""
    from privatune.common.models import load_pretrained_cached

    if model_name not in _TEMPLATE_FP:
        try:
            template = load_pretrained_cached(model_name).backbone
        except ValueError:  # no pretrained loader (e.g. the digits CNN): hash it every time
            return weights_fingerprint(backbone)
        _TEMPLATE_FP[model_name] = (template, weights_fingerprint(template))
    template, fingerprint = _TEMPLATE_FP[model_name]
    if backbone is template or _same_bytes(backbone, template):
        return fingerprint
    return weights_fingerprint(backbone)


def features_parts(
    model: Classifier,
    model_name: str,
    data: LabelledData,
    max_length: int | None,
    *,
    frozen: str = "backbone",
    frozen_module: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """What a features entry depends on: the backbone (name, weights, tokenizer, length) and the inputs.

    ``frozen`` names what was run and ``frozen_module`` holds its weights (default: the whole backbone, head
    mode's features); the frozen-prefix cache (common/prefix_cache.py) passes its prefix."""
    from privatune.common.models.classifier import unwrap

    spec = get_model_spec(model_name)
    text = spec.kind == "text"
    backbone = getattr(unwrap(model), "backbone", model) if frozen_module is None else frozen_module
    return {
        "model": model_name,
        "frozen": frozen,  # head mode: the whole backbone is frozen and the feature is its output
        "weights": (
            backbone_weights_fingerprint(backbone, model_name)
            if frozen_module is None
            else weights_fingerprint(frozen_module)
        ),
        "tokenizer": _tokenizer_identity(model_name) if text else "",
        "max_length": (max_length or spec.default_max_length) if text else None,  # images ignore it
        "inputs": inputs_fingerprint(data.inputs),
        "records": len(data),
    }


def features_key(model: Classifier, model_name: str, data: LabelledData, max_length: int | None) -> str:
    return cache_key("features", features_parts(model, model_name, data, max_length))


def features_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{FEATURES_PREFIX}{key}{FEATURES_SUFFIX}"


def clear_memory_cache() -> None:
    """Forget the in-process features (what a fresh process sees): tests, and callers that bound memory."""
    _MEMORY.clear()
    _TEMPLATE_FP.clear()


def _read_entry(path: Path, key: str, rows: int, dim: int) -> torch.Tensor | None:
    """The features in ``path``, or None (with a warning) when the file is unreadable or not what ``key`` names.

    The entry is an uncompressed npz: zip's CRC-32 catches a file damaged on disk, and the key stored inside
    catches a file renamed or copied over another."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            feats = np.asarray(npz["features"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        log.warning("feature cache entry %s is unreadable (%s): computing the features again", path, err)
        return None
    problem = ""
    if meta.get("key") != key:
        problem = "it was written for other inputs or another backbone"
    elif feats.dtype != np.float32 or feats.shape != (rows, dim):
        problem = f"it holds {feats.dtype} {list(feats.shape)}, expected float32 [{rows}, {dim}]"
    elif not np.isfinite(feats).all():
        problem = "it holds NaN or infinite values"
    if problem:
        log.warning("feature cache entry %s is not usable (%s): computing the features again", path, problem)
        return None
    return torch.from_numpy(feats)


def _write_entry(path: Path, key: str, model_name: str, feats: torch.Tensor) -> None:
    """Write the entry atomically (tmp + rename, mode 0600); a cache that cannot be written only warns."""
    meta = json.dumps({"key": key, "model": model_name, "shape": list(feats.shape)})
    try:
        private_dir(path.parent)
        atomic_write(path, lambda fh: np.savez(fh, features=feats.numpy(), meta=np.array(meta)))
    except OSError as err:
        log.warning("feature cache: could not write %s (%s); the run goes on without it", path, err)


def cached_features(
    model: Classifier,
    model_name: str,
    data: LabelledData,
    max_length: int | None,
    cache_dir: str | Path | None,
) -> torch.Tensor:
    """Features of ``data`` under the (frozen) backbone of ``model``; memoised, and cached on disk in
    ``cache_dir`` (None: in memory only)."""
    key = features_key(model, model_name, data, max_length)
    if key in _MEMORY:
        return _MEMORY[key]
    path = features_path(Path(cache_dir), key) if cache_dir else None
    feats = None
    if path is not None and path.exists():
        feats = _read_entry(path, key, len(data), model.feature_dim)
        if feats is not None:
            log.debug("features of %d records from the cache (%s)", len(data), path.name)
    if feats is None:
        feats = compute_features(model, encode(model_name, data, max_length))
        if path is not None:
            _write_entry(path, key, model_name, feats)
    _MEMORY[key] = feats
    return feats
