"""Recording the hook's verdicts: each reply's entry in the round's record and its row in the server ledger.

Every sampled client gets a ledger row, aggregated or not, so the audit can tell a lost reply from an
unreported spend; a rejected update the site trained for keeps its reported spend (ledger status 'dropped',
and the run record's epsilons). The row builders are pure; ``record_trained``/``record_dropped`` apply them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Message

from privatune.common.accountants import ACCOUNTANTS
from privatune.common.ledger import STATUS_DROPPED, ServerLedger
from privatune.common.protocol import (
    KEY_ACCOUNTANT,
    KEY_DATASET_FINGERPRINT,
    KEY_EPSILON,
    KEY_NOISE_SOURCE,
    NOISE_SOURCES,
    STATUS_BUDGET,
    STATUS_TRAINED,
)
from privatune.server.reasons import one_line
from privatune.server.records import metrics_of, status_of
from privatune.server.replies import Accepted, Dropped
from privatune.server.run_record import NODE_ID, RoundReport, trained_entry
from privatune.server.screening import reported_mechanism

log = logging.getLogger("privatune.server")

MAX_FINGERPRINT_CHARS = 128  # a hex digest, nothing longer (a dropped reply's fingerprint is not screened)


def known_noise_source(status: Mapping[str, Any]) -> str | None:
    """The noise source a reply names, if it is one the ledger takes."""
    source = str(status.get(KEY_NOISE_SOURCE, ""))
    return source if source in NOISE_SOURCES else None


def trained_row(
    run_id: str, server_round: int, node_id: int, verdict: Accepted, status: Mapping[str, Any]
) -> dict[str, Any]:
    """The server-ledger row of an aggregated reply (``ServerLedger.record_report`` arguments)."""
    return dict(
        run_id=run_id,
        round=server_round,
        client_id=verdict.client_id,
        node_id=node_id,
        mechanism=verdict.spend.mechanism,
        epsilon_reported=verdict.spend.epsilon,
        epsilon_dataset_reported=verdict.spend.epsilon_dataset,
        dataset_fingerprint=str(status.get(KEY_DATASET_FINGERPRINT, "")) or None,
        noise_source=known_noise_source(status),
        status=STATUS_TRAINED,
    )


def dropped_row(
    run_id: str,
    server_round: int,
    node_id: int,
    verdict: Dropped,
    reason: str,
    status: Mapping[str, Any],
    mech: Mapping[str, float | int | None],
) -> dict[str, Any]:
    """The server-ledger row of a dropped reply; ``mech``: the in-range part of a spent reply's mechanism."""
    accountant = str(status.get(KEY_ACCOUNTANT, "")) if mech else ""
    fingerprint = str(status.get(KEY_DATASET_FINGERPRINT, "")) if mech else ""
    fingerprint = fingerprint if len(fingerprint) <= MAX_FINGERPRINT_CHARS else ""
    return dict(
        run_id=run_id,
        round=server_round,
        client_id=verdict.client_id,
        node_id=node_id,
        status=STATUS_BUDGET if verdict.budget else STATUS_DROPPED,
        reason=reason,
        accountant=accountant if accountant in ACCOUNTANTS else None,
        dataset_fingerprint=fingerprint or None,
        **mech,
    )


def drop_key(report: RoundReport, cid: str, node_id: int) -> str:
    """The key of a dropped reply in the round's record: its client id, made unique when the id was claimed."""
    key = cid
    if key in report.dropped or key in report.clients:  # a second reply claiming this id
        key = base = f"{cid}@node-{node_id}"
        k = 1
        while key in report.dropped or key in report.clients:
            k += 1
            key = f"{base}#{k}"
    return key


def record_trained(
    report: RoundReport, ledger: ServerLedger | None, run_id: str, server_round: int, msg: Message, verdict: Accepted
) -> None:
    node = int(msg.metadata.src_node_id)
    status = status_of(msg) or {}
    spend = verdict.spend
    # Only what the protocol allows this mode (common.protocol): anything else a client adds is not kept.
    report.clients[verdict.client_id] = trained_entry(
        spend.mechanism,
        epsilon=spend.epsilon,
        epsilon_dataset=spend.epsilon_dataset,
        num_examples=verdict.num_examples,
        node_id=node,
        noise_source=known_noise_source(status),
    )
    if ledger is not None:
        ledger.record_report(**trained_row(run_id, server_round, node, verdict, status))


def record_dropped(
    report: RoundReport, ledger: ServerLedger | None, run_id: str, server_round: int, msg: Message, verdict: Dropped
) -> None:
    """Log and record a reply that is not aggregated. A spent one's mechanism and epsilon are recorded
    (status dropped) and count in the run record's epsilons."""
    reason = one_line(verdict.reason)
    log.warning("round %d: %s not aggregated: %s", server_round, verdict.client_id, reason)
    node = int(msg.metadata.src_node_id)
    key = drop_key(report, verdict.client_id, node)
    report.dropped[key] = reason
    mech: dict[str, float | int | None] = {}
    metrics = metrics_of(msg.content) if verdict.spent else None
    if metrics is not None:
        mech = reported_mechanism(metrics)
        if mech.get("epsilon_reported") is not None:
            report.rejected_spends[key] = {KEY_EPSILON: mech["epsilon_reported"], NODE_ID: node}
    if ledger is not None:
        status = status_of(msg) or {}
        ledger.record_report(**dropped_row(run_id, server_round, node, verdict, reason, status, mech))
