"""The server's run checkpoint: the global state and the round counter, replaced atomically after every round.

Separate from the final model files (server/app.py ``save_global``) because a resume needs more than a model: the
round the state belongs to, the run it belongs to, and a server optimiser's state (named arrays, empty for FedAvg).

Layout, under ``RUN/checkpoint/``::

    round-000003/global.safetensors | global.he-checkpoint   the weights, with their model card (metadata)
    round-000003/optimizer.safetensors                       the server optimiser's arrays (absent when empty)
    checkpoint.json                                          the commit record: run, round, folder, digests

A round's folder is written and fsynced under a temporary name, renamed, and only then is ``checkpoint.json``
replaced (temporary file in the same folder, fsync, ``os.replace``, fsync of the folder): a crash at any point
leaves the previous ``checkpoint.json`` and the folder it names readable. Older round folders are removed after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_DIR = "checkpoint"
COMMIT_NAME = "checkpoint.json"
FORMAT = "privatune-checkpoint"
VERSION = 1
PLAIN_NAME = "global.safetensors"
ENCRYPTED_NAME = "global.he-checkpoint"
OPTIMIZER_NAME = "optimizer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or used; the message names the file and the fix."""


@dataclass(frozen=True)
class ServerCheckpoint:
    """One completed round's server state. ``weights``: plaintext arrays, or the encrypted state
    (common/he EncryptedUpdate) under secure-aggregation=he."""

    run_id: str
    round: int
    weights: Any
    encrypted: bool
    card: Mapping[str, str] = field(default_factory=dict)  # the model card's metadata (common/model_card.py)
    optimizer: Mapping[str, np.ndarray] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_json_durable(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically and durably: temp file in the same folder, fsync, os.replace, fsync folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(dict(data), fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _write_weights(folder: Path, ckpt: ServerCheckpoint) -> str:
    metadata = {str(k): str(v) for k, v in ckpt.card.items()}
    if ckpt.encrypted:
        from privatune.common import he

        he.save_checkpoint(folder / ENCRYPTED_NAME, ckpt.weights, metadata=metadata)
        return ENCRYPTED_NAME
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in ckpt.weights.items()}
    save_file(tensors, str(folder / PLAIN_NAME), metadata=metadata)
    return PLAIN_NAME


def save(directory: Path, ckpt: ServerCheckpoint) -> Path:
    """Write ``ckpt`` as the directory's latest checkpoint (atomic; see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"round-{ckpt.round:06d}"
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=name + ".", suffix=".tmp"))
    weights = _write_weights(staging, ckpt)
    files = [weights]
    if ckpt.optimizer:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in ckpt.optimizer.items()}, str(staging / OPTIMIZER_NAME))
        files.append(OPTIMIZER_NAME)
    for f in files:
        fsync_path(staging / f)
    fsync_path(staging)
    final = directory / name
    previous = read_commit(directory) if (directory / COMMIT_NAME).exists() else None
    if final.exists():  # a round written before a crash, never committed (the commit names an older one)
        if previous is not None and previous.get("folder") == name:
            raise CheckpointError(f"{directory}: round {ckpt.round} is already the committed checkpoint")
        shutil.rmtree(final)
    os.rename(staging, final)
    fsync_path(directory)
    commit = {
        "format": FORMAT,
        "version": VERSION,
        "run_id": ckpt.run_id,
        "round": ckpt.round,
        "encrypted": ckpt.encrypted,
        "folder": name,
        "weights": weights,
        "optimizer": OPTIMIZER_NAME if ckpt.optimizer else "",
        "sha256": {f: _digest(final / f) for f in files},
    }
    write_json_durable(directory / COMMIT_NAME, commit)
    for old in directory.iterdir():  # what no commit names any more: older rounds, crashed staging folders
        if old.is_dir() and old.name != name and old.name.startswith("round-"):
            shutil.rmtree(old, ignore_errors=True)
    return directory / COMMIT_NAME


def read_commit(directory: Path) -> dict[str, Any]:
    path = Path(directory) / COMMIT_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist: no round of this run completed yet (or the folder is not a run's checkpoint/)"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the run has no usable checkpoint") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a privatune checkpoint (format {FORMAT} version {VERSION})")
    return data


def load(directory: Path) -> ServerCheckpoint:
    """The latest committed checkpoint of ``directory`` (RUN/checkpoint), its digests checked."""
    directory = Path(directory)
    commit = read_commit(directory)
    folder = directory / str(commit["folder"])
    for name, digest in dict(commit.get("sha256") or {}).items():
        path = folder / name
        if not path.is_file() or _digest(path) != digest:
            raise CheckpointError(f"{path} is missing or does not match its digest in {directory / COMMIT_NAME}")
    weights, card = read_weights(folder / str(commit["weights"]))
    optimizer: dict[str, np.ndarray] = {}
    if commit.get("optimizer"):
        from safetensors.numpy import load_file

        optimizer = load_file(str(folder / str(commit["optimizer"])))
    return ServerCheckpoint(
        run_id=str(commit["run_id"]),
        round=int(commit["round"]),
        weights=weights,
        encrypted=bool(commit["encrypted"]),
        card=card,
        optimizer=optimizer,
    )


def is_encrypted_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"PTHESTA1"  # common/he/checkpoints.py's magic


def read_weights(path: Path) -> tuple[Any, dict[str, str]]:
    """A model file's weights (plaintext arrays, or the encrypted state) and its metadata (model card)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    if is_encrypted_file(path):
        from privatune.common import he

        return he.load_checkpoint(path), he.checkpoint_metadata(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = dict(fh.metadata() or {})
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta  # noqa: SIM118 (safe_open has no iterator)
    except Exception as err:
        raise CheckpointError(
            f"{path} is neither a safetensors model file nor an encrypted checkpoint ({err})"
        ) from None
