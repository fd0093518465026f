"""Load a partner site's own labelled files into the same LabelledData the presets use, or say exactly why not.

Sites bring their data as CSV or JSON Lines (texts), or as an .npz archive or a folder of per-label images
(images). Every check fails on the FIRST bad record with a SiteDataError that names the file, the record and
line, the reason, and what to change, because a site operator fixing a file has nothing else to go on.

Images are turned into model inputs exactly like the digits preset (`common.datasets`): raw 8x8 digits with
values 0..16 are upscaled the same way, and 28x28 pixels are scaled to [0, 1] and MNIST-normalised, so a
model trained on the preset works on site images and vice versa. Digits must be light on a dark background,
as in MNIST; `describe_site_data` warns when the background looks light.

The readers, one module per concern: ``spec`` (SiteDataSpec, SiteDataError, formats), ``checks`` (shared
record checks), ``texts`` (csv, jsonl), ``images`` (npz, image folder), ``load`` (load_site_data) and
``describe`` (describe_site_data).
"""

from __future__ import annotations

from privatune.client.site_data.describe import FEW_RECORDS_WARNING, describe_site_data
from privatune.client.site_data.images import IMAGE_SUFFIXES
from privatune.client.site_data.load import load_site_data
from privatune.client.site_data.spec import (
    FORMATS,
    IMAGE_FORMATS,
    TEXT_FORMATS,
    Format,
    SiteDataError,
    SiteDataSpec,
    guess_format,
)

__all__ = [
    "FEW_RECORDS_WARNING",
    "FORMATS",
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "TEXT_FORMATS",
    "Format",
    "SiteDataError",
    "SiteDataSpec",
    "describe_site_data",
    "guess_format",
    "load_site_data",
]
