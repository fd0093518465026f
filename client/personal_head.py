"""personal-head (FedRep/FedPer style, issue 15, docs/personalisation.md): each site keeps its own head.

Only the body travels (plaintext or HE: common/models/trainable.py ``shared_state``); the head a site trains stays in
a file in the site's folder, beside its ledger (``head-<site>.safetensors``), read back at the start of each of the
run's messages (deployment runs each message in a fresh process) and replaced after each training round. A head
written by another run is not used: that run's first round starts from the initial head, like every site.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privatune.client.site_config import SiteConfig
from privatune.common.models.trainable import is_head_param, shared_state, trainable_state

log = logging.getLogger("privatune.client")

HEAD_FILE_PREFIX = "head-"
KEY_HEAD_RUN = "run-id"  # the run whose rounds trained the head in the file


def site_file(site: SiteConfig, prefix: str, suffix: str = ".safetensors") -> Path:
    """A file of the site's own in its folder (beside its ledger), named after the site; never sent."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in site.site_id)
    return Path(site.ledger_path).parent / f"{prefix}{safe}{suffix}"


def head_path(site: SiteConfig) -> Path:
    return site_file(site, HEAD_FILE_PREFIX)


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> Path:
    """Write safetensors atomically (temporary file, then rename): a crash leaves the old file or the new one."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def head_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v for k, v in trainable_state(model).items() if is_head_param(k)}


def keep_head(model: torch.nn.Module, site: SiteConfig, run_id: str) -> Path:
    """The site's head, after a training round, into its file (before the reply, which holds only the body)."""
    return save_arrays(head_path(site), head_state(model), {KEY_HEAD_RUN: run_id, "site-id": site.site_id})


def load_head(model: torch.nn.Module, site: SiteConfig, run_id: str) -> bool:
    """Put the site's kept head of this run into ``model``; False (the model keeps its initial head) when the site
    has none for this run yet."""
    path = head_path(site)
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta: dict[str, Any] = fh.metadata() or {}
        arrays = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if meta.get(KEY_HEAD_RUN) != run_id:
        log.info(
            "[%s] the kept head is run %s's, not this run's: starting from the initial head",
            site.site_id,
            meta.get(KEY_HEAD_RUN),
        )
        return False
    params = {n: p for n, p in model.named_parameters() if is_head_param(n)}
    if set(params) != set(arrays) or any(tuple(arrays[n].shape) != tuple(p.shape) for n, p in params.items()):
        raise ValueError(
            f"{path.name}: the kept head does not fit this run's model; move the file away to start "
            "from the initial head"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)))
    return True


def outgoing_state(model: torch.nn.Module, personal_head: bool) -> dict[str, np.ndarray]:
    """The trainable weights a reply carries: all of them, or the body alone under personal-head."""
    return shared_state(trainable_state(model), personal_head)
