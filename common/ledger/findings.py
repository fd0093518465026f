"""What a verification has found so far: the one collector every pass reports to.

Separate so that the file passes (``verify``) and the chain pass (``chain``) share it without importing each
other; it keeps one problem per (table, row, kind) and sorts them the way reports list them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privatune.common.ledger.errors import PROBLEM_KINDS, ChainProblem
from privatune.common.ledger.schema import _SCHEMAS, HEADS_TABLE, SCHEMA_VERSION


class Findings:
    """The problems found so far, one per (table, row, kind) (file-level ones also per message)."""

    def __init__(self, path: Path, schema: str | None = None):
        self.path = path
        self.schema = schema
        self.version = SCHEMA_VERSION
        self.meta: dict[str, Any] = {}
        self.unusable: set[str] = set()  # declared tables missing from the file: no row pass
        self._found: dict[tuple[Any, ...], ChainProblem] = {}

    def add(self, table: str | None, seq: int | None, kind: str, detail: str) -> None:
        key = (table, seq, kind, detail if seq is None else "")
        self._found.setdefault(key, ChainProblem(seq=seq, kind=kind, detail=detail, table=table))

    def sorted(self) -> list[ChainProblem]:
        order = {t: i for i, t in enumerate([HEADS_TABLE, *(_SCHEMAS.get(self.schema or "", {}))])}

        def key(p: ChainProblem) -> tuple[int, int, int]:
            t = -1 if p.table is None else order.get(p.table, len(order))
            return (t, -1 if p.seq is None else p.seq, PROBLEM_KINDS.index(p.kind))

        return sorted(self._found.values(), key=key)
