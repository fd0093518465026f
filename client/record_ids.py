"""Keyed record identities, the keyed dataset fingerprint and the validation split they decide.

A record's id is HMAC-SHA256(site key, its input's canonical bytes + its occurrence index among identical
inputs), cut to 16 bytes. The label is not part of it (relabelling or reordering the label set leaves the same
person's record), nor its position in the file, so an id survives appends, removals, shuffles, other label sets and
other validation splits. Without the site key nobody can compute an id for a candidate record, so neither the
ids nor the fingerprint below let the server test guesses about the data.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict

import numpy as np

from privatune.common.datasets import LabelledData
from privatune.common.record_budget import ID_BYTES


def _canonical_inputs(data: LabelledData):
    if data.kind == "text":
        for text in data.inputs:
            yield b"text\0" + str(text).encode("utf-8")
    else:
        x = np.ascontiguousarray(data.inputs)
        header = f"image\0{x.dtype.str}\0{'x'.join(map(str, x.shape[1:]))}\0".encode("ascii")
        for row in x:
            yield header + row.tobytes()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def record_ids(key: bytes, data: LabelledData) -> list[bytes]:
    """One 16-byte keyed id per record, in the data's order."""
    seen: dict[bytes, int] = defaultdict(int)
    out = []
    for canonical in _canonical_inputs(data):
        digest = _mac(key, b"privatune.input\0", canonical)
        k = seen[digest]
        seen[digest] += 1
        out.append(_mac(key, b"privatune.record\0", digest, k.to_bytes(8, "big"))[:ID_BYTES])
    return out


def key_check(key: bytes) -> str:
    """A keyed value that tells this key from another (kept in the ledger's cohorts, never sent)."""
    return _mac(key, b"privatune.key-check\0").hex()[:32]


def dataset_fingerprint(key: bytes, ids: list[bytes]) -> str:
    """The only fingerprint of the data that leaves the site or sits in a ledger: keyed, order-free."""
    return _mac(key, b"privatune.dataset\0", *sorted(ids)).hex()


def validation_split(key: bytes, ids: list[bytes], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a record is in validation when its keyed uniform draw is below
    ``val_fraction``, so the split is the site's alone, the same in every run, and grows monotonically with the
    fraction. Training is never emptied (the record with the largest draw trains)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    draws = np.array([int.from_bytes(_mac(key, b"privatune.split\0", i)[:8], "big") / 2.0**64 for i in ids])
    is_val = draws < val_fraction
    if len(ids) and is_val.all():
        is_val[int(np.argmax(draws))] = False
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)
