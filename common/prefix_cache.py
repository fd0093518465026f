"""The frozen prefix's outputs per record (``last-k``), computed once and reused across epochs, rounds and runs.

In ``last-k`` the stem and the blocks below the first trained one are the pretrained weights (no update touches
them), so their output for a record is the same at every step: computing it once turns each step's forward
through every block into one through the trained blocks (common/models/prefix.py). Cached like head mode's
features (common/features.py): in memory (a small LRU: simulation actors live across rounds) and on disk in the
``cache-dir`` folder (private folders, atomic 0600 files), named after the model, the prefix's weights and split
point, the tokenizer and length and the records' inputs, so a changed prefix or dataset never reads a stale
entry. See docs/datasets-and-cache.md.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privatune.common.cache import atomic_write, cache_key, private_dir
from privatune.common.datasets import LabelledData
from privatune.common.features import encode, features_parts
from privatune.common.models.prefix import FrozenSplit, prefix_outputs

log = logging.getLogger("privatune.cache")

#: A prefix entry's file name: ``prefix-<key>.npz`` in the cache folder.
PREFIX_PREFIX = "prefix-"
#: Entries kept in memory; each is N x longest record x hidden x 4 bytes (MiniLM, 500 TREC-6 records, k=1: 30 MB).
MAX_ENTRIES = 8
_MEMORY: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()


def prefix_key(split: FrozenSplit, model_name: str, data: LabelledData, max_length: int | None) -> str:
    """What an entry depends on: the features cache's parts, with the prefix's weights and split point."""
    parts = features_parts(
        split.model,
        model_name,
        data,
        max_length,
        frozen=f"prefix-below-block-{split.start}",
        frozen_module=nn.ModuleList(split.prefix_modules()),
    )
    return cache_key("prefix", parts)


def prefix_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{PREFIX_PREFIX}{key}.npz"


def clear_prefix_cache() -> None:
    """Forget the in-process entries (what a fresh process sees)."""
    _MEMORY.clear()


def _read(path: Path, key: str, rows: int) -> tuple[torch.Tensor, ...] | None:
    """The outputs in ``path``, or None (with a warning) when unreadable or not what ``key`` names."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = [np.asarray(npz[f"out{i}"]) for i in range(int(meta.get("outputs", 0)))]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        log.warning("prefix cache entry %s is unreadable (%s): computing it again", path, err)
        return None
    problem = ""
    if meta.get("key") != key:
        problem = "it was written for other inputs or another prefix"
    elif not arrays or any(a.shape[:1] != (rows,) for a in arrays):
        problem = f"it holds {[list(a.shape) for a in arrays]}, expected {rows} rows"
    elif any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in arrays):
        problem = "it holds NaN or infinite values"
    if problem:
        log.warning("prefix cache entry %s is not usable (%s): computing it again", path, problem)
        return None
    return tuple(torch.from_numpy(a) for a in arrays)


def _write(path: Path, key: str, model_name: str, outputs: tuple[torch.Tensor, ...]) -> None:
    """Write the entry atomically (mode 0600); a cache that cannot be written only warns."""
    meta = json.dumps({"key": key, "model": model_name, "outputs": len(outputs)})
    arrays: dict[str, Any] = {f"out{i}": t.numpy() for i, t in enumerate(outputs)}
    try:
        private_dir(path.parent)
        atomic_write(path, lambda fh: np.savez(fh, meta=np.array(meta), **arrays))
    except OSError as err:
        log.warning("prefix cache: could not write %s (%s); the run goes on without it", path, err)


def cached_prefix_outputs(
    split: FrozenSplit,
    model_name: str,
    data: LabelledData,
    max_length: int | None,
    cache_dir: str | Path | None,
) -> tuple[torch.Tensor, ...]:
    """The prefix's outputs for ``data`` (what :class:`~privatune.common.models.prefix.SuffixModule` takes);
    memoised, and cached on disk in ``cache_dir`` (None: in memory only)."""
    key = prefix_key(split, model_name, data, max_length)
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    path = prefix_path(Path(cache_dir), key) if cache_dir else None
    outputs = _read(path, key, len(data)) if path is not None and path.exists() else None
    if outputs is None:
        outputs = prefix_outputs(split, encode(model_name, data, max_length))
        if path is not None:
            _write(path, key, model_name, outputs)
    _MEMORY[key] = outputs
    while len(_MEMORY) > MAX_ENTRIES:
        _MEMORY.popitem(last=False)
    return outputs
