"""The fine-tuning modes (``FINE_TUNING_MODES``, the one list config validation, the CLI and the docs use).

* ``head``: only ``head.*`` trains; the backbone is frozen, so clients compute features once.
* ``partial``: the last block(s) + head ("early layers frozen"); each model names its block in
  ``Classifier.partial_prefixes``.
* ``full``: every parameter trains.

Separate and free of torch so the command line and the config can name the modes without loading a model.
"""

from __future__ import annotations

FINE_TUNING_MODES: tuple[str, ...] = ("head", "partial", "full")


def check_mode(mode: str) -> str:
    if mode not in FINE_TUNING_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(FINE_TUNING_MODES)}")
    return mode


def backbone_is_frozen(mode: str) -> bool:
    """True for ``head``: clients then compute features once and train only the head on them."""
    return check_mode(mode) == "head"
