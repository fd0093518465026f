"""Load a partner site's own labelled files into the same LabelledData the presets use, or say exactly why not.

Sites bring their data as CSV or JSON Lines (texts), or as an .npz archive or a folder of per-label images
(images). Every check fails on the FIRST bad record with a SiteDataError that names the file, the record and
line, the reason, and what to change, because a site operator fixing a file has nothing else to go on.

Images are turned into model inputs exactly like the digits preset (`common.datasets`): raw 8x8 digits with
values 0..16 are upscaled the same way, and 28x28 pixels are scaled to [0, 1] and MNIST-normalised, so a
model trained on the preset works on site images and vice versa. Digits must be light on a dark background,
as in MNIST; `describe_site_data` warns when the background looks light.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from privatune.common.datasets import (
    DIGIT_SIDE,
    DIGITS_MAX_VALUE,
    IMAGE_SIDE,
    MAX_TEXT_CHARS,
    MNIST_MEAN,
    MNIST_STD,
    LabelledData,
    pixels_to_model_input,
    upscale_digits,
)

Format = Literal["csv", "jsonl", "npz", "image-folder"]
FORMATS: tuple[str, ...] = ("csv", "jsonl", "npz", "image-folder")
TEXT_FORMATS = ("csv", "jsonl")
IMAGE_FORMATS = ("npz", "image-folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
#: Below this many records per present label, describe_site_data warns: DP noise swamps tiny classes.
FEW_RECORDS_WARNING = 5


@dataclass(frozen=True)
class SiteDataSpec:
    """Where a site's data lies and how to read it (columns apply to csv/jsonl only)."""

    path: Path
    format: Format
    text_column: str = "text"
    label_column: str = "label"


class SiteDataError(ValueError):
    """A site file cannot be used. `record` and `line` are 1-based; None when the whole file is at fault."""

    def __init__(
        self,
        path: Path | str,
        reason: str,
        fix: str,
        record: int | None = None,
        line: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.record = record
        self.line = line
        self.reason = reason
        self.fix = fix
        where = str(self.path)
        if record is not None:
            where += f", record {record}"
        if line is not None and line != record:
            where += f" (line {line})"
        super().__init__(f"{where}: {reason}. {fix}")

    def __reduce__(self):  # keep the fields when the error crosses a process boundary (Ray, multiprocessing)
        return (type(self), (self.path, self.reason, self.fix, self.record, self.line))


# --------------------------------------------------------------------------------------------- helpers


class _LabelParser:
    """Label values may be label names or integer indices into label_names (names win when both match)."""

    def __init__(self, label_names: Sequence[str], path: Path) -> None:
        self.names = tuple(label_names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.path = path

    def allowed(self) -> str:
        return f"allowed labels: {', '.join(self.names)} (or their indices 0..{len(self.names) - 1})"

    def parse(self, value: object, record: int, line: int | None = None) -> int:
        if isinstance(value, str):
            text = value.strip()
            if text in self.index:
                return self.index[text]
            try:
                number: object = int(text)
            except ValueError:
                number = None
        elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            number = int(value)
        else:
            number = None
        if isinstance(number, int) and 0 <= number < len(self.names):
            return number
        raise SiteDataError(
            self.path,
            f"unknown label {value!r}",
            f"Use one of the {self.allowed()}.",
            record=record,
            line=line,
        )


def _require_file(path: Path) -> None:
    if not path.exists():
        raise SiteDataError(path, _missing(path), "Check the data path in the site's configuration.")
    if not path.is_file():
        raise SiteDataError(path, "is not a file", "Point the data path at a file, or use format 'image-folder'.")
    if path.stat().st_size == 0:
        raise SiteDataError(path, "the file is empty", "Export the data again; the file has no bytes.")


def _undecodable(path: Path, bad_char: str, record: int | None, line: int | None) -> SiteDataError:
    byte = ord(bad_char) - 0xDC00  # surrogateescape maps an undecodable byte b to U+DC00 + b
    return SiteDataError(
        path,
        f"undecodable text: byte 0x{byte:02x} is not valid UTF-8",
        "Save the file as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet, or `iconv -f latin1 -t utf-8`).",
        record=record,
        line=line,
    )


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _first_escaped(text: str) -> str | None:
    """The first undecodable byte (as its surrogateescape character) in text, if any."""
    found = _ESCAPED_BYTE.search(text)
    return found.group() if found else None


def _check_text(path: Path, text: object, column: str, record: int, line: int | None) -> str:
    if not isinstance(text, str):
        raise SiteDataError(
            path,
            f"column {column!r} holds {type(text).__name__}, not text",
            f"Put the text in {column!r} as a string.",
            record=record,
            line=line,
        )
    cleaned = text.strip()
    if not cleaned:
        raise SiteDataError(
            path, f"column {column!r} is empty", "Remove the record or fill in its text.", record=record, line=line
        )
    return cleaned[:MAX_TEXT_CHARS]


# ----------------------------------------------------------------------------------------------- texts


def _oversized_field_bytes(content: str, start_line: int, delimiter: str) -> int:
    """Size in bytes of the largest field of the record that starts at ``start_line`` (read without the limit)."""
    rest = content.split("\n", start_line - 1)[-1] if start_line > 1 else content
    old = csv.field_size_limit()
    try:
        csv.field_size_limit(sys.maxsize)
        row = next(csv.reader(io.StringIO(rest, newline=""), delimiter=delimiter), [])
    except csv.Error:
        row = [rest]
    finally:
        csv.field_size_limit(old)
    return max((len(cell.encode("utf-8", errors="surrogateescape")) for cell in row), default=0)


def _missing(path: Path, kind: str = "file") -> str:
    """Why ``path`` cannot be opened: a symlink loop, a dangling symlink, or nothing there."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (the path's links point back at each other)"
        if path.is_symlink():
            return "broken symlink (its target does not exist)"
    return f"{kind} not found"


def _load_csv(spec: SiteDataSpec, labels: _LabelParser) -> tuple[list[str], list[int]]:
    """Comma-, semicolon- or tab-separated, with a header row; the header's first separator decides.

    `record` counts data rows after the header (blank lines skipped); `line` is where the record starts.
    """
    path = spec.path
    _require_file(path)
    # surrogateescape keeps bad bytes in place, so the CSV parser can tell us which record holds them.
    content = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if not content.strip():
        raise SiteDataError(path, "the file holds only whitespace", "Export the data again with a header row.")
    first_line = content.lstrip("\r\n").split("\n", 1)[0]
    # Spreadsheets in many locales export ';' (or tabs); accept them when the header has no comma.
    delimiter = "," if "," in first_line else ";" if ";" in first_line else "\t" if "\t" in first_line else ","
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as err:
        raise SiteDataError(path, f"the header row is not valid CSV ({err})", "Fix the first line.", line=1) from None
    bad = _first_escaped("".join(header))
    if bad is not None:
        raise _undecodable(path, bad, None, 1)
    for column in (spec.text_column, spec.label_column):
        if column not in header:
            raise SiteDataError(
                path,
                f"missing column {column!r}; the header has {', '.join(repr(h) for h in header)}",
                "Rename the column, or set text_column/label_column in the site configuration.",
                line=1,
            )
    text_at, label_at = header.index(spec.text_column), header.index(spec.label_column)
    texts: list[str] = []
    ys: list[int] = []
    record = 0
    while True:
        start_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            if "field larger than field limit" in str(err):
                size = _oversized_field_bytes(content, start_line, delimiter)
                raise SiteDataError(
                    path,
                    f"field too large ({size} bytes), limit {csv.field_size_limit()}",
                    "Shorten the text (privatune reads at most the first "
                    f"{MAX_TEXT_CHARS} characters) or fix a quote that is never closed.",
                    record=record + 1,
                    line=start_line,
                ) from None
            raise SiteDataError(
                path, f"not valid CSV ({err})", "Check the quoting on this record.", record=record + 1, line=start_line
            ) from None
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        record += 1
        bad = _first_escaped("".join(row))
        if bad is not None:
            raise _undecodable(path, bad, record, start_line)
        if len(row) <= max(text_at, label_at):
            raise SiteDataError(
                path,
                f"the record has {len(row)} field(s) but the header has {len(header)}",
                "Quote texts that contain commas, and give every record all columns.",
                record=record,
                line=start_line,
            )
        texts.append(_check_text(path, row[text_at], spec.text_column, record, start_line))
        ys.append(labels.parse(row[label_at], record, start_line))
    if not texts:
        raise SiteDataError(path, "the file has a header but no records", "Add labelled records below the header.")
    return texts, ys


def _load_jsonl(spec: SiteDataSpec, labels: _LabelParser) -> tuple[list[str], list[int]]:
    """One JSON object per line; `record` is the line number (blank lines are skipped)."""
    path = spec.path
    _require_file(path)
    texts: list[str] = []
    ys: list[int] = []
    raw_lines = path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n")
    for number, raw_line in enumerate(raw_lines, start=1):
        line = raw_line.decode("utf-8", errors="surrogateescape")
        bad = _first_escaped(line)
        if bad is not None:
            raise _undecodable(path, bad, number, number)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise SiteDataError(
                path, f"not valid JSON ({err.msg})", "Write one JSON object per line.", record=number
            ) from None
        if not isinstance(obj, dict):
            raise SiteDataError(
                path, f"expected a JSON object, got {type(obj).__name__}", "Write one object per line.", record=number
            )
        for column in (spec.text_column, spec.label_column):
            if column not in obj:
                raise SiteDataError(
                    path,
                    f"missing key {column!r}; the record has {', '.join(repr(k) for k in obj) or 'no keys'}",
                    "Add the key, or set text_column/label_column in the site configuration.",
                    record=number,
                )
        texts.append(_check_text(path, obj[spec.text_column], spec.text_column, number, None))
        ys.append(labels.parse(obj[spec.label_column], number))
    if not texts:
        raise SiteDataError(path, "the file holds no records", "Write one JSON object per line.")
    return texts, ys


# ---------------------------------------------------------------------------------------------- images


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


def _label_array(path: Path, y: np.ndarray, labels: _LabelParser) -> list[int]:
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


def _load_npz(spec: SiteDataSpec, labels: _LabelParser) -> tuple[np.ndarray, list[int]]:
    path = spec.path
    _require_file(path)
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


def _load_image_folder(spec: SiteDataSpec, labels: _LabelParser) -> tuple[np.ndarray, list[int]]:
    """`root/<label>/*.png|*.jpg|*.npy`; records are numbered in sorted folder, then file-name order."""
    root = spec.path
    if not root.exists():
        raise SiteDataError(root, _missing(root, "folder"), "Check the data path in the site's configuration.")
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


# ------------------------------------------------------------------------------------------------- API


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
    parser = _LabelParser(label_names, path)
    names = tuple(label_names)
    if kind == "text":
        texts, ys = (_load_csv if spec.format == "csv" else _load_jsonl)(spec, parser)
        return LabelledData(name, "text", texts, np.asarray(ys, dtype=np.int64), names)
    pixels, ys = (_load_npz if spec.format == "npz" else _load_image_folder)(spec, parser)
    return LabelledData(name, "image", pixels_to_model_input(pixels), np.asarray(ys, dtype=np.int64), names)


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
    per_label = {name: int(c) for name, c in zip(data.label_names, counts)}
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
