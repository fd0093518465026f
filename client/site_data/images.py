"""The image readers: an .npz archive (x, y) and a folder of per-label images; both become pixels in [0, 1]
[N, 28, 28] the way the digits preset makes them (8x8 digits upscaled, 8-bit pixels scaled).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privatune.client.site_data.checks import LabelParser, missing_reason, require_file
from privatune.client.site_data.spec import SiteDataError, SiteDataSpec
from privatune.common.datasets import DIGITS_MAX_VALUE, upscale_digits
from privatune.common.imaging import IMAGE_SIDE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


def _image_pixels(path: Path, x: np.ndarray, first_record: int) -> np.ndarray:
    """Pixels in [0, 1] as float32 [N, 28, 28] from one array of images; errors name the first bad record.

    Accepted: [N, 28, 28] or [N, 1, 28, 28] with values in [0, 1] (float) or 0..255 (integer, or float above 1),
    and raw sklearn-style digits [N, 8, 8] with values 0..16, upscaled like the digits preset. The scale is
    decided per array (per file), never per image, so a faint image is not stretched.
    """
    if x.dtype.kind not in "biuf":
        raise SiteDataError(
            path, f"images have dtype {x.dtype}, not numbers", "Save pixel values as integers or floats."
        )
    if x.ndim == 0:
        raise SiteDataError(path, "the image array is a single number", "Save images as [N, 28, 28] arrays.")
    shape = tuple(x.shape[1:])
    if x.ndim == 4 and shape[0] == 1:
        x = x[:, 0]
        shape = tuple(x.shape[1:])
    if x.ndim != 3 or shape not in ((IMAGE_SIDE, IMAGE_SIDE), (8, 8)):
        raise SiteDataError(
            path,
            f"images have shape {list(x.shape[1:])}, expected [{IMAGE_SIDE}, {IMAGE_SIDE}], "
            f"[1, {IMAGE_SIDE}, {IMAGE_SIDE}] or raw [8, 8] digits",
            f"Resize the images to {IMAGE_SIDE}x{IMAGE_SIDE} grayscale.",
            record=first_record,
        )
    values = x.astype(np.float64, copy=False)
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise SiteDataError(
            path, "the image holds NaN or infinite values", "Fix or drop this image.", record=first_record + bad
        )
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0:
        bad = int(np.flatnonzero((values < 0).reshape(len(values), -1).any(axis=1))[0])
        raise SiteDataError(
            path,
            f"negative pixel value {values[bad].min():g}",
            "Save raw pixels (0..255 or 0..1), not normalised ones; privatune normalises them itself.",
            record=first_record + bad,
        )
    if shape == (8, 8):
        if high > DIGITS_MAX_VALUE:
            bad = int(np.flatnonzero((values > DIGITS_MAX_VALUE).reshape(len(values), -1).any(axis=1))[0])
            raise SiteDataError(
                path,
                f"8x8 digits must hold values 0..16 like scikit-learn's digits, found {values[bad].max():g}",
                f"Scale 8x8 images to 0..16, or upscale them to {IMAGE_SIDE}x{IMAGE_SIDE} yourself.",
                record=first_record + bad,
            )
        return upscale_digits(values)
    if x.dtype.kind in "iu" or high > 1.0:
        if high > 255.0:
            bad = int(np.flatnonzero((values > 255).reshape(len(values), -1).any(axis=1))[0])
            raise SiteDataError(
                path,
                f"pixel value {values[bad].max():g} is above 255",
                "Save 8-bit grayscale pixels (0..255) or floats in [0, 1].",
                record=first_record + bad,
            )
        values = values / 255.0
    return values.astype(np.float32)


def _label_array(path: Path, y: np.ndarray, labels: LabelParser) -> list[int]:
    if y.ndim != 1:
        raise SiteDataError(path, f"array 'y' has shape {list(y.shape)}, expected [N]", "Save labels as a 1-D array.")
    if y.dtype.kind in "iu":
        values: list[object] = [int(v) for v in y.tolist()]
    elif y.dtype.kind in "US":
        values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in y.tolist()]
    else:
        raise SiteDataError(
            path,
            f"array 'y' has dtype {y.dtype}",
            "Save labels as integer indices or as label-name strings.",
        )
    return [labels.parse(v, record) for record, v in enumerate(values, start=1)]


def load_npz(spec: SiteDataSpec, labels: LabelParser) -> tuple[np.ndarray, list[int]]:
    path = spec.path
    require_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                raise SiteDataError(
                    path,
                    f"missing array {', '.join(repr(k) for k in missing)}; the archive has "
                    f"{', '.join(repr(k) for k in keys) or 'no arrays'}",
                    "Save with np.savez(path, x=images, y=labels).",
                )
            x, y = archive["x"], archive["y"]
    except SiteDataError:
        raise
    except Exception as err:  # corrupt zip, pickled objects, not an npz at all
        raise SiteDataError(
            path, f"not a readable .npz archive ({err})", "Save with np.savez(path, x=images, y=labels)."
        ) from None
    if x.ndim == 0 or len(x) == 0:
        raise SiteDataError(path, "array 'x' holds no images", "Save at least one labelled image.")
    if y.ndim != 1 or len(y) != len(x):
        raise SiteDataError(
            path,
            f"'x' holds {len(x)} images but 'y' has shape {list(y.shape)}",
            "Give exactly one label per image.",
        )
    pixels = _image_pixels(path, x, first_record=1)
    return pixels, _label_array(path, y, labels)


def _read_image_file(path: Path, record: int) -> np.ndarray:
    """One image as an array: PNG/JPEG as 8-bit grayscale, .npy as stored."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        from PIL import Image  # matplotlib depends on Pillow, so it is always installed with privatune

        with Image.open(path) as img:
            return np.asarray(img.convert("L"))
    except Exception as err:
        raise SiteDataError(
            path, f"cannot read the image ({err})", "Re-export it as a PNG or .npy file.", record=record
        ) from None


def load_image_folder(spec: SiteDataSpec, labels: LabelParser) -> tuple[np.ndarray, list[int]]:
    """`root/<label>/*.png|*.jpg|*.npy`; records are numbered in sorted folder, then file-name order."""
    root = spec.path
    if not root.exists():
        raise SiteDataError(root, missing_reason(root, "folder"), "Check data-path in the site's node config.")
    if not root.is_dir():
        raise SiteDataError(root, "is not a folder", "Use format 'npz' for an archive, or point at the folder.")
    files: list[tuple[Path, int]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                raise SiteDataError(
                    entry,
                    "image outside a label folder",
                    f"Move it into {root}/<label>/, one sub-folder per label ({labels.allowed()}).",
                )
            continue  # a README or manifest next to the label folders is fine
        if entry.name in labels.index:
            label = labels.index[entry.name]
        else:
            try:
                label = labels.parse(entry.name, record=0)
            except SiteDataError:
                raise SiteDataError(
                    entry, f"folder name {entry.name!r} is not a label", f"Rename it to one of the {labels.allowed()}."
                ) from None
        for file in sorted(entry.iterdir()):
            if file.name.startswith("."):
                continue
            if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
                raise SiteDataError(
                    file,
                    "not an image file",
                    f"Keep only {', '.join(IMAGE_SUFFIXES)} files in label folders.",
                    record=len(files) + 1,
                )
            files.append((file, label))
    if not files:
        raise SiteDataError(root, "no images found", f"Put images in {root}/<label>/ sub-folders ({labels.allowed()}).")
    pixels = []
    for record, (file, _) in enumerate(files, start=1):
        arr = _read_image_file(file, record)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        pixels.append(_image_pixels(file, arr[None, ...], first_record=record)[0])
    return np.stack(pixels), [label for _, label in files]
