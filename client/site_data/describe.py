"""``describe_site_data``: the aggregate summary `privatune site check` prints (counts, sizes, warnings), never
record content. Separate because it reads loaded data, not files.
"""

from __future__ import annotations

import numpy as np

from privatune.common.datasets import MAX_TEXT_CHARS, LabelledData
from privatune.common.imaging import DIGIT_SIDE, IMAGE_SIDE, MNIST_MEAN, MNIST_STD

#: Below this many records per present label, describe_site_data warns: DP noise swamps tiny classes.
FEW_RECORDS_WARNING = 5


def _background_ring() -> np.ndarray:
    """The edge of MNIST's central 20x20 digit box: background in almost every image, after our padding too."""
    lo, hi = (IMAGE_SIDE - DIGIT_SIDE) // 2, (IMAGE_SIDE + DIGIT_SIDE) // 2 - 1
    ring = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=bool)
    ring[[lo, hi], lo : hi + 1] = True
    ring[lo : hi + 1, [lo, hi]] = True
    return ring


_BACKGROUND_RING = _background_ring()


def describe_site_data(data: LabelledData) -> dict:
    """A JSON-ready summary for `privatune site check`: counts per label, sizes and warnings (the keyed
    fingerprint is added by the check, which holds the site key).

    Only aggregate counts leave this function, no record content, so it is safe to print or share.
    """
    counts = data.label_counts()
    total = len(data)
    per_label = {name: int(c) for name, c in zip(data.label_names, counts, strict=False)}
    warnings: list[str] = []
    missing = [name for name, c in per_label.items() if c == 0]
    if missing:
        warnings.append(f"no records for label(s): {', '.join(missing)}")
    few = [name for name, c in per_label.items() if 0 < c < FEW_RECORDS_WARNING]
    if few:
        warnings.append(f"fewer than {FEW_RECORDS_WARNING} records for label(s): {', '.join(few)}")
    summary: dict = {
        "name": data.name,
        "kind": data.kind,
        "records": total,
        "labels": per_label,
        "label_fractions": {name: (c / total if total else 0.0) for name, c in per_label.items()},
        "missing_labels": missing,
    }
    if data.kind == "text":
        lengths = np.asarray([len(t) for t in data.inputs], dtype=np.int64)
        summary["text_chars"] = (
            {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())}
            if total
            else {"min": 0, "median": 0.0, "max": 0}
        )
        if total and int(lengths.max()) >= MAX_TEXT_CHARS:
            warnings.append(f"texts longer than {MAX_TEXT_CHARS} characters were truncated")
    else:
        pixels = np.asarray(data.inputs, dtype=np.float64)[:, 0] * MNIST_STD + MNIST_MEAN  # back to [0, 1]
        summary["pixel_mean"] = float(pixels.mean()) if total else 0.0
        summary["background_mean"] = float(pixels[:, _BACKGROUND_RING].mean()) if total else 0.0
        if total and summary["background_mean"] > 0.5:
            warnings.append(
                "the images look light on a dark digit: digits must be light on a dark background, as in MNIST; "
                "invert the pixels (255 - value, or 16 - value for 8x8 digits)"
            )
    summary["warnings"] = warnings
    return summary
