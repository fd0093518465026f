"""``privatune evaluate``'s engine: a saved global model (its card and weights) scored on labelled records.

The model is rebuilt from its card alone (common/model_card.py): the registered model, the fine-tuning mode and
settings (LoRA's adapters are rebuilt from the run's seed), then the saved trainable weights. The records go
through exactly the path training and the server's central evaluation use (common/features.py): in ``head`` mode
the frozen backbone's features (text: mean- or CLS-pooled token states, not normalised) and the head on them,
otherwise the whole model on encoded inputs; so the figures equal the central evaluation's on the same records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privatune.common.datasets import LabelledData
from privatune.common.evaluation import ClassFigures, confusion, macro_f1, per_class, predict
from privatune.common.model_card import ModelCard, ModelCardError


@dataclass(frozen=True)
class EvalReport:
    accuracy: float
    macro_f1: float
    loss: float
    num_examples: int
    labels: tuple[str, ...]
    classes: list[ClassFigures]
    confusion: np.ndarray  # [true, predicted] counts, in label order

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "loss": self.loss,
            "num_examples": self.num_examples,
            "labels": list(self.labels),
            "per_class": [asdict(c) for c in self.classes],
            "confusion_matrix": self.confusion.tolist(),
        }


def build_model(card: ModelCard, weights: Mapping[str, np.ndarray], source: str = "the model file") -> Any:
    """The classifier the card describes, with the saved trainable weights loaded; errors name the file."""
    from privatune.common.models import (
        backbone_fingerprint,
        configure_trainable,
        get_model_spec,
        load_trainable_state,
    )

    spec = get_model_spec(card.model)
    if spec.kind != card.kind:
        raise ModelCardError(f"{source}: model card says kind {card.kind}, but model '{card.model}' reads {spec.kind}")
    if card.backbone_fingerprint:
        here = backbone_fingerprint(card.model)
        if here != card.backbone_fingerprint:
            raise ModelCardError(
                f"{source}: the pretrained backbone of '{card.model}' on this machine (fingerprint {here[:12]}) is not "
                f"the one the model was trained on ({card.backbone_fingerprint[:12]}); install the same model "
                "version (or, for an hf: model, point --model-path at the same checkpoint folder)"
            )
    model = spec.build(len(card.labels), card.fine_tuning.seed)
    configure_trainable(model, card.fine_tuning)
    from privatune.common.model_card import KEY_PERSONAL_HEAD

    try:  # a personal-head run's file holds the body: the head stays the initial one (docs/personalisation.md)
        load_trainable_state(model, weights, keep_head=card.extra.get(KEY_PERSONAL_HEAD) == "true")
    except ValueError as err:
        raise ModelCardError(f"{source}: the weights do not fit the model its card describes: {err}") from None
    return model


def model_inputs(model: Any, card: ModelCard, data: LabelledData) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """(the module to run, its inputs): the head on frozen features in head mode, else the model on encodings."""
    from privatune.common.features import cached_features, encode
    from privatune.common.models import backbone_is_frozen

    if backbone_is_frozen(card.fine_tuning):
        return model.head, (cached_features(model, card.model, data, card.max_length, cache_dir=None),)
    return model, encode(card.model, data, card.max_length)


def evaluate_model(model: Any, card: ModelCard, data: LabelledData) -> EvalReport:
    """Accuracy, macro-F1 (as the central evaluation computes it), per-class figures and the confusion matrix."""
    if tuple(data.label_names) != tuple(card.labels):
        raise ValueError("the records must be labelled in the model's label order")
    if len(data) == 0:
        raise ValueError("no records to evaluate")
    module, inputs = model_inputs(model, card, data)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    total_loss, pred = predict(module, inputs, labels)
    true = np.asarray(data.labels, dtype=np.int64)
    n = len(true)
    return EvalReport(
        accuracy=float((pred == true).mean()),
        macro_f1=macro_f1(true, pred, len(card.labels)),
        loss=total_loss / n,
        num_examples=n,
        labels=card.labels,
        classes=per_class(true, pred, card.labels),
        confusion=confusion(true, pred, len(card.labels)),
    )


def plot_confusion(report: EvalReport, path: Path, title: str = "") -> Path:
    """The confusion matrix as a PNG (rows: true label, columns: predicted), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(report.labels)
    side = max(4.0, 0.55 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(report.confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), report.labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = int(report.confusion.max()) if report.confusion.size else 0
    for i in range(k):
        for j in range(k):
            count = int(report.confusion[i, j])
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    ax.set_title(title or f"accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f} ({report.num_examples})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
