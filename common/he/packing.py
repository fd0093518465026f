"""Packing: a state's float tensors <-> one float64 vector (``Layout`` records the shapes), and that vector
<-> the complex CKKS slots of whole ciphertexts.

Pure numpy, separate from the SEAL code so that the layout (which travels in every payload's metadata) and
the two-reals-per-slot view can be read and tested without keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from privatune.common.he.errors import HEFormatError, HEInputError

__all__ = ["Layout", "flatten_state", "from_slots", "layout_diff", "to_slots", "unflatten"]

_FLOAT_DTYPES = ("float16", "float32", "float64")
_MAX_LAYOUT_VALUES = 2**34  # refuse absurd metadata before allocating anything


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the flattened tensors, in packing order. JSON-serialisable."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def total(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
            "total": self.total,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        try:
            names = tuple(d["names"])
            shapes = tuple(tuple(int(x) for x in s) for s in d["shapes"])
            dtypes = tuple(d["dtypes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HEFormatError(f"malformed layout: {exc!r}") from exc
        if not (len(names) == len(shapes) == len(dtypes)):
            raise HEFormatError("malformed layout: names, shapes and dtypes differ in length")
        if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise HEFormatError("malformed layout: names must be distinct strings")
        if any(x < 0 for s in shapes for x in s):
            raise HEFormatError("malformed layout: negative dimension")
        if any(t not in _FLOAT_DTYPES for t in dtypes):
            raise HEFormatError(f"malformed layout: dtypes must be among {_FLOAT_DTYPES}")
        layout = cls(names, shapes, dtypes)
        if layout.total > _MAX_LAYOUT_VALUES:
            raise HEFormatError(f"malformed layout: {layout.total} values is beyond any model this runs")
        if "total" in d and int(d["total"]) != layout.total:
            raise HEFormatError(f"malformed layout: total {d['total']} != {layout.total} from the shapes")
        return layout

    @classmethod
    def from_json(cls, s: str | bytes) -> Layout:
        try:
            d = json.loads(s)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HEFormatError(f"malformed layout JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise HEFormatError("malformed layout JSON: not an object")
        return cls.from_dict(d)


def layout_diff(a: Layout, b: Layout) -> str:
    """The first way ``b`` differs from the expected ``a``, for a log line."""
    if a.names != b.names:
        missing = [n for n in a.names if n not in b.names]
        extra = [n for n in b.names if n not in a.names]
        if missing or extra:
            return f"missing parameters {missing[:5]}, unexpected {extra[:5]}"
        return "parameters in a different order"
    for n, sa, sb, da, db in zip(a.names, a.shapes, b.shapes, a.dtypes, b.dtypes, strict=False):
        if sa != sb:
            return f"parameter {n!r} has shape {list(sb)}, expected {list(sa)}"
        if da != db:
            return f"parameter {n!r} has dtype {db}, expected {da}"
    return "layouts differ"


def flatten_state(state: Mapping[str, Any]) -> tuple[np.ndarray, Layout]:
    """Concatenate float tensors (in mapping order) into one float64 vector and record the layout."""
    names, shapes, dtypes, parts = [], [], [], []
    for name, value in state.items():
        if not isinstance(name, str):
            raise HEInputError(f"parameter names must be strings, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype.name not in _FLOAT_DTYPES:
            raise HEInputError(
                f"parameter {name!r} has dtype {arr.dtype}; only float16/32/64 trainable parameters can be "
                "encrypted (convert bfloat16 to float32, keep integer buffers out of the trainable state)"
            )
        names.append(name)
        shapes.append(tuple(int(x) for x in arr.shape))
        dtypes.append(arr.dtype.name)
        parts.append(arr.astype(np.float64, copy=False).ravel())
    vec = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return vec, Layout(tuple(names), tuple(shapes), tuple(dtypes))


def unflatten(vec: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Inverse of ``flatten_state``: tensors with their original shapes and dtypes."""
    vec = np.asarray(vec)
    if vec.ndim != 1 or vec.size != layout.total:
        raise HEInputError(f"vector of shape {vec.shape} does not fit a layout of {layout.total} values")
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes, strict=False):
        size = math.prod(shape)
        out[name] = vec[pos : pos + size].reshape(shape).astype(dtype)
        pos += size
    return out


def to_slots(vec: np.ndarray, values_per_chunk: int) -> list[np.ndarray]:
    """``vec`` zero-padded to whole chunks (at least one), each viewed as ``values_per_chunk / 2`` complex
    slots: ``x[2k] + i*x[2k+1]``, two reals per CKKS slot."""
    n_chunks = max(1, -(-vec.size // values_per_chunk))
    padded = np.zeros(n_chunks * values_per_chunk, dtype=np.float64)
    padded[: vec.size] = vec
    z = padded.view(np.complex128)
    half = values_per_chunk // 2
    return [z[j * half : (j + 1) * half] for j in range(n_chunks)]


def from_slots(parts: Iterable[Any], n_values: int) -> np.ndarray:
    """Inverse of ``to_slots``: the first ``n_values`` reals of the decoded chunks' complex slots."""
    return np.concatenate([np.asarray(p, dtype=np.complex128).view(np.float64) for p in parts])[:n_values]
