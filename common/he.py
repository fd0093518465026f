"""CKKS homomorphic encryption for secure aggregation: keys, packing, encrypt, sum, decrypt.

Pure module (numpy + TenSEAL's SEAL bindings, no Flower): the Flower record conversion lives in
``common/he_records.py``.

Protocol
--------
* Key holders (the clients) share one CKKS secret key (``secret.ctx``); the server gets ``public.ctx``
  (parameters + public key, no secret key). Both files carry the same *fingerprint*: sha256 over the
  parameters, the SEAL encryption parameters and the public key bytes.
* A client flattens its trainable state into one float64 vector ``v`` (``flatten_state``), multiplies it
  by its aggregation weight ``w`` and appends ``w`` itself in one extra slot: ``[w*v, w]``. The server
  only adds ciphertexts, so it learns neither an update nor a weight; the decrypting client divides the
  summed vector by the summed weight slot, which gives FedAvg ``sum_k w_k v_k / sum_k w_k``.
* The server encrypts the *initial* global state with the public key (weight 1), and afterwards sends
  the encrypted sum of the last round back (a state, not a delta): a late client decrypts the same model.

Parameter choice (measured with ``simulations/bench_he_micro.py``)
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

Server flow: ``HEAccumulator(ctx, layout)``; ``add`` each parsed reply (``HEReplyError`` -> log the
reason, drop it, go on); ``result()`` is the next global state. ``check_update`` + ``sum_updates`` do
the same in two passes.

What this does not protect: a key holder who gives the server the secret key; malicious clients (they
can encrypt anything, including huge values that spoil the sum); the final model once decrypted.
The integrity digest only detects accidental corruption or malformed replies, not forgery.

Implementation note: TenSEAL's SEAL bindings (``tenseal.sealapi``) save and load SEAL objects through
file paths only, so serialisation goes through a private scratch folder (mode 0700, ``/dev/shm`` when
available; files are deleted right after use, the folder at exit).
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import math
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as seal

__all__ = [
    "EncryptedState",
    "EncryptedUpdate",
    "HEAccumulator",
    "HEContext",
    "HEError",
    "HEFormatError",
    "HEInputError",
    "HEKeyError",
    "HEParams",
    "HEParamsError",
    "HEReplyError",
    "KeyPair",
    "KeyPaths",
    "Layout",
    "check_update",
    "compact_params",
    "decrypt_checkpoint_to_safetensors",
    "decrypt_state",
    "encrypt_state",
    "encrypt_update",
    "flatten_state",
    "generate_keys",
    "load_checkpoint",
    "load_context",
    "save_checkpoint",
    "sum_updates",
    "unflatten",
    "write_keys",
]

FORMAT_VERSION = 1
_CTX_MAGIC = b"PTHECTX1"
_CKPT_MAGIC = b"PTHESTA1"
_FINGERPRINT_DOMAIN = b"privatune-he-fingerprint-v1\x00"
_DIGEST_DOMAIN = b"privatune-he-digest-v1\x00"
_FLOAT_DTYPES = ("float16", "float32", "float64")
_MAX_LAYOUT_VALUES = 2**34  # refuse absurd metadata before allocating anything
_SEC_LEVELS = {
    128: seal.SEC_LEVEL_TYPE.TC128,
    192: seal.SEC_LEVEL_TYPE.TC192,
    256: seal.SEC_LEVEL_TYPE.TC256,
}


# --------------------------------------------------------------------------------------------- errors


class HEError(Exception):
    """Base class of every error raised by this module."""


class HEKeyError(HEError):
    """Wrong key material for the job: a secret key where only a public one belongs, or the reverse,
    or a fingerprint that does not match."""


class HEInputError(HEError, ValueError):
    """A client's plaintext cannot be encrypted (non-finite values, wrong dtype, out of range)."""


class HEParamsError(HEError, ValueError):
    """Encryption parameters that SEAL refuses or that break the precision/range budget."""


class HEFormatError(HEError):
    """A context file, checkpoint or record is malformed or corrupted."""


class HEReplyError(HEFormatError):
    """A client's encrypted reply fails the server's checks; ``reason`` says why (for the log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------- params


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
        if self.security_level not in _SEC_LEVELS:
            raise HEParamsError(f"security_level must be one of {sorted(_SEC_LEVELS)}, got {self.security_level}")
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
        known = {f for f in cls.__dataclass_fields__}
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


# --------------------------------------------------------------------------------------------- SEAL I/O

_scratch_lock = threading.Lock()
_scratch_dir: str | None = None
_scratch_pid: int | None = None
_scratch_counter = itertools.count()


def _remove_scratch(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked child must not delete its parent's folder
        shutil.rmtree(path, ignore_errors=True)


def _scratch_path() -> str:
    """A fresh file name in a private folder (sealapi only reads and writes paths)."""
    global _scratch_dir, _scratch_pid
    with _scratch_lock:
        pid = os.getpid()
        if _scratch_dir is None or _scratch_pid != pid or not os.path.isdir(_scratch_dir):
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            _scratch_dir, _scratch_pid = tempfile.mkdtemp(prefix="privatune-he-", dir=base), pid
            atexit.register(_remove_scratch, _scratch_dir, pid)
        return os.path.join(_scratch_dir, f"{threading.get_ident()}-{next(_scratch_counter)}")


def _seal_save(obj: Any) -> bytes:
    path = _scratch_path()
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _seal_load(obj: Any, data: bytes, *ctx: Any) -> Any:
    """Fill ``obj`` from ``data``; SEAL validates sizes and that every coefficient is in range."""
    path = _scratch_path()
    try:
        with open(path, "wb") as f:
            f.write(data)
        obj.load(*ctx, path)
        return obj
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _seal_context(parms: Any, params: HEParams) -> Any:
    ctx = seal.SEALContext(parms, True, _SEC_LEVELS[params.security_level])
    if not ctx.parameters_set():
        raise HEParamsError(
            f"SEAL refuses N={params.poly_modulus_degree}, coeff bits {list(params.coeff_mod_bit_sizes)} "
            f"at {params.security_level}-bit security: {ctx.parameters_error_message()}"
        )
    return ctx


def _make_parms(params: HEParams) -> Any:
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    try:
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    except Exception as exc:  # SEAL: no such primes
        raise HEParamsError(f"cannot build the coefficient modulus {list(params.coeff_mod_bit_sizes)}: {exc}") from exc
    return parms


# --------------------------------------------------------------------------------------------- context


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
        self.fingerprint = _fingerprint(params, parms_bytes, public_key_bytes)
        try:
            parms = _seal_load(seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS), parms_bytes)
        except Exception as exc:
            raise HEFormatError(f"{source}: the SEAL encryption parameters do not load: {exc}") from exc
        self._ctx = _seal_context(parms, params)
        cd = self._ctx.key_context_data()
        got_n = cd.parms().poly_modulus_degree()
        got_bits = [m.bit_count() for m in cd.parms().coeff_modulus()]
        if got_n != params.poly_modulus_degree or got_bits != list(params.coeff_mod_bit_sizes):
            raise HEFormatError(
                f"{source}: stored SEAL parameters (N={got_n}, bits {got_bits}) disagree with the declared "
                f"ones (N={params.poly_modulus_degree}, bits {list(params.coeff_mod_bit_sizes)})"
            )
        try:
            self._pk = _seal_load(seal.PublicKey(), public_key_bytes, self._ctx)
        except Exception as exc:
            raise HEFormatError(f"{source}: the public key does not load: {exc}") from exc
        self._sk = None
        if secret_key_bytes is not None:
            try:
                self._sk = _seal_load(seal.SecretKey(), secret_key_bytes, self._ctx)
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
        return _pack_ctx(self.params, self._parms_bytes, self._pk_bytes, None, self.fingerprint)

    def secret_context_bytes(self) -> bytes:
        if self._sk is None:
            raise HEKeyError(f"{self.source} is a public context: it holds no secret key to export")
        return _pack_ctx(self.params, self._parms_bytes, self._pk_bytes, _seal_save(self._sk), self.fingerprint)

    def _check_key_pair(self) -> None:
        probe = np.linspace(-1.0, 1.0, 16)
        ct = self._encrypt_chunks(probe, symmetric=False)
        back = self._decrypt_chunks(ct, 16)
        if not np.allclose(back, probe, atol=1e-6):
            raise HEKeyError(f"{self.source}: the secret key does not belong to the public key in this context")

    # -- low level, used by the protocol functions below

    def _encrypt_chunks(self, vec: np.ndarray, *, symmetric: bool) -> list[bytes]:
        per = self.values_per_chunk
        n_chunks = max(1, -(-vec.size // per))
        padded = np.zeros(n_chunks * per, dtype=np.float64)
        padded[: vec.size] = vec
        z = padded.view(np.complex128)
        half = per // 2
        scale = self.params.scale
        out: list[bytes] = []
        for j in range(n_chunks):
            pt = seal.Plaintext()
            self._encoder.encode(z[j * half : (j + 1) * half], scale, pt)
            if symmetric:
                out.append(_seal_save(self._encryptor.encrypt_symmetric(pt)))
            else:
                ct = seal.Ciphertext()
                self._encryptor.encrypt(pt, ct)
                out.append(_seal_save(ct))
        return out

    def _load_chunk(self, data: bytes, index: int) -> Any:
        """Parse one ciphertext and check it is a fresh-level, 2-poly ciphertext at our scale."""
        if not isinstance(data, (bytes, bytearray)):
            raise HEReplyError(f"ciphertext {index} is {type(data).__name__}, not bytes")
        if len(data) > self.max_chunk_bytes():
            raise HEReplyError(
                f"ciphertext {index} has {len(data)} bytes, more than the {self.max_chunk_bytes()} a "
                "ciphertext of this context can have"
            )
        try:
            ct = _seal_load(seal.Ciphertext(), bytes(data), self._ctx)
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

    def _decrypt_chunks(self, chunks: Sequence[bytes], n_values: int) -> np.ndarray:
        if self._decryptor is None:
            raise HEKeyError(
                f"{self.source} is a public context without the secret key: it cannot decrypt; "
                "clients decrypt with secret.ctx"
            )
        parts = []
        for j, data in enumerate(chunks):
            try:
                ct = self._load_chunk(data, j)
            except HEReplyError as exc:
                raise HEFormatError(f"encrypted state: {exc.reason}") from exc
            pt = seal.Plaintext()
            self._decryptor.decrypt(ct, pt)
            parts.append(np.asarray(self._encoder.decode_complex(pt), dtype=np.complex128).view(np.float64))
        return np.concatenate(parts)[:n_values]


def _fingerprint(params: HEParams, parms_bytes: bytes, pk_bytes: bytes) -> str:
    h = hashlib.sha256(_FINGERPRINT_DOMAIN)
    for part in (json.dumps(params.to_dict(), sort_keys=True).encode(), parms_bytes, pk_bytes):
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.hexdigest()


def _pack_ctx(params: HEParams, parms: bytes, pk: bytes, sk: bytes | None, fingerprint: str) -> bytes:
    sections = {"parms": len(parms), "public_key": len(pk)}
    if sk is not None:
        sections["secret_key"] = len(sk)
    header = {
        "format": FORMAT_VERSION,
        "kind": "secret" if sk is not None else "public",
        "params": params.to_dict(),
        "fingerprint": fingerprint,
        "sections": sections,
    }
    hb = json.dumps(header, sort_keys=True).encode()
    return b"".join([_CTX_MAGIC, struct.pack("<I", len(hb)), hb, parms, pk, sk or b""])


def _unpack_ctx(data: bytes, source: str) -> tuple[HEParams, bytes, bytes, bytes | None, str]:
    if data[: len(_CTX_MAGIC)] != _CTX_MAGIC:
        raise HEFormatError(f"{source} is not a privatune HE context file (written by `privatune keygen`)")
    try:
        (hlen,) = struct.unpack_from("<I", data, len(_CTX_MAGIC))
        start = len(_CTX_MAGIC) + 4
        header = json.loads(data[start : start + hlen])
        sections = header["sections"]
        params = HEParams.from_dict(header["params"])
        fingerprint = str(header["fingerprint"])
        if header.get("format") != FORMAT_VERSION:
            raise HEFormatError(f"{source}: context format {header.get('format')} is not supported")
        pos = start + hlen
        out = {}
        for name in ("parms", "public_key", "secret_key"):
            if name in sections:
                size = int(sections[name])
                out[name] = data[pos : pos + size]
                if len(out[name]) != size:
                    raise HEFormatError(f"{source} is truncated (section {name})")
                pos += size
        if pos != len(data):
            raise HEFormatError(f"{source} has {len(data) - pos} unexpected trailing bytes")
    except HEError:
        raise
    except Exception as exc:
        raise HEFormatError(f"{source}: malformed context header: {exc}") from exc
    if "parms" not in out or "public_key" not in out:
        raise HEFormatError(f"{source} lacks the parameters or the public key")
    if header["kind"] not in ("secret", "public") or (header["kind"] == "secret") != ("secret_key" in out):
        raise HEFormatError(f"{source}: header kind {header['kind']!r} disagrees with its sections")
    return params, out["parms"], out["public_key"], out.get("secret_key"), fingerprint


# --------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyPair:
    """Serialised contexts: ``secret_context`` for key holders only, ``public_context`` for the server."""

    secret_context: bytes
    public_context: bytes
    fingerprint: str


@dataclass(frozen=True)
class KeyPaths:
    secret: Path
    public: Path
    fingerprint: Path


def generate_keys(params: HEParams | None = None) -> KeyPair:
    """Make a fresh CKKS key pair (no relinearisation or Galois keys: only additions are ever done)."""
    params = params or HEParams()
    parms = _make_parms(params)
    ctx = _seal_context(parms, params)
    keygen = seal.KeyGenerator(ctx)
    pk = seal.PublicKey()
    keygen.create_public_key(pk)
    parms_b, pk_b, sk_b = _seal_save(parms), _seal_save(pk), _seal_save(keygen.secret_key())
    fp = _fingerprint(params, parms_b, pk_b)
    return KeyPair(
        secret_context=_pack_ctx(params, parms_b, pk_b, sk_b, fp),
        public_context=_pack_ctx(params, parms_b, pk_b, None, fp),
        fingerprint=fp,
    )


def write_keys(out_dir: str | os.PathLike[str], params: HEParams | None = None, *, overwrite: bool = False) -> KeyPaths:
    """Write ``secret.ctx`` (mode 0600, clients only), ``public.ctx`` (server) and ``fingerprint.txt``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = KeyPaths(out / "secret.ctx", out / "public.ctx", out / "fingerprint.txt")
    existing = [str(p) for p in (paths.secret, paths.public, paths.fingerprint) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite existing key files {existing}: a new key makes old checkpoints "
            "undecryptable; pick another folder or pass overwrite=True"
        )
    kp = generate_keys(params)
    fd = os.open(paths.secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(kp.secret_context)
    os.chmod(paths.secret, 0o600)
    paths.public.write_bytes(kp.public_context)
    paths.fingerprint.write_text(kp.fingerprint + "\n")
    return paths


def load_context(source: str | os.PathLike[str] | bytes, *, require_secret: bool | None = None) -> HEContext:
    """Load a context file (or its bytes).

    ``require_secret=False`` is the server's call: a context holding a secret key is refused.
    ``require_secret=True`` is a key holder's call: a public context is refused. ``None`` takes either.
    """
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "the given context bytes"
    else:
        path = Path(source)
        name = str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise HEKeyError(f"HE context file {name} does not exist (make one with `privatune keygen`)") from None
    params, parms_b, pk_b, sk_b, fp = _unpack_ctx(data, name)
    if require_secret is False and sk_b is not None:
        raise HEKeyError(
            f"{name} holds a secret key; the server must get public.ctx (the context without the secret "
            "key). Giving the server the secret key would let it decrypt every client's update."
        )
    if require_secret is True and sk_b is None:
        raise HEKeyError(
            f"{name} is a public context without the secret key: a client needs secret.ctx to decrypt the global model"
        )
    ctx = HEContext(params, parms_b, pk_b, sk_b, source=name)
    if ctx.fingerprint != fp:
        raise HEFormatError(f"{name} is corrupted: its fingerprint does not match its contents")
    return ctx


# --------------------------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the flattened tensors, in packing order. JSON-serialisable."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def total(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
            "total": self.total,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        try:
            names = tuple(d["names"])
            shapes = tuple(tuple(int(x) for x in s) for s in d["shapes"])
            dtypes = tuple(d["dtypes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HEFormatError(f"malformed layout: {exc!r}") from exc
        if not (len(names) == len(shapes) == len(dtypes)):
            raise HEFormatError("malformed layout: names, shapes and dtypes differ in length")
        if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise HEFormatError("malformed layout: names must be distinct strings")
        if any(x < 0 for s in shapes for x in s):
            raise HEFormatError("malformed layout: negative dimension")
        if any(t not in _FLOAT_DTYPES for t in dtypes):
            raise HEFormatError(f"malformed layout: dtypes must be among {_FLOAT_DTYPES}")
        layout = cls(names, shapes, dtypes)
        if layout.total > _MAX_LAYOUT_VALUES:
            raise HEFormatError(f"malformed layout: {layout.total} values is beyond any model this runs")
        if "total" in d and int(d["total"]) != layout.total:
            raise HEFormatError(f"malformed layout: total {d['total']} != {layout.total} from the shapes")
        return layout

    @classmethod
    def from_json(cls, s: str | bytes) -> Layout:
        try:
            d = json.loads(s)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HEFormatError(f"malformed layout JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise HEFormatError("malformed layout JSON: not an object")
        return cls.from_dict(d)


def flatten_state(state: Mapping[str, Any]) -> tuple[np.ndarray, Layout]:
    """Concatenate float tensors (in mapping order) into one float64 vector and record the layout."""
    names, shapes, dtypes, parts = [], [], [], []
    for name, value in state.items():
        if not isinstance(name, str):
            raise HEInputError(f"parameter names must be strings, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype.name not in _FLOAT_DTYPES:
            raise HEInputError(
                f"parameter {name!r} has dtype {arr.dtype}; only float16/32/64 trainable parameters can be "
                "encrypted (convert bfloat16 to float32, keep integer buffers out of the trainable state)"
            )
        names.append(name)
        shapes.append(tuple(int(x) for x in arr.shape))
        dtypes.append(arr.dtype.name)
        parts.append(arr.astype(np.float64, copy=False).ravel())
    vec = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return vec, Layout(tuple(names), tuple(shapes), tuple(dtypes))


def unflatten(vec: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Inverse of ``flatten_state``: tensors with their original shapes and dtypes."""
    vec = np.asarray(vec)
    if vec.ndim != 1 or vec.size != layout.total:
        raise HEInputError(f"vector of shape {vec.shape} does not fit a layout of {layout.total} values")
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes):
        size = math.prod(shape)
        out[name] = vec[pos : pos + size].reshape(shape).astype(dtype)
        pos += size
    return out


# --------------------------------------------------------------------------------------------- payloads


def _digest(fingerprint: str, layout: Layout, chunks: Sequence[bytes], num_summands: int) -> str:
    h = hashlib.sha256(_DIGEST_DOMAIN)
    h.update(fingerprint.encode())
    h.update(layout.to_json().encode())
    h.update(struct.pack("<QQ", num_summands, len(chunks)))
    for c in chunks:
        h.update(struct.pack("<Q", len(c)))
        h.update(c)
    return h.hexdigest()


@dataclass
class EncryptedUpdate:
    """One client's reply: ciphertexts of ``[w*v, w]`` packed ``values_per_chunk`` per chunk."""

    fingerprint: str
    layout: Layout
    chunks: list[bytes]
    digest: str = ""
    num_summands: int = field(default=1)

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = _digest(self.fingerprint, self.layout, self.chunks, self.num_summands)

    @property
    def num_bytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    def recompute_digest(self) -> str:
        return _digest(self.fingerprint, self.layout, self.chunks, self.num_summands)


@dataclass
@dataclass
class EncryptedState(EncryptedUpdate):
    """The encrypted global state: the sum of ``num_summands`` weighted updates (1 for the initial one)."""


def _check_finite_and_range(state: Mapping[str, Any], weight: float, params: HEParams) -> None:
    if not (isinstance(weight, (int, float, np.floating, np.integer)) and math.isfinite(float(weight))):
        raise HEInputError(f"the aggregation weight must be a finite number, got {weight!r}")
    w = float(weight)
    if w <= 0:
        raise HEInputError(f"the aggregation weight must be positive, got {w}")
    limit = params.max_client_value
    if w > limit:
        raise HEInputError(f"the aggregation weight {w:g} exceeds {limit:g}, the range of these HE parameters")
    for name, value in state.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise HEInputError(
                f"parameter {name!r} has {bad} non-finite value(s) (NaN/inf); refusing to encrypt this update "
                "(training diverged? lower the learning rate)"
            )
        if arr.size and arr.dtype.kind == "f":
            peak = float(np.max(np.abs(arr))) * w
            if peak > limit:
                raise HEInputError(
                    f"parameter {name!r} times the weight reaches {peak:.3g}, above {limit:.3g}, the largest value "
                    f"the HE parameters (scale 2^{params.global_scale_bits}, {params.data_bits}-bit modulus, "
                    f"{params.max_summands} summands) can sum without overflow; use a smaller weight unit"
                )


def _encrypt(ctx: HEContext, state: Mapping[str, Any], weight: float, *, symmetric: bool) -> EncryptedUpdate:
    _check_finite_and_range(state, weight, ctx.params)
    vec, layout = flatten_state(state)
    payload = np.empty(vec.size + 1, dtype=np.float64)
    np.multiply(vec, float(weight), out=payload[:-1])
    payload[-1] = float(weight)
    chunks = ctx._encrypt_chunks(payload, symmetric=symmetric)
    return EncryptedUpdate(ctx.fingerprint, layout, chunks)


def encrypt_update(ctx: HEContext, state: Mapping[str, Any], weight: float) -> EncryptedUpdate:
    """Client side: encrypt ``[weight * state, weight]``.

    With the secret key (the normal case) this uses seeded symmetric encryption (half the bytes, less
    noise); a public-only context falls back to public-key encryption.
    """
    return _encrypt(ctx, state, weight, symmetric=ctx.has_secret_key)


def encrypt_state(ctx: HEContext, state: Mapping[str, Any]) -> EncryptedState:
    """Server side: encrypt the initial global state with the public key (weight 1)."""
    upd = _encrypt(ctx, state, 1.0, symmetric=False)
    return EncryptedState(upd.fingerprint, upd.layout, upd.chunks, num_summands=1)


# --------------------------------------------------------------------------------------------- server


def check_update(ctx: HEContext, update: EncryptedUpdate, expected: Layout | int) -> None:
    """Server side: raise ``HEReplyError(reason)`` unless ``update`` is well-formed for this run.

    ``expected`` is the global state's Layout (names and shapes must match) or its number of values.
    Checks, cheapest first: fingerprint, layout, number of chunks, integrity digest, then that every
    chunk decodes as a fresh 2-polynomial ciphertext of this context at the agreed scale.
    (``HEAccumulator.add`` runs the same checks and adds in one pass.)
    """
    _checked_ciphertexts(ctx, update, expected)


def _checked_ciphertexts(ctx: HEContext, update: EncryptedUpdate, expected: Layout | int) -> list[Any]:
    """The checks of ``check_update``; returns the parsed ciphertexts."""
    if not isinstance(update, EncryptedUpdate):
        raise HEReplyError(f"expected an EncryptedUpdate, got {type(update).__name__}")
    if update.fingerprint != ctx.fingerprint:
        raise HEReplyError(
            f"fingerprint mismatch: reply encrypted for key {update.fingerprint[:16]}..., the server holds "
            f"{ctx.fingerprint[:16]}... (client has another secret.ctx)"
        )
    if update.num_summands != 1:
        raise HEReplyError(f"a client reply must hold one update, this one claims {update.num_summands}")
    if isinstance(expected, Layout):
        if update.layout != expected:
            raise HEReplyError(f"layout mismatch: {_layout_diff(expected, update.layout)}")
        n_values = expected.total
    else:
        n_values = int(expected)
        if update.layout.total != n_values:
            raise HEReplyError(f"layout mismatch: reply has {update.layout.total} values, expected {n_values}")
    want = ctx.num_chunks(n_values)
    if len(update.chunks) != want:
        raise HEReplyError(
            f"wrong number of ciphertexts: expected {want} for {n_values} values + weight, got {len(update.chunks)}"
        )
    if update.recompute_digest() != update.digest:
        raise HEReplyError("integrity digest mismatch: ciphertext bytes or metadata were altered in transit")
    return [ctx._load_chunk(data, j) for j, data in enumerate(update.chunks)]


def _layout_diff(a: Layout, b: Layout) -> str:
    if a.names != b.names:
        missing = [n for n in a.names if n not in b.names]
        extra = [n for n in b.names if n not in a.names]
        if missing or extra:
            return f"missing parameters {missing[:5]}, unexpected {extra[:5]}"
        return "parameters in a different order"
    for n, sa, sb, da, db in zip(a.names, a.shapes, b.shapes, a.dtypes, b.dtypes):
        if sa != sb:
            return f"parameter {n!r} has shape {list(sb)}, expected {list(sa)}"
        if da != db:
            return f"parameter {n!r} has dtype {db}, expected {da}"
    return "layouts differ"


class HEAccumulator:
    """Server side, streaming: check and add one reply at a time (each ciphertext parsed once).

    ``add`` raises ``HEReplyError`` for a bad reply and leaves the running sum untouched, so the server
    logs the reason, drops that reply and goes on; memory is one update plus the running sum.
    """

    def __init__(self, ctx: HEContext, expected: Layout | int) -> None:
        self.ctx = ctx
        self.expected = expected
        self.num_summands = 0
        self._layout: Layout | None = expected if isinstance(expected, Layout) else None
        self._acc: list[Any] | None = None

    def add(self, update: EncryptedUpdate) -> None:
        cts = _checked_ciphertexts(self.ctx, update, self.expected)
        if self._layout is None:
            self._layout = update.layout
        elif update.layout != self._layout:
            raise HEReplyError(f"layout mismatch with earlier replies: {_layout_diff(self._layout, update.layout)}")
        if self.num_summands + 1 > self.ctx.params.max_summands:
            raise HEReplyError(f"more than max_summands={self.ctx.params.max_summands} replies: the sum could overflow")
        if self._acc is None:
            self._acc = cts
        else:
            for acc, ct in zip(self._acc, cts):
                self.ctx._evaluator.add_inplace(acc, ct)
        self.num_summands += 1

    def result(self) -> EncryptedState:
        """The encrypted sum of every reply added so far."""
        if self._acc is None or self._layout is None:
            raise HEReplyError("no valid updates to sum")
        chunks = [_seal_save(ct) for ct in self._acc]
        return EncryptedState(self.ctx.fingerprint, self._layout, chunks, num_summands=self.num_summands)


def sum_updates(ctx: HEContext, updates: Iterable[EncryptedUpdate]) -> EncryptedState:
    """Server side: add the ciphertexts of the updates; never decrypts (works with public.ctx).

    Every update is checked as in ``check_update`` against the first one's layout; the first bad one
    raises ``HEReplyError`` naming its index. To drop bad replies and go on, use ``HEAccumulator``.
    """
    ups = list(updates)
    if not ups:
        raise HEReplyError("no updates to sum")
    if not isinstance(ups[0], EncryptedUpdate):
        raise HEReplyError(f"update 0: expected an EncryptedUpdate, got {type(ups[0]).__name__}")
    acc = HEAccumulator(ctx, ups[0].layout)
    for i, u in enumerate(ups):
        try:
            acc.add(u)
        except HEReplyError as exc:
            raise HEReplyError(f"update {i}: {exc.reason}") from exc
    return acc.result()


# --------------------------------------------------------------------------------------------- key holders


def decrypt_state(ctx: HEContext, state: EncryptedUpdate) -> dict[str, np.ndarray]:
    """Key holder: decrypt a summed state and divide by the summed weight (FedAvg)."""
    if not ctx.has_secret_key:
        raise HEKeyError(
            f"{ctx.source} is a public context without the secret key: it cannot decrypt; "
            "clients decrypt with secret.ctx"
        )
    if state.fingerprint != ctx.fingerprint:
        raise HEKeyError(
            f"the encrypted state belongs to key {state.fingerprint[:16]}..., but {ctx.source} has "
            f"{ctx.fingerprint[:16]}...: this run uses another key; refusing to decrypt"
        )
    if state.recompute_digest() != state.digest:
        raise HEFormatError("encrypted state: integrity digest mismatch (corrupted in transit or on disk)")
    n = state.layout.total
    if len(state.chunks) != ctx.num_chunks(n):
        raise HEFormatError(
            f"encrypted state: {len(state.chunks)} ciphertexts, expected {ctx.num_chunks(n)} for {n} values"
        )
    sums = ctx._decrypt_chunks(state.chunks, n + 1)
    grid = 2.0 ** (ctx.params.round_bits - ctx.params.global_scale_bits)
    sums = np.round(sums / grid) * grid  # hide the CKKS noise (see module docstring)
    weight = float(sums[n])
    max_weight = ctx.params.max_client_value * max(1, state.num_summands)
    if not (math.isfinite(weight) and 0 < weight <= max_weight):
        raise HEFormatError(
            f"decryption gave an invalid weight slot ({weight:.3g}): the state was not made by this key's "
            "clients or is corrupted"
        )
    return unflatten(sums[:n] / weight, state.layout)


# --------------------------------------------------------------------------------------------- checkpoint


def _state_header(state: EncryptedUpdate) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "fingerprint": state.fingerprint,
        "layout": state.layout.to_dict(),
        "num_summands": state.num_summands,
        "digest": state.digest,
        "chunk_sizes": [len(c) for c in state.chunks],
    }


def save_checkpoint(path: str | os.PathLike[str], state: EncryptedUpdate) -> Path:
    """Write the encrypted global state as one file (atomic rename); the server's run checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hb = json.dumps(_state_header(state), sort_keys=True).encode()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_CKPT_MAGIC)
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for c in state.chunks:
            f.write(c)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> EncryptedState:
    """Read a checkpoint written by ``save_checkpoint``; checks its size and integrity digest."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise HEFormatError(f"checkpoint {path} does not exist") from None
    if data[: len(_CKPT_MAGIC)] != _CKPT_MAGIC:
        raise HEFormatError(f"{path} is not an encrypted privatune checkpoint")
    try:
        (hlen,) = struct.unpack_from("<Q", data, len(_CKPT_MAGIC))
        start = len(_CKPT_MAGIC) + 8
        header = json.loads(data[start : start + hlen])
        if header.get("format") != FORMAT_VERSION:
            raise HEFormatError(f"{path}: checkpoint format {header.get('format')} is not supported")
        sizes = [int(s) for s in header["chunk_sizes"]]
        layout = Layout.from_dict(header["layout"])
        fingerprint, digest, summands = str(header["fingerprint"]), str(header["digest"]), int(header["num_summands"])
    except HEError:
        raise
    except Exception as exc:
        raise HEFormatError(f"{path}: malformed checkpoint header: {exc}") from exc
    pos = start + hlen
    if pos + sum(sizes) != len(data):
        raise HEFormatError(
            f"{path} is truncated or has trailing bytes ({len(data)} bytes, expected {pos + sum(sizes)})"
        )
    chunks = []
    for s in sizes:
        chunks.append(data[pos : pos + s])
        pos += s
    state = EncryptedState(fingerprint, layout, chunks, digest=digest, num_summands=summands)
    if state.recompute_digest() != digest:
        raise HEFormatError(f"{path} is corrupted: integrity digest mismatch")
    return state


def decrypt_checkpoint_to_safetensors(
    secret_ctx_path: str | os.PathLike[str],
    checkpoint_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
) -> Path:
    """``privatune decrypt``: write the plaintext trainable weights of an encrypted checkpoint."""
    from safetensors.numpy import save_file

    ctx = load_context(secret_ctx_path, require_secret=True)
    state = load_checkpoint(checkpoint_path)
    tensors = {k: np.ascontiguousarray(v) for k, v in decrypt_state(ctx, state).items()}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(out),
        metadata={"he_fingerprint": state.fingerprint, "num_summands": str(state.num_summands)},
    )
    return out
