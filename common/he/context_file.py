"""The byte format of ``secret.ctx`` / ``public.ctx`` and the key fingerprint both carry.

Separate from ``context.py`` (the loaded SEAL objects) and ``keys.py`` (making and loading keys) because both
need it: a context exports itself in this format, and loading parses it before any SEAL object exists.
"""

from __future__ import annotations

import hashlib
import json
import struct

from privatune.common.he.errors import HEError, HEFormatError
from privatune.common.he.framing import FORMAT_VERSION, frame_header, read_header
from privatune.common.he.params import HEParams

__all__ = ["key_fingerprint", "pack_context", "unpack_context"]

_CTX_MAGIC = b"PTHECTX1"
_LENGTH_FORMAT = "<I"
_FINGERPRINT_DOMAIN = b"privatune-he-fingerprint-v1\x00"


def key_fingerprint(params: HEParams, parms_bytes: bytes, pk_bytes: bytes) -> str:
    """sha256 over the parameters, the SEAL encryption parameters and the public key bytes."""
    h = hashlib.sha256(_FINGERPRINT_DOMAIN)
    for part in (json.dumps(params.to_dict(), sort_keys=True).encode(), parms_bytes, pk_bytes):
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.hexdigest()


def pack_context(params: HEParams, parms: bytes, pk: bytes, sk: bytes | None, fingerprint: str) -> bytes:
    """A context file: header (kind, parameters, fingerprint, section sizes), then the sections."""
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
    return b"".join([frame_header(_CTX_MAGIC, _LENGTH_FORMAT, header), parms, pk, sk or b""])


def unpack_context(data: bytes, source: str) -> tuple[HEParams, bytes, bytes, bytes | None, str]:
    """``(params, parms, public key, secret key or None, fingerprint)``; ``HEFormatError`` names ``source``."""
    if data[: len(_CTX_MAGIC)] != _CTX_MAGIC:
        raise HEFormatError(f"{source} is not a privatune HE context file (written by `privatune keygen`)")
    try:
        header, pos = read_header(data, _CTX_MAGIC, _LENGTH_FORMAT)
        sections = header["sections"]
        params = HEParams.from_dict(header["params"])
        fingerprint = str(header["fingerprint"])
        if header.get("format") != FORMAT_VERSION:
            raise HEFormatError(f"{source}: context format {header.get('format')} is not supported")
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
