"""What the audit reads: the ledger files under the paths given, each opened through the ledger's verifier.

Separate from the checks because a bad input (a missing path, a folder with no ledger, a bad tolerance) stops the
audit with AuditInputError before anything is checked, while everything wrong inside a ledger is a finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from privatune.common.ledger import LEDGER_GLOB, Inspection, inspect_ledger, site_id_from_ledger_name


class AuditInputError(ValueError):
    """The paths given to the audit do not lead to any ledger (or do not exist)."""


def check_tolerance(tolerance: object) -> float:
    """The audit's tolerance as a float; anything but a number >= 0 is refused."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise AuditInputError(f"tolerance must be a number >= 0, got {tolerance!r}")
    return float(tolerance)


def find_ledgers(paths: Sequence[Path]) -> list[Path]:
    """Ledger files named directly, plus every ``*.ledger.sqlite`` under folders (recursively), de-duplicated."""
    if not paths:
        raise AuditInputError("no paths given: name ledger files or folders that contain *.ledger.sqlite files")
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            hits = sorted(p for p in path.rglob(LEDGER_GLOB) if p.is_file())
            if not hits:
                raise AuditInputError(f"no ledger files ({LEDGER_GLOB}) under {path}")
            for p in hits:
                found.setdefault(p.resolve(), None)
        elif path.is_file():
            found.setdefault(path.resolve(), None)
        else:
            raise AuditInputError(f"{path} does not exist")
    return list(found)


def site_id_from_name(path: Path) -> str | None:
    """The site id a ``site-<id>.ledger.sqlite`` file name gives, or None for any other name."""
    return site_id_from_ledger_name(path.name)


def open_ledger(path: Path) -> Inspection:
    """The file's problems and well-formed rows; raises only when the file vanished (LedgerError)."""
    return inspect_ledger(path)
