"""The reply-screening hook: one train reply as Flower delivers it goes in, a verdict comes out.

The checks themselves are pure functions on values (``privatune.server.screening``); this module reads a
Message's records, runs them in order, and says whether the reply is aggregated (``Accepted``, with the spend
it reports) or dropped (``Dropped``, with its one-line reason). Under HE an accepted update is added to the
round's running sum here, so every ciphertext is parsed once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from privatune.common.config import RunConfig
from privatune.common.optimizers import OPTIMIZER_SGD
from privatune.common.protocol import (
    KEY_CLIENT_ID,
    KEY_NUM_EXAMPLES,
    KEY_REASON,
    KEY_STATUS,
    RECORD_ARRAYS,
    RECORD_STATUS,
    STATUS_BUDGET,
    STATUS_TRAINED,
)
from privatune.server.aggregation import UpdateRejected
from privatune.server.reasons import one_line
from privatune.server.records import arrays_of, metrics_of
from privatune.server.screening import (
    ReplyGuard,
    ReportedSpend,
    check_accountant,
    check_mechanism,
    check_num_examples,
    check_plain_arrays,
    check_values,
    dp_change_bound,
    spend_of,
    update_digest,
)

if TYPE_CHECKING:
    from privatune.common.he import HEAccumulator


@dataclass(frozen=True)
class Identity:
    """Who a reply says it is and what it says happened."""

    client_id: str  # the reply's client-id, else node-<id>
    status: str | None  # None: an error reply, or one without a status record
    reason: str


def identify(msg: Message) -> Identity:
    """The reply's client id, status and reason, read without trusting any of them."""
    node = f"node-{msg.metadata.src_node_id}"
    if msg.has_error():
        return Identity(node, None, f"client error: {one_line(msg.error.reason)}")
    content = msg.content
    if RECORD_STATUS not in content:
        return Identity(node, None, "reply has no status record")
    st = content[RECORD_STATUS]
    cid = str(st.get(KEY_CLIENT_ID, node)) or node
    return Identity(cid, str(st.get(KEY_STATUS, "")), str(st.get(KEY_REASON, "")))


@dataclass(frozen=True)
class ScreeningRules:
    """What a run's updates must look like (from its config and its model's trainable parameters)."""

    expected_shapes: Mapping[str, tuple[int, ...]]
    weights_by_count: bool  # plaintext FedAvg weights by num-examples (else no count is sent)
    private: bool
    batch_size: int
    local_epochs: int
    max_lr: float  # the largest group learning rate (lr x max(1, backbone scale))
    max_grad_norm: float
    accountant: str  # the run's accountant: a reply that names none uses it
    optimizer: str = OPTIMIZER_SGD  # the run's optimiser (run config): it sets how far an honest update moves

    @classmethod
    def for_run(
        cls, cfg: RunConfig, expected_shapes: Mapping[str, tuple[int, ...]], weights_by_count: bool
    ) -> ScreeningRules:
        return cls(
            expected_shapes=dict(expected_shapes),
            weights_by_count=weights_by_count,
            private=cfg.private,
            batch_size=cfg.batch_size,
            local_epochs=cfg.local_epochs,
            max_lr=cfg.lr * max(1.0, cfg.backbone_lr_scale),
            max_grad_norm=cfg.max_grad_norm,
            accountant=cfg.accountant,
            optimizer=cfg.optimizer,
        )

    @property
    def expected_length(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.expected_shapes.values()))


@dataclass(frozen=True)
class Accepted:
    """A reply to aggregate, and the spend its site reports."""

    client_id: str
    spend: ReportedSpend
    num_examples: int | None  # the FedAvg weight it sent, when the run weights by it


@dataclass(frozen=True)
class Dropped:
    """A reply that is not aggregated, and why."""

    client_id: str
    reason: str
    budget: bool = False  # the site's privacy budget forbids the round (ledger status budget-exhausted)
    spent: bool = False  # the site trained for it: the spend it reports is recorded


def screen_train_reply(
    msg: Message,
    guard: ReplyGuard,
    rules: ScreeningRules,
    global_state: Mapping[str, np.ndarray] | None = None,
    accumulator: HEAccumulator | None = None,
) -> Accepted | Dropped:
    """Errors, duplicates and replays, refusals, then the update itself (``check_update``)."""
    who = identify(msg)
    cid = who.client_id
    if who.status is None:  # an error reply (e.g. Flower's "Node Unavailable", made by the SuperLink): no update
        return Dropped(cid, who.reason)
    why = guard.check_identity(int(msg.metadata.src_node_id), cid, msg.metadata.reply_to_message_id)
    if why is not None:
        return Dropped(cid, why)
    if who.status == STATUS_BUDGET:
        return Dropped(cid, who.reason, budget=True)
    if who.status != STATUS_TRAINED:
        return Dropped(cid, f"{who.status}: {who.reason}")
    arrays = arrays_of(msg.content)
    if arrays is not None:
        why = guard.check_update(update_digest(arrays), cid)
        if why is not None:  # a copy of an update already counted: no new spend
            return Dropped(cid, why)
    try:
        spend, n = check_update(msg.content, rules, global_state, accumulator)
    except UpdateRejected as err:
        # The site trained (and recorded the spend) even though its update is refused.
        return Dropped(cid, f"update rejected: {err}", spent=True)
    return Accepted(cid, spend, n if rules.weights_by_count else None)


def check_update(
    content: RecordDict,
    rules: ScreeningRules,
    global_state: Mapping[str, np.ndarray] | None = None,
    accumulator: HEAccumulator | None = None,
) -> tuple[ReportedSpend, int]:
    """Screen one trained reply's mechanism and update; under HE, add the update to ``accumulator``.
    Returns the spend and the example count (sent, or bounded from the sampling rate)."""
    metrics = metrics_of(content)
    if RECORD_ARRAYS not in content or metrics is None:
        raise UpdateRejected("a 'trained' reply without arrays or metrics")
    checked = check_mechanism(metrics)
    if rules.weights_by_count:  # plaintext FedAvg by example count; under HE the weight is encrypted
        n = check_num_examples(metrics.get(KEY_NUM_EXAMPLES))
    else:  # no count is sent: q = 1/ceil(n/B) bounds n by B/q, enough for the magnitude bound below
        n = max(1, math.ceil(rules.batch_size / float(checked["sample_rate"] or 1.0)))
    accountant = check_accountant(content[RECORD_STATUS], rules.accountant)
    spend = spend_of(metrics, checked, accountant)
    if accumulator is not None:
        _add_encrypted(accumulator, content[RECORD_ARRAYS])
        return spend, n
    arrays = content[RECORD_ARRAYS]
    check_plain_arrays(arrays, rules.expected_shapes)
    if not isinstance(arrays, ArrayRecord):  # every value declared float32 above: only an ArrayRecord does
        raise UpdateRejected(f"the {RECORD_ARRAYS!r} record is not an ArrayRecord")
    state = {k: v.numpy() for k, v in arrays.items()}
    if rules.private and global_state is not None:
        bound = dp_change_bound(
            num_examples=n,
            batch_size=rules.batch_size,
            epochs=rules.local_epochs,
            lr=rules.max_lr,
            max_grad_norm=rules.max_grad_norm,
            noise_multiplier=spend.mechanism.noise_multiplier,
            num_params=rules.expected_length,
            optimizer=rules.optimizer,
        )
        check_values(state, reference=global_state, max_change_l2=bound)
    else:
        check_values(state)
    return spend, n


def _add_encrypted(accumulator: HEAccumulator, record: Any) -> None:
    from privatune.common import he
    from privatune.common.he.records import arrayrecord_to_update

    try:
        accumulator.add(arrayrecord_to_update(record))
    except (he.HEError, ValueError, KeyError) as err:
        raise UpdateRejected(str(err)) from None
