"""The fine-tuning modes (``FINE_TUNING_MODES``, the one list config validation, the CLI and the docs use), the
settings one mode needs (:class:`FineTuning`) and each mode's recommended hyperparameters under DP-SGD.

* ``head``: only ``head.*`` trains; the backbone is frozen, so clients compute features once.
* ``last-k``: the last ``k`` blocks + head ("early layers frozen"); each model names its blocks in
  ``Classifier.block_prefixes`` (MiniLM: its encoder layers; the CNN: its conv and fc layers).
  ``partial`` is an alias for ``last-k`` with ``k = 1`` (what it always meant), so old configs still work.
* ``lora``: PEFT LoRA adapters on the model's target layers (``Classifier.lora_targets`` unless the run names
  others) + head; the base weights stay frozen. ``freeze_a`` is FFA-LoRA (Sun et al. 2024): A frozen, only B
  trains. The A matrices are initialised from the run's ``seed``, identically at every site and the server.
  ``lora_blocks = n`` keeps the adapters to the last ``n`` blocks, so the blocks below run once per record
  (the frozen-prefix cache of ``last-k``) and DP noise spreads over fewer weights.
* ``full``: every parameter trains.

Separate and free of torch so the command line and the config can name the modes without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

FINE_TUNING_MODES: tuple[str, ...] = ("head", "last-k", "lora", "full")
MODE_ALIASES: dict[str, str] = {"partial": "last-k"}  # partial = last-k with k = 1
ACCEPTED_MODES: tuple[str, ...] = FINE_TUNING_MODES + tuple(MODE_ALIASES)


def check_mode(mode: str) -> str:
    """The canonical name of ``mode`` (``partial`` -> ``last-k``); unknown names are refused."""
    if mode in MODE_ALIASES:
        return MODE_ALIASES[mode]
    if mode not in FINE_TUNING_MODES:
        raise ValueError(
            f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(FINE_TUNING_MODES)} "
            f"(partial = last-k with k=1)"
        )
    return mode


@dataclass(frozen=True)
class FineTuning:
    """What trains and how, for one run: built from the run config (``RunConfig.fine_tuning``).

    ``seed`` is the run's seed: it initialises the LoRA A matrices (model initialisation, public, like the head;
    not DP noise). ``lora_targets`` empty = the model's default targets.
    """

    mode: str = "head"
    last_k: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()
    lora_freeze_a: bool = False
    layer_lr_decay: float = 1.0
    seed: int = 0
    lora_blocks: int = 0  # adapters only in the backbone's last n blocks; 0 = in every block

    def __post_init__(self) -> None:
        canonical = check_mode(self.mode)
        if canonical != self.mode:
            if self.last_k != 1:
                raise ValueError(f"mode 'partial' means last-k with k=1, got last-k={self.last_k}; use mode=last-k")
            object.__setattr__(self, "mode", canonical)
        if self.last_k < 1:
            raise ValueError(f"last-k must be at least 1, got {self.last_k}")
        if self.lora_rank < 1:
            raise ValueError(f"lora-rank must be at least 1, got {self.lora_rank}")
        if self.lora_blocks < 0:
            raise ValueError(f"lora-blocks must be >= 0 (0 = every block), got {self.lora_blocks}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.layer_lr_decay <= 1:
            raise ValueError(f"layer-lr-decay must be in (0, 1], got {self.layer_lr_decay}")


def as_fine_tuning(mode: str | FineTuning) -> FineTuning:
    """A bare mode name gets the default settings (seed 0): tests and tools; a run passes its ``fine_tuning``."""
    return mode if isinstance(mode, FineTuning) else FineTuning(mode=mode)


def backbone_is_frozen(mode: str | FineTuning) -> bool:
    """True for ``head``: clients then compute features once and train only the head on them."""
    return as_fine_tuning(mode).mode == "head"


@dataclass(frozen=True)
class ModeDefaults:
    """A mode's recommended local hyperparameters (plain SGD, DP-SGD with clipping norm 1)."""

    lr: float
    batch_size: int
    local_epochs: int
    lr_without_dp: float = 0.0  # 0 = lr (as common.presets.Preset: none of the modes' rates needed another yet)


# Used when the run leaves lr / batch-size / local-epochs at 0 and picks a mode other than its preset's (the
# preset's own values were tuned for its mode). Under DP-SGD larger expected batches average the noise down
# (noise std per step = noise-multiplier x max-grad-norm / batch-size), so the modes that train inside the
# backbone use larger batches; their rates are for the averaged, clipped gradient (norm <= 1) with plain SGD.
RECOMMENDED_HYPERPARAMETERS: dict[str, dict[str, ModeDefaults]] = {
    "text": {
        "head": ModeDefaults(lr=2.0, batch_size=64, local_epochs=5),
        "last-k": ModeDefaults(lr=0.5, batch_size=128, local_epochs=2),
        "lora": ModeDefaults(lr=1.0, batch_size=128, local_epochs=2),
        "full": ModeDefaults(lr=0.2, batch_size=128, local_epochs=1),
    },
    "image": {
        "head": ModeDefaults(lr=0.5, batch_size=32, local_epochs=3),
        "last-k": ModeDefaults(lr=0.5, batch_size=64, local_epochs=3),
        "lora": ModeDefaults(lr=1.0, batch_size=64, local_epochs=3),
        "full": ModeDefaults(lr=0.2, batch_size=64, local_epochs=3),
    },
}


def recommended_hyperparameters(mode: str, kind: str) -> ModeDefaults:
    """``mode``'s defaults for a ``kind`` ("text" or "image") model."""
    if kind not in RECOMMENDED_HYPERPARAMETERS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(RECOMMENDED_HYPERPARAMETERS)}")
    return RECOMMENDED_HYPERPARAMETERS[kind][check_mode(mode)]
