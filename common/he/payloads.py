"""The encrypted payloads that travel and are stored: ``EncryptedUpdate`` (one client's reply),
``EncryptedState`` (the summed global state) and their integrity digest.

Separate because three modules build or read them (the protocol, the checkpoint file, the Flower records)
and none of those should import another just for the types.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from privatune.common.he.packing import Layout

__all__ = ["EncryptedState", "EncryptedUpdate"]

_DIGEST_DOMAIN = b"privatune-he-digest-v1\x00"


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
    """One client's reply: ciphertexts of ``[w*v, w]`` packed ``values_per_chunk`` per chunk.

    The digest detects accidental corruption or malformed replies, not forgery.
    """

    fingerprint: str
    layout: Layout
    chunks: list[bytes]
    digest: str = ""
    num_summands: int = field(default=1)

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = self.recompute_digest()

    @property
    def num_bytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    def recompute_digest(self) -> str:
        return _digest(self.fingerprint, self.layout, self.chunks, self.num_summands)


@dataclass
class EncryptedState(EncryptedUpdate):
    """The encrypted global state: the sum of ``num_summands`` weighted updates (1 for the initial one)."""
