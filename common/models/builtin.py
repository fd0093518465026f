"""The built-in models, registered in this order (``minilm``, then ``digits-cnn``) when the package is first used."""

from __future__ import annotations

from privatune.common.models.image import build_digits_cnn, encode_images, load_digits_cnn
from privatune.common.models.registry import ModelSpec, register_model
from privatune.common.models.text import MINILM_DEFAULT_MAX_LENGTH, build_minilm, encode_texts, load_minilm

register_model(
    ModelSpec(
        name="minilm",
        kind="text",
        feature_dim=384,
        description="all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params), mean-pooled 384-dim sentence features",
        build=build_minilm,
        encode=encode_texts,
        default_max_length=MINILM_DEFAULT_MAX_LENGTH,
    ),
    loader=load_minilm,
)
register_model(
    ModelSpec(
        name="digits-cnn",
        kind="image",
        feature_dim=256,
        description="3-conv CNN pretrained on MNIST (390k params), 256-dim features, 28x28 normalised input",
        build=build_digits_cnn,
        encode=encode_images,
    ),
    loader=load_digits_cnn,
)
