"""What can go wrong with a ledger: the LedgerError family and ChainProblem, one problem a verification found.

Separate so that every other ledger module (names, records, storage, verification) can raise and report without
importing one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROBLEM_KINDS = ("malformed", "edited", "deleted", "inserted", "reordered")


class LedgerError(RuntimeError):
    """A ledger file cannot be opened, read or written as asked."""


class LedgerVersionError(LedgerError):
    """The ledger is sound but of an older version this privatune does not write (migrate it)."""


class LedgerIntegrityError(LedgerError):
    """The ledger failed verification; ``problems`` lists what ``verify_chain`` found."""

    def __init__(self, path: Path, problems: Sequence[ChainProblem]):
        self.path = Path(path)
        self.problems = list(problems)
        listed = "; ".join(p.describe() for p in self.problems[:5])
        more = f" and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
        super().__init__(
            f"ledger {self.path} failed verification: {listed}{more}. The recorded privacy spend cannot be trusted. "
            f"{recovery_advice(self.path)}."
        )


@dataclass(frozen=True)
class ChainProblem:
    """One problem in a ledger file. ``seq``: the row's sequence number (0: the chain's head record; None: the
    table, or with ``table`` None the file, as a whole). ``kind`` is one of PROBLEM_KINDS: "malformed" for
    anything that is not a well-formed ledger (unreadable file, wrong structure, a value of the wrong type)."""

    seq: int | None
    kind: str  # one of PROBLEM_KINDS
    detail: str
    table: str | None = "spend"

    def describe(self) -> str:
        if self.table is None:
            where = "the file"
        elif self.seq is None:
            where = f"table {self.table}"
        elif self.seq == 0:
            where = f"{self.table} head"
        else:
            where = f"{self.table} row {self.seq}"
        return f"{where}: {self.kind} ({self.detail})"


def recovery_advice(path: Path) -> str:
    """What to do with a ledger that cannot be trusted: never re-create it (its spends would be forgotten)."""
    return (
        f"Do not delete or re-create {Path(path).name}: the privacy spend it records would be forgotten. Keep "
        f"the file as evidence, audit it with `privatune audit {path}`, and restore the ledger from a backup; "
        "the site must not train until then"
    )
