"""Key material: make a CKKS key pair, write the key files, load a context file with the side's checks.

Separate because this is what ``privatune keygen`` and each side's start-up use, and where the rule "the
server never holds the secret key" is enforced (``load_context(require_secret=False)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tenseal.sealapi as seal

from privatune.common.he.context import HEContext
from privatune.common.he.context_file import key_fingerprint, pack_context, unpack_context
from privatune.common.he.errors import HEFormatError, HEKeyError
from privatune.common.he.params import HEParams
from privatune.common.he.seal_io import make_parms, seal_context, seal_save

__all__ = ["KeyPair", "KeyPaths", "generate_keys", "load_context", "write_keys"]


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
    parms = make_parms(params)
    ctx = seal_context(parms, params)
    keygen = seal.KeyGenerator(ctx)
    pk = seal.PublicKey()
    keygen.create_public_key(pk)
    parms_b, pk_b, sk_b = seal_save(parms), seal_save(pk), seal_save(keygen.secret_key())
    fp = key_fingerprint(params, parms_b, pk_b)
    return KeyPair(
        secret_context=pack_context(params, parms_b, pk_b, sk_b, fp),
        public_context=pack_context(params, parms_b, pk_b, None, fp),
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
    params, parms_b, pk_b, sk_b, fp = unpack_context(data, name)
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
