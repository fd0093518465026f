"""``load_site_data``: picks the reader for a spec's format and model kind, and returns the preset's
LabelledData. Separate so the readers stay independent of one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from privatune.client.site_data.checks import LabelParser
from privatune.client.site_data.images import load_image_folder, load_npz
from privatune.client.site_data.spec import FORMATS, IMAGE_FORMATS, TEXT_FORMATS, SiteDataError, SiteDataSpec
from privatune.client.site_data.texts import load_csv, load_jsonl
from privatune.common.datasets import LabelledData, pixels_to_model_input


def load_site_data(
    spec: SiteDataSpec, label_names: Sequence[str], kind: Literal["text", "image"], name: str = "site"
) -> LabelledData:
    """Read a site's files into LabelledData with the preset's label names; raises SiteDataError."""
    path = Path(spec.path)
    spec = SiteDataSpec(path, spec.format, spec.text_column, spec.label_column)
    if spec.format not in FORMATS:
        raise SiteDataError(path, f"unknown format {spec.format!r}", f"Use one of: {', '.join(FORMATS)}.")
    if kind not in ("text", "image"):
        raise ValueError(f"kind must be 'text' or 'image', got {kind!r}")
    wanted = TEXT_FORMATS if kind == "text" else IMAGE_FORMATS
    if spec.format not in wanted:
        raise SiteDataError(
            path,
            f"format {spec.format!r} does not hold {kind} data, which this model needs",
            f"Provide the data as one of: {', '.join(wanted)}.",
        )
    if not label_names:
        raise ValueError("label_names is empty")
    parser = LabelParser(label_names, path)
    names = tuple(label_names)
    if kind == "text":
        texts, ys = (load_csv if spec.format == "csv" else load_jsonl)(spec, parser)
        return LabelledData(name, "text", texts, np.asarray(ys, dtype=np.int64), names)
    pixels, ys = (load_npz if spec.format == "npz" else load_image_folder)(spec, parser)
    return LabelledData(name, "image", pixels_to_model_input(pixels), np.asarray(ys, dtype=np.int64), names)
