"""Flower record conversion for HE payloads: ciphertext bytes <-> one ArrayRecord.

Separate from the rest of ``privatune.common.he`` because it is the only part that imports Flower.

Everything travels in ONE ArrayRecord, because Flower's strategy loop passes exactly one ArrayRecord
between rounds and its reply check wants one ArrayRecord (+ one MetricRecord, + an optional ConfigRecord):

* ``he.meta``: a uint8 array holding UTF-8 JSON ``{"format", "kind", "fingerprint", "layout",
  "num_summands", "num_chunks", "digest"}``;
* ``he.ct.00000`` ... ``he.ct.NNNNN``: one uint8 array per ciphertext (``Array(np.frombuffer(b, np.uint8))``;
  Flower splits large arrays into 5 MB chunks on the wire by itself).

Parsing a client's reply raises ``HEReplyError(reason)`` so the server can log the reason and drop the
reply; parsing the global state (client side) raises ``HEFormatError``.

Note: Flower's built-in ``validate_message_reply_consistency`` requires identical ArrayRecord keys in all
replies, so one reply with a wrong number of ciphertexts would make it skip the whole round: an HE
strategy should parse and check each reply itself (``records_to_update`` + ``he.check_update``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord

from privatune.common.he.errors import HEFormatError, HEReplyError
from privatune.common.he.framing import FORMAT_VERSION
from privatune.common.he.packing import Layout
from privatune.common.he.payloads import EncryptedState, EncryptedUpdate

__all__ = [
    "CHUNK_PREFIX",
    "DEFAULT_RECORD_KEY",
    "META_KEY",
    "arrayrecord_to_state",
    "arrayrecord_to_update",
    "is_he_arrayrecord",
    "records_to_update",
    "state_to_arrayrecord",
    "update_to_arrayrecord",
    "update_to_records",
]

META_KEY = "he.meta"
CHUNK_PREFIX = "he.ct."
DEFAULT_RECORD_KEY = "arrays"  # the key Flower's strategies look up for the ArrayRecord
_MAX_META_BYTES = 64 * 1024 * 1024

P = TypeVar("P", bound=EncryptedUpdate)


def _chunk_key(i: int) -> str:
    return f"{CHUNK_PREFIX}{i:05d}"


def _bytes_array(b: bytes) -> Array:
    return Array(np.frombuffer(b, dtype=np.uint8))


def _to_arrayrecord(payload: EncryptedUpdate, kind: str) -> ArrayRecord:
    meta = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "fingerprint": payload.fingerprint,
        "layout": payload.layout.to_dict(),
        "num_summands": payload.num_summands,
        "num_chunks": len(payload.chunks),
        "digest": payload.digest,
    }
    arrays = {META_KEY: _bytes_array(json.dumps(meta, separators=(",", ":")).encode())}
    for i, c in enumerate(payload.chunks):
        arrays[_chunk_key(i)] = _bytes_array(c)
    return ArrayRecord(arrays)


def _array_bytes(record: Mapping[str, Any], key: str, err: type[HEFormatError], what: str) -> bytes:
    arr = record.get(key)
    if not isinstance(arr, Array):
        raise err(f"{what}: entry {key!r} is missing or not an Array")
    if arr.dtype != "uint8" or len(arr.shape) != 1:
        raise err(f"{what}: entry {key!r} must be a 1-D uint8 array, got {arr.dtype} {tuple(arr.shape)}")
    try:
        return arr.numpy().tobytes()
    except Exception as exc:
        raise err(f"{what}: entry {key!r} does not load: {exc}") from exc


def _from_arrayrecord(record: Any, cls: type[P], want_kind: str, err: type[HEFormatError], what: str) -> P:
    """Parse and check one HE ArrayRecord of ``want_kind`` into ``cls``; ``err`` carries the reason."""
    if not isinstance(record, Mapping):
        raise err(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    if META_KEY not in record:
        raise err(f"{what}: no {META_KEY!r} entry; not an HE payload (is secure-aggregation 'he' on both sides?)")
    raw = _array_bytes(record, META_KEY, err, what)
    if len(raw) > _MAX_META_BYTES:
        raise err(f"{what}: metadata of {len(raw)} bytes is too large")
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')!r} is not supported")
        if meta.get("kind") != want_kind:
            raise ValueError(f"kind {meta.get('kind')!r}, expected {want_kind!r}")
        n_chunks = int(meta["num_chunks"])
        for k in ("fingerprint", "digest"):
            if not isinstance(meta.get(k), str):
                raise ValueError(f"{k} must be a string")
        int(meta["num_summands"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise err(f"{what}: malformed metadata: {exc}") from exc
    try:
        layout = Layout.from_dict(meta["layout"])
    except (HEFormatError, KeyError) as exc:
        raise err(f"{what}: {exc}") from exc
    expected_keys = {META_KEY} | {_chunk_key(i) for i in range(n_chunks)}
    got_keys = set(record.keys())
    if got_keys != expected_keys:
        n_got = sum(1 for k in got_keys if k.startswith(CHUNK_PREFIX))
        extra = sorted(got_keys - expected_keys)[:3]
        raise err(
            f"{what}: metadata announces {n_chunks} ciphertexts, the record holds {n_got}"
            + (f" (unexpected entries {extra})" if extra else "")
        )
    chunks = [_array_bytes(record, _chunk_key(i), err, what) for i in range(n_chunks)]
    return cls(meta["fingerprint"], layout, chunks, digest=meta["digest"], num_summands=int(meta["num_summands"]))


def update_to_arrayrecord(update: EncryptedUpdate) -> ArrayRecord:
    """A client's encrypted update as one ArrayRecord."""
    return _to_arrayrecord(update, "update")


def arrayrecord_to_update(record: Any) -> EncryptedUpdate:
    """Server side; raises ``HEReplyError`` with a loggable reason. Run ``he.check_update`` after it."""
    return _from_arrayrecord(record, EncryptedUpdate, "update", HEReplyError, "client reply")


def update_to_records(update: EncryptedUpdate, *, key: str = DEFAULT_RECORD_KEY) -> dict[str, ArrayRecord]:
    """Records for a client's train reply: ``{key: ArrayRecord}``; add the MetricRecord yourself."""
    return {key: update_to_arrayrecord(update)}


def records_to_update(records: Mapping[str, Any], *, key: str = DEFAULT_RECORD_KEY) -> EncryptedUpdate:
    """Server side: find the reply's ArrayRecord (under ``key``, else the only one) and parse it."""
    record = records.get(key) if hasattr(records, "get") else None
    if not isinstance(record, ArrayRecord):
        found = [v for v in records.values() if isinstance(v, ArrayRecord)]
        if len(found) != 1:
            raise HEReplyError(f"client reply: expected one ArrayRecord (key {key!r}), found {len(found)}")
        record = found[0]
    return arrayrecord_to_update(record)


def state_to_arrayrecord(state: EncryptedState) -> ArrayRecord:
    """The encrypted global state as the one ArrayRecord Flower passes between rounds."""
    return _to_arrayrecord(state, "state")


def arrayrecord_to_state(record: Any) -> EncryptedState:
    """Client side (or ``privatune decrypt`` on a saved record); raises ``HEFormatError``."""
    return _from_arrayrecord(record, EncryptedState, "state", HEFormatError, "encrypted global state")


def is_he_arrayrecord(record: Any) -> bool:
    """True if ``record`` looks like an HE payload (has the metadata entry)."""
    return isinstance(record, Mapping) and META_KEY in record
