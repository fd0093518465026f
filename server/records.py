"""Typed reads of a message's records: Flower types each RecordDict value as any of its three record kinds.

The status and metrics records are read key by key, whatever kind a peer sent (a wrong kind then fails the
checks on its values, as it always did), so they come back as a plain Mapping. An update is used as arrays, so
it comes back as an ArrayRecord or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict

from privatune.common.protocol import RECORD_ARRAYS, RECORD_METRICS, RECORD_STATUS


def status_of(msg: Message) -> Mapping[str, Any] | None:
    """A reply's status record; None for a reply without content (an error) or without one."""
    if not msg.has_content():
        return None
    return msg.content.get(RECORD_STATUS)


def metrics_of(content: RecordDict) -> Mapping[str, Any] | None:
    """A reply's metrics record, if it has one."""
    return content.get(RECORD_METRICS)


def arrays_of(content: RecordDict) -> ArrayRecord | None:
    """The update (or global weights) a message carries, when it is an ArrayRecord."""
    record = content.get(RECORD_ARRAYS)
    return record if isinstance(record, ArrayRecord) else None


def screened_arrays(content: RecordDict) -> ArrayRecord:
    """The update of a reply that passed screening (screening admits none without one)."""
    record = arrays_of(content)
    if record is None:
        raise TypeError(f"a screened reply has no {RECORD_ARRAYS!r} ArrayRecord")
    return record
