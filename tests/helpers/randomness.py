"""A seeded site randomness that records each Poisson draw's batch size, for tests that need an empty batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from privatune.client.randomness import SeededRandomness


class RecordingRandomness:
    """SeededRandomness that remembers each Poisson draw's batch size (to find empty batches): a draw of ``n``
    uniforms is the sampler's, and its batch is the count below ``q``."""

    kind = "seeded"

    def __init__(self, seed: int, n: int, q: float) -> None:
        self.inner, self.n, self.q = SeededRandomness(seed), n, q
        self.sizes: list[int] = []

    def uniform(self, n: int) -> np.ndarray:
        u = self.inner.uniform(n)
        if n == self.n:
            self.sizes.append(int((u < self.q).sum()))
        return u

    def gaussian(self, shape: tuple[int, ...], std: float, *, device: Any, dtype: torch.dtype) -> torch.Tensor:
        return self.inner.gaussian(shape, std, device=device, dtype=dtype)
