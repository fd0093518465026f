"""The ledger's loosely typed numbers, read (``num``) and written (``fmt``, ``eps_text``) one way across the audit.

Separate because the checks (in their messages), the report model, the renderings and the plots all need the same
two conversions, and none of them should import another only for these.
"""

from __future__ import annotations

import math
from typing import Any


def num(value: Any) -> float | None:
    """The value as a float when it is a real number (a bool is not), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fmt(value: Any, digits: int = 4) -> str:
    """A number as it reads in a message or a table: ``—`` for missing, ``∞``, ``nan``, else ``digits`` digits."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}g}"


def eps_text(value: Any) -> str:
    """An epsilon as every table of the audit shows it (console and Markdown alike): three decimals when finite."""
    return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else fmt(value)


def short_fingerprint(fingerprint: str, keep: int = 12) -> str:
    """A dataset fingerprint cut for a table (the JSON carries it whole)."""
    return fingerprint if len(fingerprint) <= keep else fingerprint[:keep] + "…"
