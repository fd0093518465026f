"""Start a federation from saved state: resume a run from its checkpoint, or warm-start a new run from a model.

Separate from server/checkpoint.py (the format) because this is the policy: which files may start which run (the
model card must name the run config's model, fine-tuning mode and labels), and how a resumed run's earlier rounds
come back into its record (metrics.jsonl up to the checkpoint's round; rows of a round that never completed go).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from privatune.common.config import RunConfig
from privatune.common.model_card import ModelCard, ModelCardError
from privatune.server.checkpoint import (
    CHECKPOINT_DIR,
    COMMIT_NAME,
    CheckpointError,
    ServerCheckpoint,
    load,
    read_weights,
)
from privatune.server.run_record import RoundReport

INITIAL_CHECKPOINT_KEY = "initial-checkpoint"


def load_start(path: Path, what: str = INITIAL_CHECKPOINT_KEY) -> ServerCheckpoint:
    """A run folder (its checkpoint/), a checkpoint folder, or a saved model file (global.safetensors, a decrypted
    file, global.he-checkpoint): what a new run starts from."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR / COMMIT_NAME).exists() else path
        if not (folder / COMMIT_NAME).exists():
            raise CheckpointError(
                f"{what}: {path} holds no checkpoint ({CHECKPOINT_DIR}/{COMMIT_NAME}); give a run folder, its "
                f"{CHECKPOINT_DIR}/ folder, or a model file (global.safetensors)"
            )
        return load(folder)
    if not path.exists():
        raise CheckpointError(f"{what}: {path} does not exist; give a run folder or a model file (global.safetensors)")
    weights, meta = read_weights(path)
    encrypted = not isinstance(weights, dict)
    card = card_of(meta, f"{what} {path}")
    return ServerCheckpoint(card.run_id, card.rounds_completed, weights, encrypted, meta)


def card_of(meta: dict[str, str] | Any, source: str) -> ModelCard:
    try:
        return ModelCard.from_metadata(dict(meta), source=source)
    except ModelCardError as err:
        raise CheckpointError(str(err)) from None


def check_matches(start: ServerCheckpoint, cfg: RunConfig, source: str) -> None:
    """Refuse saved state that is not this run's kind of model: the model, the fine-tuning mode and its
    settings, the labels, and (encrypted state) HE, each named with both values."""
    card = card_of(start.card, source)
    problems = []
    if card.model != cfg.model:
        problems.append(f"model: the checkpoint's is {card.model}, the run config's is {cfg.model}")
    if card.fine_tuning != cfg.fine_tuning:
        mine, theirs = cfg.fine_tuning, card.fine_tuning
        differ = [
            f"{f.name.replace('_', '-')} {getattr(theirs, f.name)!r} vs {getattr(mine, f.name)!r}"
            for f in fields(mine)
            if getattr(mine, f.name) != getattr(theirs, f.name)
        ]
        problems.append(f"fine-tuning (checkpoint vs run config): {', '.join(differ)}")
    if tuple(card.labels) != tuple(cfg.label_names):
        problems.append(
            f"labels: the checkpoint's are {','.join(card.labels)}, the run config's are {','.join(cfg.label_names)}"
        )
    if start.encrypted and cfg.secure_aggregation != "he":
        problems.append(
            "the checkpoint is encrypted (secure-aggregation=he) and this run is not: decrypt it first "
            "(`privatune decrypt`) and give the decrypted file"
        )
    if problems:
        raise CheckpointError(f"{source} does not fit this run: {'; '.join(problems)}")


def check_shapes(start: ServerCheckpoint, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """The saved tensors must be exactly the trainable tensors this run's model travels with."""
    if start.encrypted:
        layout = start.weights.layout
        have = {n: tuple(s) for n, s in zip(layout.names, layout.shapes, strict=True)}
    else:
        have = {k: tuple(v.shape) for k, v in start.weights.items()}
    if have != expected:
        missing = sorted(set(expected) - set(have))
        extra = sorted(set(have) - set(expected))
        shaped = sorted(k for k in set(have) & set(expected) if have[k] != expected[k])
        raise CheckpointError(
            f"{source}: its tensors are not this run's trainable set (missing {missing[:3]}, extra {extra[:3]}, "
            f"other shapes {shaped[:3]})"
        )


def _report(row: dict[str, Any]) -> RoundReport:
    names = {f.name for f in fields(RoundReport)}
    values = {k: v for k, v in row.items() if k in names}
    values["seconds"] = float(values.get("seconds") or 0.0)
    return RoundReport(**values)


def earlier_rounds(out: Path, upto: int) -> list[RoundReport]:
    """The rounds a resumed run already has (metrics.jsonl, up to the checkpoint's round), and the file rewritten
    without the rows of later rounds: those never completed and are run again."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    kept: list[str] = []
    reports: list[RoundReport] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: that round did not complete
        if int(row.get("round", -1)) <= upto:
            kept.append(line)
            reports.append(_report(row))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return reports
