"""CKKS parameters and the protocol's range policy: ``HEParams`` (validated), the presets, the bit budget.

Separate because every other module reads the parameters but none of them needs to know why they are what
they are; that reasoning lives here, next to the defaults.

Parameter choice (measured with ``simulations/benchmarks/he_micro.py``)
-----------------------------------------------------------------
Only additions happen, so no multiplicative depth, relinearisation or rotation keys are needed. The
ciphertext size per packed value is fixed by the number ``L`` of *data* primes (all coefficient moduli but
the last, SEAL's key-switching prime) and not by the ring degree: ``2 polys * L primes * 8 bytes`` per
ring coefficient. Three tricks shrink it:

1. **Two reals per CKKS slot.** CKKS has ``N/2`` complex slots; the float vector is viewed as complex
   (``x[2k] + i*x[2k+1]``), so one ciphertext carries ``N`` values, half the size of real-only packing.
2. **Seeded symmetric encryption by the key holders.** SEAL's ``encrypt_symmetric`` lets the random
   polynomial ``c1`` be replaced by the 64-byte PRNG seed that made it, which halves a client's upload.
   Its noise is also ~10x smaller than public-key encryption (no ``u*e + e1*s`` terms). The server's
   sums (and its public-key encryption of the initial state) are full ciphertexts.
3. **No wasted levels.** The default chain ``[60, 60, 60]`` gives two 60-bit data primes (120 bits) and
   one special prime; total 180 bits <= 218, the HomomorphicEncryption.org 128-bit bound for N=8192
   (SEAL enforces that table: ``security_level`` 128/192/256).

Default (``HEParams()``): N=8192, coeff bits (60, 60, 60), scale 2^60. Bytes per value: 16 uploaded
(4x float32), 32 for the summed state sent back (8x float32); TenSEAL's CKKSVector with NVIDIA FLARE's
defaults needs ~58 (14.4x) both ways. SEAL's zstd compression gains nothing: ciphertext residues are
uniform. N=16384 gives the same bytes and no speed gain. One data prime (``compact_params()``) halves the
bytes, but its 59-bit budget cannot hold both the noise floor and arbitrary weight units (see there).

Precision and range (default)
-----------------------------
* Fresh symmetric noise is ~2^8 scale units per slot (~2^-52 absolute); the K-client sum grows with
  sqrt(K). Decryption rounds the weighted *sum* to a grid of ``2^(round_bits - scale_bits)`` = 2^-40
  (``round_bits`` = 20) before dividing by the weight: this hides the CKKS noise, which otherwise leaks
  the secret key to anyone holding both a ciphertext and its exact decryption (Li & Micciancio 2021,
  key recovery from CKKS decryption results). The rounding error (< 5e-13 on the sum) is far inside the
  1e-6 relative-error target whenever ``sum(w) * rms(v) >= 1e-6``.
* Overflow: ``|sum_k w_k v_k|`` must stay below 2^(data_bits - 1 - scale_bits) = 2^59. Each client is
  held to ``max|w*v| <= 2^59 / (2 * max_summands)`` (~2.8e14 for ``max_summands`` = 1024) and the server
  refuses to add more than ``max_summands`` updates, so the sum cannot wrap around.
* Measured (K=5): relative error ~2e-15 for weights 75..500 and magnitudes 1e-4..1; ~7e-9 in the
  corner of weights that are fractions summing to 1 and values ~1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import tenseal.sealapi as seal

from privatune.common.he.errors import HEParamsError

__all__ = ["SEC_LEVELS", "HEParams", "compact_params"]

# The security levels SEAL enforces (its HomomorphicEncryption.org table), by bits.
SEC_LEVELS = {
    128: seal.SEC_LEVEL_TYPE.TC128,
    192: seal.SEC_LEVEL_TYPE.TC192,
    256: seal.SEC_LEVEL_TYPE.TC256,
}


@dataclass(frozen=True)
class HEParams:
    """CKKS parameters plus the protocol's range policy (see the module docstring for the why)."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60, 60)
    global_scale_bits: int = 60
    round_bits: int = 20
    max_summands: int = 1024
    security_level: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        n = self.poly_modulus_degree
        if not isinstance(n, int) or n < 1024 or n > 32768 or n & (n - 1):
            raise HEParamsError(f"poly_modulus_degree must be a power of two in [1024, 32768], got {n!r}")
        bits = self.coeff_mod_bit_sizes
        if not bits or any(b < 20 or b > 60 for b in bits):
            raise HEParamsError(f"coeff_mod_bit_sizes must be 1+ primes of 20..60 bits, got {list(bits)}")
        if self.security_level not in SEC_LEVELS:
            raise HEParamsError(f"security_level must be one of {sorted(SEC_LEVELS)}, got {self.security_level}")
        if not 1 <= self.max_summands <= 2**20:
            raise HEParamsError(f"max_summands must be in [1, 2^20], got {self.max_summands}")
        if not 0 <= self.round_bits < self.global_scale_bits:
            raise HEParamsError(
                f"round_bits ({self.round_bits}) must be in [0, global_scale_bits={self.global_scale_bits})"
            )
        if self.headroom_bits < 4:
            raise HEParamsError(
                f"scale 2^{self.global_scale_bits} leaves {self.headroom_bits} bits of headroom in the "
                f"{self.data_bits}-bit data modulus for {self.max_summands} summands; lower the scale, "
                "add a data prime or lower max_summands"
            )

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a ciphertext lives in (SEAL keeps the last prime for key switching)."""
        bits = self.coeff_mod_bit_sizes
        return sum(bits[:-1]) if len(bits) > 1 else bits[0]

    @property
    def num_data_primes(self) -> int:
        return max(1, len(self.coeff_mod_bit_sizes) - 1)

    @property
    def headroom_bits(self) -> int:
        """log2 of the per-client bound on max|w*v| (sum of ``max_summands`` such stays below q/2)."""
        return self.data_bits - 1 - self.global_scale_bits - 1 - math.ceil(math.log2(self.max_summands))

    @property
    def max_client_value(self) -> float:
        """Largest |w * v| (and weight) one client may encrypt."""
        return float(2.0**self.headroom_bits)

    @property
    def scale(self) -> float:
        return float(2.0**self.global_scale_bits)

    @property
    def values_per_chunk(self) -> int:
        """Real values per ciphertext: N/2 complex slots, two reals each."""
        return self.poly_modulus_degree

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HEParams:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise HEParamsError(f"unknown HE parameter(s): {sorted(unknown)}")
        return cls(**dict(d))


def compact_params() -> HEParams:
    """One 60-bit data prime: half the bytes of the default (8 B/value up, 16 down), opt-in only.

    Scale 2^40, noise ~2^-32: the relative error is ~1e-9 / (sum(w) * rms(v)), so it meets 1e-6 only when
    ``sum(w) * rms(v) >= 1e-3``; overflow bounds each client to ``max|w*v| <= 4096`` (64 summands).
    Fits weights that are small example counts; fails for fractions with 1e-4-sized values.
    """
    return HEParams(
        poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40), global_scale_bits=40, round_bits=8, max_summands=64
    )
