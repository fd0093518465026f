"""``HEContext``: a loaded CKKS context (parameters, public key, optionally the secret key) and the
per-ciphertext operations on it: encrypt chunks, parse and check one, decrypt chunks, add one to another.

Separate from the protocol (``aggregation.py``) because this is the only place that touches SEAL's
encoder, encryptor, evaluator and decryptor; the protocol works in whole payloads on top of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from privatune.common.he.context_file import key_fingerprint, pack_context
from privatune.common.he.errors import HEFormatError, HEKeyError, HEReplyError
from privatune.common.he.packing import from_slots, to_slots
from privatune.common.he.params import HEParams
from privatune.common.he.seal_io import seal_context, seal_load, seal_save

__all__ = ["HEContext"]


class HEContext:
    """A loaded CKKS context: parameters, public key, optionally the secret key.

    Not picklable on purpose (SEAL objects); load it from ``secret.ctx`` / ``public.ctx`` where needed.
    """

    def __init__(
        self,
        params: HEParams,
        parms_bytes: bytes,
        public_key_bytes: bytes,
        secret_key_bytes: bytes | None,
        *,
        source: str = "<bytes>",
    ) -> None:
        self.params = params
        self.source = source
        self._parms_bytes = parms_bytes
        self._pk_bytes = public_key_bytes
        self.fingerprint = key_fingerprint(params, parms_bytes, public_key_bytes)
        try:
            parms = seal_load(seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS), parms_bytes)
        except Exception as exc:
            raise HEFormatError(f"{source}: the SEAL encryption parameters do not load: {exc}") from exc
        self._ctx = seal_context(parms, params)
        cd = self._ctx.key_context_data()
        got_n = cd.parms().poly_modulus_degree()
        got_bits = [m.bit_count() for m in cd.parms().coeff_modulus()]
        if got_n != params.poly_modulus_degree or got_bits != list(params.coeff_mod_bit_sizes):
            raise HEFormatError(
                f"{source}: stored SEAL parameters (N={got_n}, bits {got_bits}) disagree with the declared "
                f"ones (N={params.poly_modulus_degree}, bits {list(params.coeff_mod_bit_sizes)})"
            )
        try:
            self._pk = seal_load(seal.PublicKey(), public_key_bytes, self._ctx)
        except Exception as exc:
            raise HEFormatError(f"{source}: the public key does not load: {exc}") from exc
        self._sk = None
        if secret_key_bytes is not None:
            try:
                self._sk = seal_load(seal.SecretKey(), secret_key_bytes, self._ctx)
            except Exception as exc:
                raise HEFormatError(f"{source}: the secret key does not load: {exc}") from exc
        self._encoder = seal.CKKSEncoder(self._ctx)
        self._evaluator = seal.Evaluator(self._ctx)
        if self._sk is not None:
            self._encryptor = seal.Encryptor(self._ctx, self._pk, self._sk)
            self._decryptor = seal.Decryptor(self._ctx, self._sk)
        else:
            self._encryptor = seal.Encryptor(self._ctx, self._pk)
            self._decryptor = None
        self._first_parms_id = list(self._ctx.first_parms_id())
        if self._sk is not None:
            self._check_key_pair()

    @property
    def has_secret_key(self) -> bool:
        return self._sk is not None

    @property
    def values_per_chunk(self) -> int:
        return self.params.values_per_chunk

    def num_chunks(self, num_params: int) -> int:
        """Ciphertexts for ``num_params`` parameter values plus the weight slot."""
        return -(-(int(num_params) + 1) // self.values_per_chunk)

    def max_chunk_bytes(self) -> int:
        """Upper bound on one serialised ciphertext (full, not seeded), with room for headers."""
        raw = 2 * self.params.num_data_primes * self.params.poly_modulus_degree * 8
        return raw + raw // 64 + 4096

    def public_context_bytes(self) -> bytes:
        return pack_context(self.params, self._parms_bytes, self._pk_bytes, None, self.fingerprint)

    def secret_context_bytes(self) -> bytes:
        if self._sk is None:
            raise HEKeyError(f"{self.source} is a public context: it holds no secret key to export")
        return pack_context(self.params, self._parms_bytes, self._pk_bytes, seal_save(self._sk), self.fingerprint)

    def require_secret_key(self) -> None:
        """Raise ``HEKeyError`` unless this context can decrypt (a key holder's, not the server's)."""
        if self._decryptor is None:
            raise HEKeyError(
                f"{self.source} is a public context without the secret key: it cannot decrypt; "
                "clients decrypt with secret.ctx"
            )

    def _check_key_pair(self) -> None:
        probe = np.linspace(-1.0, 1.0, 16)
        ct = self.encrypt_chunks(probe, symmetric=False)
        back = self.decrypt_chunks(ct, 16)
        if not np.allclose(back, probe, atol=1e-6):
            raise HEKeyError(f"{self.source}: the secret key does not belong to the public key in this context")

    # -- per ciphertext, used by the protocol (aggregation.py)

    def encrypt_chunks(self, vec: np.ndarray, *, symmetric: bool) -> list[bytes]:
        """``vec`` as serialised ciphertexts of ``values_per_chunk`` values each (seeded symmetric ones when
        ``symmetric``, which needs the secret key)."""
        scale = self.params.scale
        out: list[bytes] = []
        for slots in to_slots(vec, self.values_per_chunk):
            pt = seal.Plaintext()
            self._encoder.encode(slots, scale, pt)
            if symmetric:
                out.append(seal_save(self._encryptor.encrypt_symmetric(pt)))
            else:
                ct = seal.Ciphertext()
                self._encryptor.encrypt(pt, ct)
                out.append(seal_save(ct))
        return out

    def load_chunk(self, data: bytes, index: int) -> Any:
        """Parse one ciphertext and check it is a fresh-level, 2-poly ciphertext at our scale."""
        if not isinstance(data, (bytes, bytearray)):
            raise HEReplyError(f"ciphertext {index} is {type(data).__name__}, not bytes")
        if len(data) > self.max_chunk_bytes():
            raise HEReplyError(
                f"ciphertext {index} has {len(data)} bytes, more than the {self.max_chunk_bytes()} a "
                "ciphertext of this context can have"
            )
        try:
            ct = seal_load(seal.Ciphertext(), bytes(data), self._ctx)
        except Exception as exc:
            raise HEReplyError(
                f"ciphertext {index} ({len(data)} bytes) does not decode as a ciphertext of this context "
                f"(truncated or corrupted?): {exc}"
            ) from exc
        problems = []
        if ct.size() != 2:
            problems.append(f"{ct.size()} polynomials instead of 2")
        if list(ct.parms_id()) != self._first_parms_id:
            problems.append("wrong modulus level")
        if ct.scale != self.params.scale:
            problems.append(f"scale {ct.scale!r} instead of 2^{self.params.global_scale_bits}")
        if not ct.is_ntt_form():
            problems.append("not in NTT form")
        if problems:
            raise HEReplyError(f"ciphertext {index} is not a fresh ciphertext of this context: {', '.join(problems)}")
        return ct

    def add_inplace(self, acc: Any, ct: Any) -> None:
        """``acc += ct`` on two parsed ciphertexts (the only operation the server ever does)."""
        self._evaluator.add_inplace(acc, ct)

    def decrypt_chunks(self, chunks: Sequence[bytes], n_values: int) -> np.ndarray:
        """The first ``n_values`` reals of the decrypted chunks; ``HEFormatError`` for a bad chunk."""
        self.require_secret_key()
        parts = []
        for j, data in enumerate(chunks):
            try:
                ct = self.load_chunk(data, j)
            except HEReplyError as exc:
                raise HEFormatError(f"encrypted state: {exc.reason}") from exc
            pt = seal.Plaintext()
            self._decryptor.decrypt(ct, pt)
            parts.append(np.asarray(self._encoder.decode_complex(pt), dtype=np.complex128))
        return from_slots(parts, n_values)
