"""Screening of train replies before aggregation: pure functions, no Flower types.

One bad reply must not spoil a round. Each check raises ``UpdateRejected`` with the reason the
server logs and records; the strategy drops that reply and aggregates the rest.

- ``check_num_examples``: a positive integer no larger than ``MAX_NUM_EXAMPLES`` (it weights FedAvg);
- ``check_plain_arrays``: the trainable parameter names, float32 exactly as sent, the expected shapes
  (checked on the declared dtype, before a byte is decoded: object or string arrays never load);
- ``check_values``: finite, and bounded: without DP ``|w| <= MAX_ABS_WEIGHT``; with DP the L2 change
  from the round's global model is at most ``dp_change_bound`` (see its docstring);
- ``check_mechanism``, ``check_accountant``, ``spend_of``: the whole mechanism in range, as one ``DPMechanism``
  with the epsilons the site states (``ReportedSpend``);
- ``update_digest`` + ``ReplyGuard``: a node or client that answers twice in a round keeps its first
  reply (the rest: "duplicate"); a reply to a message of another round, or an update byte-identical
  to one already seen in this run, is a "replay".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privatune.common.accountants import ACCOUNTANTS
from privatune.common.mechanism import DPMechanism, MechanismError
from privatune.common.optimizers import OPTIMIZER_ADAM, OPTIMIZER_SGD, adam_max_coordinate_move, check_optimizer
from privatune.common.protocol import (
    KEY_ACCOUNTANT,
    KEY_DELTA,
    KEY_EPSILON,
    KEY_EPSILON_DATASET,
    KEY_MAX_GRAD_NORM,
    KEY_NOISE_MULTIPLIER,
    KEY_NUM_EXAMPLES,
    KEY_SAMPLE_RATE,
    KEY_STEPS,
)
from privatune.server.aggregation import UpdateRejected

MAX_NUM_EXAMPLES = 10**9  # more records than any site of this project holds, far below float precision
MAX_ABS_WEIGHT = 1e6  # runs without DP: no trained weight of these models comes near it
EXPECTED_DTYPE = "float32"  # what every site sends (client.app: the trainable state as float32)
DUPLICATE = "duplicate"
REPLAY = "replay"

# dp_change_bound: a Poisson batch larger than E + 10 sqrt(E) + 20 has probability below e^-40 per step
# (Chernoff), a Gaussian vector in R^d longer than sigma C (2 sqrt(d) + 10) below e^-50; SAFETY covers
# float rounding and Opacus' clipping slack. An honest update is rejected with negligible probability.
_BATCH_SIGMAS = 10.0
_BATCH_SLACK = 20.0
_SAFETY = 2.0


def check_num_examples(value: Any, maximum: int = MAX_NUM_EXAMPLES) -> int:
    """The reply's ``num-examples`` as an int; refuse NaN, inf, non-integers, <= 0 and > ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpdateRejected(f"{KEY_NUM_EXAMPLES} must be a positive integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise UpdateRejected(f"{KEY_NUM_EXAMPLES} must be a positive integer, got {value!r}")
    n = int(value)
    if n <= 0:
        raise UpdateRejected(f"{KEY_NUM_EXAMPLES} must be a positive integer, got {value!r}")
    if n > maximum:
        raise UpdateRejected(f"{KEY_NUM_EXAMPLES} {n} is above the maximum {maximum}")
    return n


def check_plain_arrays(arrays: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Names, dtype and shape of every parameter, from what each array declares (``.dtype``, ``.shape``)."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"parameter names differ from the trainable set: missing {missing[:3]}, extra {extra[:3]}")
    for name, shape in expected.items():
        arr = arrays[name]
        dtype = str(getattr(arr, "dtype", type(arr).__name__))
        if dtype != EXPECTED_DTYPE:
            raise UpdateRejected(f"parameter {name} has dtype {dtype}, expected {EXPECTED_DTYPE}")
        got = tuple(int(x) for x in getattr(arr, "shape", ()))
        if got != tuple(shape):
            raise UpdateRejected(f"parameter {name} has shape {got}, expected {tuple(shape)}")


def dp_change_bound(
    *,
    num_examples: int,
    batch_size: int,
    epochs: int,
    lr: float,
    max_grad_norm: float,
    noise_multiplier: float,
    num_params: int,
    momentum: float = 0.0,
    optimizer: str = OPTIMIZER_SGD,
) -> float:
    """An L2 bound on how far one round of DP-SGD or DP-Adam (client.training) can move the trainable weights.

    Per step Opacus sets the gradient to (sum of per-sample gradients clipped to C + N(0, sigma^2 C^2 I_d)) / E,
    E = floor(n / steps-per-epoch) its expected batch size, so its norm is at most
    (|B| C + ||noise||) / E with |B| <= min(n, E + 10 sqrt(E) + 20) and ||noise|| <= sigma C (2 sqrt(d) + 10)
    except with negligible probability. SGD moves the weights by at most lr / (1 - momentum) times that per
    step, over epochs x ceil(n / batch) steps; ``lr`` is the largest group rate (lr x max(1, backbone scale)).
    The result is doubled. It is generous by design: it stops absurd values, the robust aggregators deal
    with plausible-looking poison.

    ``optimizer="adam"``: Adam normalises each coordinate's step by its gradient history, so the gradient's size
    (and the noise) drop out: step t moves a coordinate by at most lr x ``adam_step_factor(t)`` (Cauchy-Schwarz
    on Adam's two moment averages; 1 at t = 1, below 7.3 for torch's betas; common.optimizers), and the round's
    d coordinates by sqrt(d) times that in L2. The bound is the sum over the round's steps (Adam starts fresh
    every round), doubled.
    """
    if num_examples <= 0 or batch_size <= 0 or epochs <= 0:
        raise ValueError("num_examples, batch_size and epochs must be positive")
    per_epoch = math.ceil(num_examples / batch_size)
    steps = epochs * per_epoch
    if check_optimizer(optimizer) == OPTIMIZER_ADAM:
        return _SAFETY * lr * adam_max_coordinate_move(steps) * math.sqrt(max(num_params, 1))
    e = max(1.0, float(num_examples // per_epoch))
    batch_max = min(float(num_examples), e + _BATCH_SIGMAS * math.sqrt(e) + _BATCH_SLACK)
    noise_max = noise_multiplier * max_grad_norm * (2.0 * math.sqrt(max(num_params, 1)) + 10.0)
    per_step = (batch_max * max_grad_norm + noise_max) / e
    return _SAFETY * steps * lr * per_step / (1.0 - momentum)


def check_values(
    state: Mapping[str, np.ndarray],
    *,
    reference: Mapping[str, np.ndarray] | None = None,
    max_change_l2: float | None = None,
    max_abs: float = MAX_ABS_WEIGHT,
) -> None:
    """Finite values; then ``||state - reference||_2 <= max_change_l2`` if given, else ``|w| <= max_abs``."""
    for name, arr in state.items():
        if not np.all(np.isfinite(arr)):
            raise UpdateRejected(f"parameter {name} holds non-finite values")
    if max_change_l2 is None:
        for name, arr in state.items():
            peak = float(np.max(np.abs(arr))) if arr.size else 0.0
            if peak > max_abs:
                raise UpdateRejected(f"parameter {name} holds |w| = {peak:.3g}, above the bound {max_abs:g}")
        return
    if reference is None:
        raise ValueError("max_change_l2 needs the reference (global) weights")
    sq = 0.0
    for name, arr in state.items():
        diff = arr.astype(np.float64) - np.asarray(reference[name], dtype=np.float64)
        sq += float(np.dot(diff.ravel(), diff.ravel()))
    change = math.sqrt(sq)
    if not change <= max_change_l2:
        raise UpdateRejected(
            f"the update moves the weights by {change:.3g} (L2), more than one round of DP-SGD can "
            f"({max_change_l2:.3g})"
        )


def update_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 of an update as sent: every name, dtype, shape and byte (plaintext or ciphertext arrays).

    Takes Flower ``Array``s (their serialised ``.data``) or numpy arrays.
    """
    h = hashlib.sha256(b"privatune-update-digest-v1\x00")
    for name in sorted(arrays):
        arr = arrays[name]
        data = getattr(arr, "data", None)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            a = np.asarray(arr)
            data = a.tobytes() if a.dtype != object else repr(a.tolist()).encode()
        h.update(name.encode("utf-8", "surrogatepass") + b"\x00")
        h.update(f"{getattr(arr, 'dtype', '')}|{tuple(getattr(arr, 'shape', ()))}|{len(data)}\x00".encode())
        h.update(bytes(data))
    return h.hexdigest()


@dataclass
class ReplyGuard:
    """Duplicate and replay detection across one run (state: what was seen; no Flower types).

    Per round: ``start_round`` with the ids of the messages sent (message id -> destination node; empty when
    the transport did not assign ids), then ``check_identity`` for every reply in arrival order and
    ``check_update`` for every reply that carries an update. Both return a reason or None.
    """

    seen_updates: dict[str, tuple[int, str]] = field(default_factory=dict)  # digest -> (round, client)
    answered: dict[str, int] = field(default_factory=dict)  # instruction message id -> round answered
    round: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    nodes: set[int] = field(default_factory=set)
    clients: set[str] = field(default_factory=set)
    _this_round: set[str] = field(default_factory=set)

    def start_round(self, server_round: int, sent: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        self.round = server_round
        items = sent.items() if isinstance(sent, Mapping) else sent
        self.sent = {str(mid): int(node) for mid, node in items if mid}
        self.nodes, self.clients, self._this_round = set(), set(), set()

    def check_identity(self, node_id: int, client_id: str, reply_to: str) -> str | None:
        """Duplicate node, client or instruction in this round, or an answer to another round's message."""
        reply_to = str(reply_to or "")
        if reply_to and reply_to in self.answered and reply_to not in self._this_round:
            return f"{REPLAY}: answers a message of round {self.answered[reply_to]}"
        if self.sent and reply_to not in self.sent:
            return f"{REPLAY}: answers no message sent in round {self.round}"
        if self.sent and self.sent[reply_to] != int(node_id):
            return f"{REPLAY}: answers the message sent to node {self.sent[reply_to]}, not to node {node_id}"
        if int(node_id) in self.nodes:
            return f"{DUPLICATE}: node {node_id} already replied in round {self.round}; the first reply counts"
        if client_id in self.clients:
            return f"{DUPLICATE}: client {client_id} already replied in round {self.round}; the first reply counts"
        if reply_to and reply_to in self._this_round:
            return f"{DUPLICATE}: a second reply to the same message; the first reply counts"
        self.nodes.add(int(node_id))
        self.clients.add(client_id)
        if reply_to:
            self._this_round.add(reply_to)
            self.answered[reply_to] = self.round
        return None

    def check_update(self, digest: str, client_id: str) -> str | None:
        """An update byte-identical to one seen earlier in this run (any client, any round) is a replay."""
        if digest in self.seen_updates:
            rnd, who = self.seen_updates[digest]
            return f"{REPLAY}: the same update as {who}'s reply in round {rnd}"
        self.seen_updates[digest] = (self.round, client_id)
        return None


# The mechanism a trained reply reports (metrics key -> ledger field), with the range the ledger accepts.
_MECHANISM = {
    KEY_NOISE_MULTIPLIER: ("noise_multiplier", 0.0, math.inf, False),
    KEY_SAMPLE_RATE: ("sample_rate", 0.0, 1.0, False),
    KEY_MAX_GRAD_NORM: ("max_grad_norm", 0.0, math.inf, True),
    KEY_DELTA: ("delta", 0.0, 1.0, False),
    KEY_EPSILON: ("epsilon_reported", 0.0, math.inf, True),
    KEY_EPSILON_DATASET: ("epsilon_dataset_reported", 0.0, math.inf, True),
}
_REQUIRED_MECHANISM = (KEY_NOISE_MULTIPLIER, KEY_SAMPLE_RATE, KEY_STEPS, KEY_MAX_GRAD_NORM, KEY_DELTA, KEY_EPSILON)


def _mechanism_value(key: str, value: Any) -> float | int | None:
    """The value if it is one the ledger can hold for ``key``, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if key == KEY_STEPS:
        return int(value) if float(value).is_integer() and 0 <= value <= 10**12 else None
    _, low, high, allow_inf = _MECHANISM[key]
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        return None
    if key in (KEY_SAMPLE_RATE, KEY_DELTA):
        return v if low < v <= high and (key != KEY_DELTA or v < 1.0) else None
    return v if low <= v <= high else None


def reported_mechanism(metrics: Mapping[str, Any]) -> dict[str, float | int | None]:
    """Ledger fields of the mechanism a reply reports, each None where absent or out of range."""
    out: dict[str, float | int | None] = {"steps": _mechanism_value(KEY_STEPS, metrics.get(KEY_STEPS))}
    for key, (name, *_rest) in _MECHANISM.items():
        out[name] = _mechanism_value(key, metrics.get(key)) if key in metrics else None
    return out


def check_mechanism(metrics: Mapping[str, Any]) -> dict[str, float | int | None]:
    """A trained reply must report its whole mechanism in range (the server ledger records it)."""
    mech = reported_mechanism(metrics)
    names = {KEY_STEPS: "steps", **{k: v[0] for k, v in _MECHANISM.items()}}
    bad = [k for k in _REQUIRED_MECHANISM if mech[names[k]] is None]
    if KEY_EPSILON_DATASET in metrics and mech["epsilon_dataset_reported"] is None:
        bad.append(KEY_EPSILON_DATASET)
    if bad:
        shown = ", ".join(f"{k}={metrics.get(k)!r}" for k in bad[:3])
        raise UpdateRejected(f"the reported mechanism is missing or out of range: {shown}")
    return mech


def check_accountant(status: Mapping[str, Any], default: str) -> str:
    """The accountant a trained reply states its epsilon with (the run's own when it names none)."""
    accountant = str(status.get(KEY_ACCOUNTANT, default))
    if accountant not in ACCOUNTANTS:
        raise UpdateRejected(f"accountant {accountant!r} is not one of {ACCOUNTANTS}")
    return accountant


@dataclass(frozen=True)
class ReportedSpend:
    """What a screened trained reply says its site spent: the mechanism, and the epsilons it states."""

    mechanism: DPMechanism
    epsilon: float  # the run's epsilon at the site after this round (inf for a non-private round)
    epsilon_dataset: float | None  # the dataset's epsilon over every run, when the site reported one


def spend_of(metrics: Mapping[str, Any], checked: Mapping[str, float | int | None], accountant: str) -> ReportedSpend:
    """The spend of a reply whose mechanism passed ``check_mechanism`` and ``check_accountant``.

    A mechanism the ledger could hold but no DP-SGD round has (a clipping bound of 0 or inf) is refused here.
    """
    try:
        mechanism = DPMechanism.from_reply(metrics, {KEY_ACCOUNTANT: accountant})
    except MechanismError as err:
        raise UpdateRejected(f"the reported mechanism is out of range: {err}") from None
    epsilon = checked["epsilon_reported"]
    dataset = checked["epsilon_dataset_reported"]
    assert epsilon is not None  # check_mechanism requires it
    return ReportedSpend(mechanism, float(epsilon), None if dataset is None else float(dataset))
