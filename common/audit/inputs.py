"""What the audit reads: the ledger files under the paths given, each opened through the ledger's verifier, and
the name each ledger goes by in the audit's outputs.

Separate from the checks because a bad input (a missing path, a folder with no ledger, a bad tolerance) stops the
audit with AuditInputError before anything is checked, while everything wrong inside a ledger is a finding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from privatune.common.ledger import (
    LEDGER_GLOB,
    LEDGER_SUFFIX,
    SERVER_SCHEMA,
    SITE_SCHEMA,
    Inspection,
    inspect_ledger,
    site_id_from_ledger_name,
)

#: A folder is searched for ``*.ledger.sqlite`` and for this plain name, the one docs/deploy-site.md gives a site's
#: ``ledger-path``: three sites' ledgers copied into three folders are all called this.
PLAIN_LEDGER_NAME = "ledger.sqlite"
SERVER_NAME = "server"  # what a server ledger is called in the outputs


class AuditInputError(ValueError):
    """The paths given to the audit do not lead to any ledger (or do not exist)."""


def check_tolerance(tolerance: object) -> float:
    """The audit's tolerance as a float; anything but a number >= 0 is refused."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise AuditInputError(f"tolerance must be a number >= 0, got {tolerance!r}")
    return float(tolerance)


def _is_ledger_name(path: Path) -> bool:
    return path.name == PLAIN_LEDGER_NAME or path.match(LEDGER_GLOB)


def find_ledgers(paths: Sequence[Path]) -> list[Path]:
    """Ledger files named directly, plus every ``*.ledger.sqlite`` and ``ledger.sqlite`` under folders
    (recursively), de-duplicated."""
    if not paths:
        raise AuditInputError("no paths given: name ledger files or folders that contain *.ledger.sqlite files")
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            hits = sorted(p for p in path.rglob("*.sqlite") if _is_ledger_name(p) and p.is_file())
            if not hits:
                raise AuditInputError(f"no ledger files ({LEDGER_GLOB} or {PLAIN_LEDGER_NAME}) under {path}")
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


def _base_name(path: Path, found: Inspection | None) -> str:
    """What a ledger is called before name clashes are settled: a site ledger by the site id its rows record
    (several: joined with ``+``), a server ledger ``server``; otherwise by its file name ``site-<id>.ledger.sqlite``
    or ``<name>.ledger.sqlite``, and a plain ``ledger.sqlite`` by the folder that holds it."""
    if found is not None and found.schema == SITE_SCHEMA:
        ids = dict.fromkeys(str(r["site_id"]) for r in found.rows.get("spend", []) if r.get("site_id"))
        if ids:
            return "+".join(ids)
    if found is not None and found.schema == SERVER_SCHEMA:
        return SERVER_NAME
    named = site_id_from_ledger_name(path.name)
    if named:
        return named
    stem = path.name[: -len(LEDGER_SUFFIX)] if path.name.endswith(LEDGER_SUFFIX) else path.stem
    if stem in ("", "ledger") and path.parent.name:
        return path.parent.name
    return stem or path.name


def ledger_names(found: Mapping[Path, Inspection | None]) -> dict[str, str]:
    """Each ledger's name in the audit's outputs (by its path as text), distinct across ``found``: a name two
    ledgers would share (the same site's ledger in two folders, two server ledgers) gets the shortest end of its
    path that tells them apart, e.g. ``s1 (backup/ledger.sqlite)``."""
    base = {path: _base_name(path, insp) for path, insp in found.items()}
    out: dict[str, str] = {}
    for name in dict.fromkeys(base.values()):
        same = [p for p, n in base.items() if n == name]
        if len(same) == 1:
            out[str(same[0])] = name
            continue
        depth = 1
        while len({p.parts[-depth:] for p in same}) < len(same) and depth < max(len(p.parts) for p in same):
            depth += 1
        for p in same:
            out[str(p)] = f"{name} ({'/'.join(p.parts[-depth:])})"
    return out
