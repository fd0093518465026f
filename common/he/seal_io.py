"""TenSEAL's SEAL bindings at the byte level: save and load SEAL objects, build a checked SEAL context.

Separate because ``tenseal.sealapi`` saves and loads SEAL objects through file paths only, so serialisation
goes through a private scratch folder (mode 0700, ``/dev/shm`` when available; files are deleted right after
use, the folder at exit); no other module needs to know that.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import threading
from typing import Any

import tenseal.sealapi as seal

from privatune.common.he.errors import HEParamsError
from privatune.common.he.params import SEC_LEVELS, HEParams

__all__ = ["make_parms", "seal_context", "seal_load", "seal_save"]

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


def seal_save(obj: Any) -> bytes:
    """The serialised bytes of a SEAL object."""
    path = _scratch_path()
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)


def seal_load(obj: Any, data: bytes, *ctx: Any) -> Any:
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


def seal_context(parms: Any, params: HEParams) -> Any:
    """A SEAL context for ``parms`` at the security level of ``params``; ``HEParamsError`` if SEAL refuses."""
    ctx = seal.SEALContext(parms, True, SEC_LEVELS[params.security_level])
    if not ctx.parameters_set():
        raise HEParamsError(
            f"SEAL refuses N={params.poly_modulus_degree}, coeff bits {list(params.coeff_mod_bit_sizes)} "
            f"at {params.security_level}-bit security: {ctx.parameters_error_message()}"
        )
    return ctx


def make_parms(params: HEParams) -> Any:
    """SEAL's CKKS encryption parameters (ring degree, coefficient modulus) for ``params``."""
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    try:
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    except Exception as exc:  # SEAL: no such primes
        raise HEParamsError(f"cannot build the coefficient modulus {list(params.coeff_mod_bit_sizes)}: {exc}") from exc
    return parms
