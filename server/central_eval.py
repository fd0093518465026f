"""Central evaluation on the held-out test set (simulation only: a real coordinator has no data)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from privatune.common.config import RunConfig
from privatune.common.evaluation import EvalResult, evaluate
from privatune.common.features import cached_features, encode
from privatune.common.federation_data import central_split
from privatune.common.models import backbone_is_frozen, configure_trainable, get_model_spec, load_trainable_state

PERSONAL_HEAD_NOTE = (
    "personal-head: the sites keep their heads, so central evaluation scores the shared body with the initial "
    "(untrained, seeded) head: a check on the body's training, not the sites' accuracy (their own validation is "
    "in `privatune personalise` and the noised federated figures)"
)


class CentralEvaluator:
    """Builds the model and the test inputs once; evaluates any trainable state against them."""

    def __init__(self, cfg: RunConfig, cache_dir: Path | None) -> None:
        self.cfg = cfg
        _, self.test = central_split(cfg)
        self.model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
        configure_trainable(self.model, cfg.fine_tuning)
        # A frozen backbone: only the head runs, on cached features; else the whole model, on encoded inputs.
        self.module: torch.nn.Module
        self.inputs: tuple[torch.Tensor, ...]
        if backbone_is_frozen(cfg.mode):
            self.module = self.model.head
            self.inputs = (cached_features(self.model, cfg.model, self.test, cfg.max_length, cache_dir),)
        else:
            self.module = self.model
            self.inputs = encode(cfg.model, self.test, cfg.max_length)
        self.labels = torch.as_tensor(self.test.labels, dtype=torch.long)

    def __call__(self, state: Mapping[str, np.ndarray]) -> EvalResult:
        load_trainable_state(self.model, state, keep_head=self.cfg.personal_head)  # personal-head: initial head
        return evaluate(self.module, self.inputs, self.labels, num_classes=len(self.cfg.label_names))
