"""What ``privatune decrypt`` reads and writes: the server's encrypted checkpoint file, and its
decryption to plaintext safetensors.

Separate because the checkpoint is a file format of its own (magic, JSON header, ciphertexts), written by
the server and read by a key holder long after the run.

The header may hold ``metadata``: string keys and values (the model card, common/model_card.py) that the
decrypted safetensors file carries, so it says which model, mode and labels it is. An optional key: a checkpoint
without it still reads (its decrypted file then has no card), and readers that predate it ignore it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from privatune.common.he.aggregation import decrypt_state
from privatune.common.he.errors import HEError, HEFormatError
from privatune.common.he.framing import FORMAT_VERSION, frame_header, read_header
from privatune.common.he.keys import load_context
from privatune.common.he.packing import Layout
from privatune.common.he.payloads import EncryptedState, EncryptedUpdate

__all__ = ["checkpoint_metadata", "decrypt_checkpoint_to_safetensors", "load_checkpoint", "save_checkpoint"]

_CKPT_MAGIC = b"PTHESTA1"
_LENGTH_FORMAT = "<Q"


def _state_header(state: EncryptedUpdate, metadata: Mapping[str, str]) -> dict[str, Any]:
    return {
        "metadata": {str(k): str(v) for k, v in metadata.items()},
        "format": FORMAT_VERSION,
        "fingerprint": state.fingerprint,
        "layout": state.layout.to_dict(),
        "num_summands": state.num_summands,
        "digest": state.digest,
        "chunk_sizes": [len(c) for c in state.chunks],
    }


def save_checkpoint(
    path: str | os.PathLike[str], state: EncryptedUpdate, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the encrypted global state as one file (atomic rename); the server's run checkpoint. ``metadata``
    (the model card) goes into the header, in plaintext, and into the file ``privatune decrypt`` writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = frame_header(_CKPT_MAGIC, _LENGTH_FORMAT, _state_header(state, metadata or {}))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head)
        for c in state.chunks:
            f.write(c)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> EncryptedState:
    """Read a checkpoint written by ``save_checkpoint``; checks its size and integrity digest."""
    return _read_checkpoint(path)[0]


def checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata (model card) a checkpoint's header holds; {} for a checkpoint written without one."""
    return _read_checkpoint(path)[1]


def _read_checkpoint(path: str | os.PathLike[str]) -> tuple[EncryptedState, dict[str, str]]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise HEFormatError(f"checkpoint {path} does not exist") from None
    if data[: len(_CKPT_MAGIC)] != _CKPT_MAGIC:
        raise HEFormatError(f"{path} is not an encrypted privatune checkpoint")
    try:
        header, pos = read_header(data, _CKPT_MAGIC, _LENGTH_FORMAT)
        if header.get("format") != FORMAT_VERSION:
            raise HEFormatError(f"{path}: checkpoint format {header.get('format')} is not supported")
        sizes = [int(s) for s in header["chunk_sizes"]]
        layout = Layout.from_dict(header["layout"])
        fingerprint, digest, summands = str(header["fingerprint"]), str(header["digest"]), int(header["num_summands"])
        metadata = header.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise HEFormatError(f"{path}: the checkpoint's metadata is not a mapping of strings")
    except HEError:
        raise
    except Exception as exc:
        raise HEFormatError(f"{path}: malformed checkpoint header: {exc}") from exc
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
    return state, metadata


def decrypt_checkpoint_to_safetensors(
    secret_ctx_path: str | os.PathLike[str],
    checkpoint_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
) -> Path:
    """``privatune decrypt``: write the plaintext trainable weights of an encrypted checkpoint, with the model
    card its header holds (so the file says which model, mode and labels it is)."""
    from safetensors.numpy import save_file

    ctx = load_context(secret_ctx_path, require_secret=True)
    state, metadata = _read_checkpoint(checkpoint_path)
    tensors = {k: np.ascontiguousarray(v) for k, v in decrypt_state(ctx, state).items()}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(out),
        metadata={**metadata, "he_fingerprint": state.fingerprint, "num_summands": str(state.num_summands)},
    )
    return out
