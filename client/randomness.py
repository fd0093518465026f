"""Where a site's randomness comes from: DP noise and Poisson sampling.

The DP guarantee holds against the coordinator only if the coordinator cannot predict the noise. A
:class:`SiteRandomness` is created at the site from the operating system's CSPRNG (``os.urandom``), is
never derived from anything in a message, and is never sent or logged. Its Gaussian noise comes from a
ChaCha20 keystream (``cryptography``, i.e. OpenSSL) turned into normals by the Box-Muller transform in
float64, so the noise is as unpredictable as the key; the Poisson sampling mask comes from the same stream.

:class:`SeededRandomness` exists for reproducible *simulations* only: the run config must ask for it
(``reproducible-noise=true``), it is recorded as ``noise-source=seeded`` in the summary, the run record
and every ledger entry, and a real site refuses it unless its node config allows it.

Both plug into Opacus through :func:`install_noise` (replaces the optimizer's ``add_noise`` with one that
draws from this source; the arithmetic is Opacus 1.6's own) and :class:`PoissonBatchSampler` (exactly
``steps`` batches per epoch, each record drawn independently with probability ``sample_rate``).
"""

from __future__ import annotations

import hashlib
import math
import os
import types
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from privatune.common.protocol import NOISE_SOURCE_SEEDED, NOISE_SOURCE_SITE, NOISE_SOURCES  # noqa: F401  (re-exported)

_TWO53 = float(2**53)


class Randomness(Protocol):
    """A source of DP randomness: Gaussian noise and uniform draws for Poisson sampling."""

    kind: str

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 draws, uniform in (0, 1)."""
        ...

    def gaussian(
        self, shape: tuple[int, ...], std: float, *, device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor:
        """Noise of the given shape with mean 0 and standard deviation ``std``."""
        ...


def _box_muller(u1: np.ndarray, u2: np.ndarray, count: int) -> np.ndarray:
    radius = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * math.pi * u2
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)])[:count]


class SiteRandomness:
    """Randomness only this site can know: a ChaCha20 keystream keyed from ``os.urandom`` at creation."""

    kind = NOISE_SOURCE_SITE

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key, nonce = os.urandom(32), os.urandom(16)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def _uint64(self, n: int) -> np.ndarray:
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        # 53 random bits per draw, shifted by half a unit: strictly inside (0, 1), so log() is finite.
        return ((self._uint64(n) >> np.uint64(11)).astype(np.float64) + 0.5) / _TWO53

    def gaussian(
        self, shape: tuple[int, ...], std: float, *, device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor:
        count = int(np.prod(shape)) if shape else 1
        half = (count + 1) // 2
        u = self.uniform(2 * half)
        z = _box_muller(u[:half], u[half:], count) * float(std)
        return torch.from_numpy(z.reshape(shape)).to(device=device, dtype=dtype)


class SeededRandomness:
    """Reproducible randomness for simulations: numpy's PCG64 from a seed. Anyone with the seed can
    regenerate the noise, so it gives no privacy against whoever chose the seed."""

    kind = NOISE_SOURCE_SEEDED

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def uniform(self, n: int) -> np.ndarray:
        u = self._rng.random(n)
        return np.where(u == 0.0, 0.5 / _TWO53, u)

    def gaussian(
        self, shape: tuple[int, ...], std: float, *, device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor:
        z = self._rng.standard_normal(shape) * float(std)
        return torch.from_numpy(np.asarray(z, dtype=np.float64)).to(device=device, dtype=dtype)


def reproducible_seed(run_seed: int, server_round: int, site_id: str) -> int:
    """The seed of a simulated site's noise in one round (``reproducible-noise=true`` only): a hash of the run
    config's ``seed``, the round and the site, so sites and rounds differ but a rerun repeats them exactly."""
    text = f"privatune.reproducible-noise|{int(run_seed)}|{int(server_round)}|{site_id}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def install_noise(optimizer: Any, randomness: Randomness) -> None:
    """Make an Opacus ``DPOptimizer`` (plain or fast-gradient-clipping) draw its noise from ``randomness``.

    Replaces ``add_noise`` on this optimizer instance only, with Opacus 1.6's arithmetic (std =
    noise multiplier x clip norm, added to the summed clipped gradient); everything else, clipping,
    accumulation and scaling, stays Opacus' own.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    # ``optimizer`` is an Opacus DPOptimizer (untyped: Opacus ships no type information).
    def add_noise(self: Any) -> None:
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = float(multiplier) * float(self.max_grad_norm)
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            ref = p.summed_grad
            noise = (
                torch.zeros_like(ref)
                if std == 0
                else randomness.gaussian(tuple(ref.shape), std, device=ref.device, dtype=ref.dtype)
            )
            p.grad = (ref + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = types.MethodType(add_noise, optimizer)


class PoissonBatchSampler:
    """Exactly ``steps`` batches; each record is in a batch independently with probability ``sample_rate``.

    This is the sampled-Gaussian mechanism's sampling, with the step count fixed by the caller (Opacus'
    own sampler runs ``int(1 / sample_rate)`` steps, which is one short of ``ceil(n / B)`` for some n).
    Batches may be empty; they are still steps of the mechanism.
    """

    def __init__(self, num_records: int, sample_rate: float, steps: int, randomness: Randomness) -> None:
        if num_records < 1 or not 0 < sample_rate <= 1 or steps < 0:
            raise ValueError(f"bad Poisson sampler: n={num_records}, q={sample_rate}, steps={steps}")
        self.num_records = num_records
        self.sample_rate = sample_rate
        self.steps = steps
        self.randomness = randomness

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.randomness.uniform(self.num_records) < self.sample_rate
            yield np.flatnonzero(mask).tolist()
