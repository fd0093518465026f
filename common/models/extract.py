"""The frozen-backbone feature pass (``compute_features``) that ``head`` mode trains on. Separate because it is
inference, batched and length-sorted, not model definition.
"""

from __future__ import annotations

from typing import cast

import torch

from privatune.common.models.classifier import Classifier, unwrap


@torch.no_grad()
def compute_features(model: Classifier, encoded: tuple[torch.Tensor, ...], batch_size: int = 128) -> torch.Tensor:
    """Backbone features ``[N, D]`` (float32, CPU) in eval mode, batch by batch; restores the mode after."""
    model = cast(Classifier, unwrap(model))  # a wrapped Classifier: its inner module
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not encoded:
        raise ValueError("encoded is empty: pass the tuple returned by the model's encode()")
    n = int(encoded[0].shape[0])
    if any(int(t.shape[0]) != n for t in encoded):
        raise ValueError(f"encoded tensors disagree on the number of records: {[int(t.shape[0]) for t in encoded]}")
    backbone = model.backbone
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    # Text: (input_ids, attention_mask) padded to a fixed length. Sorting by length and trimming each
    # batch to its longest record skips the padding (most SMS/TREC records are far shorter than the
    # padded length); masked mean pooling makes the result the same up to float rounding.
    lengths = None
    if len(encoded) == 2 and encoded[1].dim() == 2 and encoded[1].shape == encoded[0].shape:
        lengths = encoded[1].sum(dim=1)
    order = torch.argsort(lengths, stable=True) if lengths is not None else torch.arange(n)
    out = torch.empty((n, model.feature_dim), dtype=torch.float32)
    try:
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            batch = [t[idx] for t in encoded]
            if lengths is not None:
                keep = max(int(lengths[idx].max()), 1)
                batch = [t[:, :keep] for t in batch]
            out[idx] = backbone(*(t.to(device) for t in batch)).float().cpu()
    finally:
        backbone.train(was_training)
    return out
