"""Per-record privacy budgets: which spends hold which records, and the epsilon of the worst record.

A site's records are known only by keyed ids (16 bytes, ``client/record_ids.py``); a spend names the *cohort* it
sampled from (the exact set of record ids). A record's epsilon is the composition of every spend whose cohort holds
it, with the clipping norm as worst-case sensitivity for each. Records held by the same set of cohorts have the same
history, so the cost is one accountant call per distinct *group*, not one per record.

Framework-free and key-free: the site's guard, ``privatune site check`` and ``privatune audit`` all use it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from privatune.common.accounting import Mechanism, epsilon_of

ID_BYTES = 16


class CohortError(ValueError):
    """A stored cohort that cannot be decoded."""


def pack_ids(record_ids: Iterable[bytes]) -> str:
    """Sorted, distinct ids as base64 text (what the ledger's ``cohorts.ids`` column holds)."""
    ids = sorted(set(record_ids))
    if any(not isinstance(i, bytes) or len(i) != ID_BYTES for i in ids):
        raise CohortError(f"record ids must be {ID_BYTES}-byte strings")
    return base64.b64encode(b"".join(ids)).decode("ascii")


def unpack_ids(packed: str) -> list[bytes]:
    try:
        raw = base64.b64decode(packed.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError) as exc:
        raise CohortError(f"a cohort's ids are not valid base64: {exc}") from None
    if len(raw) % ID_BYTES:
        raise CohortError(f"a cohort's ids are {len(raw)} bytes, not a multiple of {ID_BYTES}")
    return [raw[i : i + ID_BYTES] for i in range(0, len(raw), ID_BYTES)]


def cohort_id_of(packed: str) -> str:
    """sha256 of the packed ids. Unkeyed on purpose: the ids are already keyed pseudonyms, so this reveals nothing
    about the records and lets the audit check, without the site key, that a cohort row matches its id."""
    return hashlib.sha256(b"privatune.cohort\0" + packed.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Spend:
    """One spend as the budget sees it. ``cohort`` None: a spend from before cohorts (counts for every record)."""

    mechanism: Mechanism
    cohort: str | None
    run_id: str


def holders(record_ids: Sequence[bytes], cohorts: Mapping[str, frozenset[bytes]]) -> list[frozenset[str]]:
    """For each record, the set of cohort ids that hold it."""
    wanted = set(record_ids)
    held: dict[bytes, list[str]] = defaultdict(list)
    for cid, members in cohorts.items():
        for rid in members & wanted:
            held[rid].append(cid)
    return [frozenset(held.get(rid, ())) for rid in record_ids]


def group_records(
    record_ids: Sequence[bytes], cohorts: Mapping[str, frozenset[bytes]]
) -> dict[frozenset[str], list[int]]:
    """Indices of ``record_ids`` grouped by the set of cohorts holding them."""
    groups: dict[frozenset[str], list[int]] = defaultdict(list)
    for i, key in enumerate(holders(record_ids, cohorts)):
        groups[key].append(i)
    return dict(groups)


def group_history(group: frozenset[str], spends: Sequence[Spend], run_id: str | None = None) -> list[Mechanism]:
    """The mechanisms a record of ``group`` went through (only those of ``run_id`` when given)."""
    return [
        s.mechanism
        for s in spends
        if (s.cohort is None or s.cohort in group) and (run_id is None or s.run_id == run_id)
    ]


EpsilonFn = Callable[[Sequence[Mechanism], float, str], float]


def _default_eps(history: Sequence[Mechanism], delta: float, accountant: str) -> float:
    return epsilon_of(history, delta, accountant)


@dataclass(frozen=True)
class RecordEpsilons:
    """Per-record epsilons of a set of records (``spent`` over all runs, ``run`` within one run)."""

    spent: list[float]
    run: list[float]

    @property
    def worst(self) -> float:
        return max(self.spent, default=0.0)

    @property
    def worst_run(self) -> float:
        return max(self.run, default=0.0)


def record_epsilons(
    record_ids: Sequence[bytes],
    cohorts: Mapping[str, frozenset[bytes]],
    spends: Sequence[Spend],
    delta: float,
    accountant: str,
    *,
    new: Sequence[Mechanism] = (),
    run_id: str | None = None,
    eps: EpsilonFn = _default_eps,
) -> RecordEpsilons:
    """Each record's epsilon after every recorded spend holding it plus ``new`` (a spend about to apply to all of
    ``record_ids``); ``run`` composes only the spends of ``run_id`` (plus ``new``)."""
    spent = [0.0] * len(record_ids)
    run = [0.0] * len(record_ids)
    cache: dict[tuple[Mechanism, ...], float] = {}

    def cached(history: list[Mechanism]) -> float:
        key = tuple(sorted(history))  # composition does not depend on order: groups with equal multisets share
        if key not in cache:
            cache[key] = eps(list(key), delta, accountant)
        return cache[key]

    for group, idx in group_records(record_ids, cohorts).items():
        e_all = cached(group_history(group, spends) + list(new))
        e_run = cached(group_history(group, spends, run_id) + list(new)) if run_id is not None else e_all
        for i in idx:
            spent[i], run[i] = e_all, e_run
    return RecordEpsilons(spent, run)
