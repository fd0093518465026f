"""``load_site_data``: picks the reader for a spec's format and model kind, and returns the preset's
LabelledData. Separate so the readers stay independent of one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from privatune.client.site_data.checks import LabelCollector, LabelParser
from privatune.client.site_data.images import load_image_folder, load_npz
from privatune.client.site_data.spec import FORMATS, IMAGE_FORMATS, TEXT_FORMATS, SiteDataError, SiteDataSpec
from privatune.client.site_data.texts import load_csv, load_jsonl
from privatune.common.datasets import LabelledData, pixels_to_model_input


def load_site_data(
    spec: SiteDataSpec, label_names: Sequence[str] | None, kind: Literal["text", "image"], name: str = "site"
) -> LabelledData:
    """Read a site's files into LabelledData with the preset's label names; raises SiteDataError.

    ``label_names=None`` finds the label set in the data instead: every distinct label becomes a name, sorted
    (numerically when all are integers), as ``privatune simulate --data`` does when no ``--labels`` is given.
    """
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
    if label_names is not None and not label_names:
        raise ValueError("label_names is empty")
    parser = LabelParser(label_names, path) if label_names is not None else LabelCollector(path)
    inputs: list[str] | np.ndarray
    if kind == "text":
        inputs, ys = (load_csv if spec.format == "csv" else load_jsonl)(spec, parser)
    else:
        pixels, ys = (load_npz if spec.format == "npz" else load_image_folder)(spec, parser)
        inputs = pixels_to_model_input(pixels)
    names = tuple(parser.names)
    if isinstance(parser, LabelCollector):
        names, ys = parser.sorted_labels(ys)
    return LabelledData(name, kind, inputs, np.asarray(ys, dtype=np.int64), names)
