"""Model registry and fine-tuning modes: pretrained backbones that load with no network.

Every model is a :class:`Classifier`: a pretrained ``backbone`` (encoded inputs -> features ``[B, D]``) and a
fresh, seeded ``head`` (``nn.Linear``, features -> logits). Only the *trainable* parameters travel between
clients and server. The parts, one module each:

* ``classifier``: the Classifier and its seeded head;  ``registry``: MODELS and the pretrained-weights cache;
* ``text``: MiniLM (``minilm``);  ``image``: the MNIST CNN (``digits-cnn``);  ``builtin``: registers both;
* ``modes``: FINE_TUNING_MODES, FineTuning, recommended hyperparameters (torch-free);  ``lora``: PEFT adapters;
* ``trainable``: what trains per mode and the state that travels;
* ``extract``: the frozen-backbone feature pass;  ``fingerprint``: the backbone's hash sites compare;
* ``names``, ``own``, ``hf``, ``torch_backbone``: your own models (``hf:FOLDER``, ``torch:module:function``).

The fine-tuning modes and the image constants load eagerly and without torch (the command line names the
modes in its help); everything else loads on first use, after the built-in models are registered, exactly as
importing the former single module did. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from privatune.common.imaging import MNIST_MEAN, MNIST_STD
from privatune.common.models.modes import (
    ACCEPTED_MODES,
    FINE_TUNING_MODES,
    RECOMMENDED_HYPERPARAMETERS,
    FineTuning,
    ModeDefaults,
    as_fine_tuning,
    backbone_is_frozen,
    check_mode,
    recommended_hyperparameters,
)

if TYPE_CHECKING:
    from privatune.common.models.classifier import Classifier, new_head
    from privatune.common.models.extract import compute_features
    from privatune.common.models.fingerprint import backbone_fingerprint
    from privatune.common.models.image import DIGITS_IMAGE_SIZE, DigitsBackbone, build_digits_cnn, encode_images
    from privatune.common.models.lora import apply_lora
    from privatune.common.models.registry import (
        MODELS,
        Encoder,
        ModelSpec,
        PretrainedAssets,
        get_model_spec,
        load_pretrained_cached,
        register_model,
    )
    from privatune.common.models.text import MINILM_DEFAULT_MAX_LENGTH, MeanPooledEncoder, build_minilm, encode_texts
    from privatune.common.models.trainable import (
        configure_trainable,
        frozen_state_fingerprint,
        load_trainable_state,
        module_to_train,
        trainable_fingerprint,
        trainable_names_and_shapes,
        trainable_state,
    )

__all__ = [
    "ACCEPTED_MODES",
    "DIGITS_IMAGE_SIZE",
    "FINE_TUNING_MODES",
    "MINILM_DEFAULT_MAX_LENGTH",
    "MNIST_MEAN",
    "MNIST_STD",
    "MODELS",
    "RECOMMENDED_HYPERPARAMETERS",
    "Classifier",
    "DigitsBackbone",
    "Encoder",
    "FineTuning",
    "MeanPooledEncoder",
    "ModeDefaults",
    "ModelSpec",
    "PretrainedAssets",
    "apply_lora",
    "as_fine_tuning",
    "backbone_fingerprint",
    "backbone_is_frozen",
    "build_digits_cnn",
    "build_minilm",
    "check_mode",
    "compute_features",
    "configure_trainable",
    "encode_images",
    "encode_texts",
    "frozen_state_fingerprint",
    "get_model_spec",
    "load_pretrained_cached",
    "load_trainable_state",
    "module_to_train",
    "new_head",
    "recommended_hyperparameters",
    "register_model",
    "trainable_fingerprint",
    "trainable_names_and_shapes",
    "trainable_state",
]

# The module each lazily loaded name lives in.
_HOME = {
    "Classifier": "classifier",
    "new_head": "classifier",
    "compute_features": "extract",
    "backbone_fingerprint": "fingerprint",
    "apply_lora": "lora",
    "build_digits_cnn": "image",
    "encode_images": "image",
    "MODELS": "registry",
    "Encoder": "registry",
    "ModelSpec": "registry",
    "PretrainedAssets": "registry",
    "get_model_spec": "registry",
    "load_pretrained_cached": "registry",
    "register_model": "registry",
    "build_minilm": "text",
    "MINILM_DEFAULT_MAX_LENGTH": "text",
    "MeanPooledEncoder": "text",
    "DIGITS_IMAGE_SIZE": "image",
    "DigitsBackbone": "image",
    "encode_texts": "text",
    "configure_trainable": "trainable",
    "frozen_state_fingerprint": "trainable",
    "load_trainable_state": "trainable",
    "module_to_train": "trainable",
    "trainable_fingerprint": "trainable",
    "trainable_names_and_shapes": "trainable",
    "trainable_state": "trainable",
}


def __getattr__(name: str) -> Any:
    """Load a torch-backed name on first use; the built-in models are registered before any is handed out."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f"{__name__}.builtin")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
