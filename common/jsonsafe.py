"""JSON has no inf/NaN: one conversion for every file privatune writes (summaries, audits, reports)."""

from __future__ import annotations

import math
from typing import Any


def jsonable(value: Any) -> Any:
    """Non-finite floats become the strings "inf", "-inf", "nan" (float() reads them back); recursive."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
