"""The hash-chain pass of verification, per chained table: which row was edited, deleted, inserted or moved.

The subtle part of verifying a ledger, kept apart from the file-level passes (``verify``): it takes one table's
well-formed rows and its head record and names each tampered row once, as the one cause that explains it, instead
of the cascade of broken links that follows it. Loops are bounded by the number of stored rows, whatever a corrupt
count or seq says.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from privatune.common.ledger.findings import Findings
from privatune.common.ledger.schema import GENESIS_HASH, _finish, _hash_prefix, _real_columns, hashed_fields

_MAX_LISTED = 20  # missing rows listed one by one before they are summarised as a range
_MAX_SEARCH = 1024  # how far past the stored rows a moved row's original position is searched for


def _candidate_seqs(stored: int, hint: int, upper: int) -> Iterator[int]:
    """Positions in [1, upper] a moved row might have been hashed at: first the shift seen on the previous moved
    row, then outward from where it is stored (at most ``upper`` candidates)."""
    if hint != 0 and 1 <= stored + hint <= upper:
        yield stored + hint
    centre = min(max(stored, 1), upper)
    for d in range(upper + 1):
        for cand in (centre,) if d == 0 else (centre + d, centre - d):
            if 1 <= cand <= upper and cand != stored and cand != stored + hint:
                yield cand
        if centre + d >= upper and centre - d <= 1:
            return


class ChainCheck:
    """One table's hash chain under check: where each row was written, which rows are edited, and which row holds
    each position. ``run`` makes the sub-passes in order; each reads what the ones before it settled."""

    def __init__(
        self,
        found: Findings,
        table: str,
        columns: Sequence[tuple[str, str]],
        rows: list[dict[str, Any]],
        head: tuple[int, str] | None,
        malformed: set[int],
    ):
        self.found, self.table = found, table
        names = [name for name, _ in columns]
        reals = _real_columns(columns)
        self.prefixes = {
            r["seq"]: _hash_prefix(table, hashed_fields(table, names, r), reals, r["prev_hash"]) for r in rows
        }
        self.rows = rows
        self.by_seq = {r["seq"]: r for r in rows}
        self.head = head
        self.count = head[0] if head else 0
        self.malformed = malformed
        self.position: dict[int, int] = {}  # stored seq -> position in the chain it was written at
        self.edited: set[int] = set()
        self.chosen: dict[int, int] = {}  # position -> stored seq of the row taken as genuine
        self.holders: dict[int, list[int]] = {}

    def run(self) -> None:
        """Every sub-pass, in order: rows against their own hashes, order, one row per position, gaps, links, head."""
        self.place()
        self.reorders()
        self.choose()
        self.gaps()
        self.links()
        self.head_record()

    def add(self, seq: int, kind: str, detail: str) -> None:
        self.found.add(self.table, seq, kind, detail)

    def hash_at(self, row: dict[str, Any], seq: int) -> str:
        return _finish(self.prefixes[row["seq"]], seq)

    def place(self) -> None:
        """Each row against its own hash: intact, moved (its hash is valid at another position) or edited."""
        n = len(self.rows) + len(self.malformed)
        upper = min(max(self.count, n) + 1, n + 1 + _MAX_SEARCH)
        hint = 0
        for r in self.rows:
            s = r["seq"]
            if self.hash_at(r, s) == r["hash"]:
                self.position[s] = s
                continue
            moved_to = next((c for c in _candidate_seqs(s, hint, upper) if self.hash_at(r, c) == r["hash"]), None)
            if moved_to is None:
                self.edited.add(s)
                self.position[s] = s
                self.add(
                    s,
                    "edited",
                    f"row {s}'s contents no longer match its stored hash: a field was changed after it was written",
                )
            else:
                self.position[s] = moved_to
                hint = moved_to - s
        if self.head is not None:
            at = [
                self.position[r["seq"]] for r in self.rows if r["hash"] == self.head[1] and r["seq"] not in self.edited
            ]
            if at and max(at) != self.count:
                self.add(
                    0,
                    "edited",
                    f"the chain head records {self.count} rows but its last hash is row "
                    f"{max(at)}'s: the head's count was changed",
                )
                self.count = max(at)
                self.head = (self.count, self.head[1])

    def reorders(self) -> None:
        """Rows written at one position but stored at another: out of order relative to their neighbours, or
        renumbered in a way no deletion or insertion explains (those are reported at the gap or the intruder)."""
        stored_order = [r["seq"] for r in self.rows]
        prefix_max, running = [], -1
        for s in stored_order:
            prefix_max.append(running)
            running = max(running, self.position[s])
        suffix_min, low = [0.0] * len(stored_order), math.inf
        for i in range(len(stored_order) - 1, -1, -1):
            suffix_min[i] = low
            low = min(low, self.position[stored_order[i]])
        for i, s in enumerate(stored_order):
            p = self.position[s]
            if p != s and (prefix_max[i] > p or suffix_min[i] < p):
                self.add(s, "reordered", f"row stored as seq {s} was written as row {p}: rows were moved")
            elif p != s and s != i + 1:
                # In order, but not where closing a gap (a deletion) or making room (an insertion) would have
                # renumbered it: its seq alone was changed.
                self.add(s, "reordered", f"row stored as seq {s} was written as row {p}: it was renumbered")

    def choose(self) -> None:
        """One genuine row per position; the others claiming it were inserted."""
        for s in (r["seq"] for r in self.rows):
            self.holders.setdefault(self.position[s], []).append(s)
        for p in sorted(self.holders):
            cands = self.holders[p]
            if len(cands) == 1:
                self.chosen[p] = cands[0]
                continue
            referenced = {self.by_seq[s]["prev_hash"] for s in self.holders.get(p + 1, [])}
            if self.head and p == self.count:
                referenced.add(self.head[1])
            genuine = next(
                (s for s in cands if self.by_seq[s]["hash"] in referenced), next((s for s in cands if s == p), cands[0])
            )
            self.chosen[p] = genuine
            for s in cands:
                if s != genuine:
                    self.add(
                        s,
                        "inserted",
                        f"row stored as seq {s} claims chain position {p}, which another row holds: it was inserted",
                    )

    def gaps(self) -> None:
        """Positions up to the head's count (or the last row, without a head) that no row holds: deleted."""
        end = self.count if self.head is not None else max(self.chosen, default=0)
        present = sorted(p for p in self.chosen if p <= end)
        last_present = max(self.chosen, default=0)
        prev = 0
        for p in [*present, end + 1]:
            missing = [m for m in range(prev + 1, min(p, prev + 1 + _MAX_LISTED + 1)) if m not in self.malformed]
            size = p - prev - 1
            if size > _MAX_LISTED:
                first = prev + 1
                why = "the tail was truncated" if first > last_present else "they were deleted"
                self.add(
                    first,
                    "deleted",
                    f"rows {first} to {p - 1} ({size} rows) are missing (the chain head "
                    f"records {self.count} rows): {why}",
                )
            else:
                for m in missing:
                    why = "the tail was truncated" if m > last_present else "it was deleted"
                    self.add(m, "deleted", f"row {m} is missing (the chain head records {self.count} rows): {why}")
            prev = p

    def links(self) -> None:
        """Each chosen row's prev_hash against the row before it."""
        hashes = {self.by_seq[s]["hash"]: p for p, s in self.chosen.items()}
        for p in sorted(self.chosen):
            s = self.chosen[p]
            if p > 1 and p - 1 not in self.chosen:
                continue  # explained by the deletion (or malformed row) reported already
            expected = GENESIS_HASH if p == 1 else self.by_seq[self.chosen[p - 1]]["hash"]
            prev = self.by_seq[s]["prev_hash"]
            if prev == expected or s in self.edited:
                continue
            two_back = (
                GENESIS_HASH if p == 2 else (self.by_seq[self.chosen[p - 2]]["hash"] if p - 2 in self.chosen else None)
            )
            if p >= 2 and prev == two_back:
                q = self.chosen[p - 1]
                self.add(
                    q,
                    "inserted",
                    f"row {q} does not belong to the chain: row {p}'s prev_hash skips it and points to row {p - 2}",
                )
            elif prev in hashes:
                self.add(s, "reordered", f"row {s}'s prev_hash points to row {hashes[prev]}, not to the row before it")
            elif p >= 2:
                q = self.chosen[p - 1]
                self.add(
                    q,
                    "edited",
                    f"row {q} was rewritten and its hash recomputed: row {p}'s prev_hash no "
                    "longer matches it (or rows between them were removed and the rest renumbered)",
                )
            else:
                self.add(s, "edited", f"row {s} is the first row but its prev_hash is not the genesis hash")

    def head_record(self) -> None:
        """Rows past the head's count were added outside the ledger; its hash must be the last row's."""
        if self.head is None:
            self.add(
                0,
                "deleted",
                "the chain head record (row count and last hash) is missing: truncation of the "
                "tail cannot be ruled out",
            )
            return
        for p in sorted(self.holders):
            if p > self.count:
                for s in self.holders[p]:
                    self.add(
                        s,
                        "inserted",
                        f"row stored as seq {s} lies beyond the {self.count} rows the chain "
                        "head records: it was added outside the ledger",
                    )
        if self.count == 0 and self.head[1] != GENESIS_HASH:
            self.add(0, "edited", "the chain head records no rows but a non-genesis hash")
        elif self.count in self.chosen and self.by_seq[self.chosen[self.count]]["hash"] != self.head[1]:
            q = self.chosen[self.count]
            self.add(
                q,
                "edited",
                f"row {q}'s hash does not match the chain head's last hash: it was rewritten (or the head record was)",
            )
