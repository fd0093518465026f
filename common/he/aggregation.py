"""The aggregation protocol on whole payloads: a client encrypts ``[w*v, w]``, the server checks and sums
replies without decrypting, a key holder decrypts the sum and divides by the summed weight (FedAvg).

Separate from ``context.py`` (single ciphertexts) because this is the protocol's policy: the range checks
before encryption, the checks a reply must pass, the summand limit and the noise-hiding rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from privatune.common.he.context import HEContext
from privatune.common.he.errors import HEFormatError, HEInputError, HEKeyError, HEReplyError
from privatune.common.he.packing import Layout, flatten_state, layout_diff, unflatten
from privatune.common.he.params import HEParams
from privatune.common.he.payloads import EncryptedState, EncryptedUpdate
from privatune.common.he.seal_io import seal_save

__all__ = ["HEAccumulator", "check_update", "decrypt_state", "encrypt_state", "encrypt_update", "sum_updates"]


# --------------------------------------------------------------------------------------------- clients


def _check_finite_and_range(state: Mapping[str, Any], weight: float, params: HEParams) -> None:
    if not (isinstance(weight, (int, float, np.floating, np.integer)) and math.isfinite(float(weight))):
        raise HEInputError(f"the aggregation weight must be a finite number, got {weight!r}")
    w = float(weight)
    if w <= 0:
        raise HEInputError(f"the aggregation weight must be positive, got {w}")
    limit = params.max_client_value
    if w > limit:
        raise HEInputError(f"the aggregation weight {w:g} exceeds {limit:g}, the range of these HE parameters")
    for name, value in state.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise HEInputError(
                f"parameter {name!r} has {bad} non-finite value(s) (NaN/inf); refusing to encrypt this update "
                "(training diverged? lower the learning rate)"
            )
        if arr.size and arr.dtype.kind == "f":
            peak = float(np.max(np.abs(arr))) * w
            if peak > limit:
                raise HEInputError(
                    f"parameter {name!r} times the weight reaches {peak:.3g}, above {limit:.3g}, the largest value "
                    f"the HE parameters (scale 2^{params.global_scale_bits}, {params.data_bits}-bit modulus, "
                    f"{params.max_summands} summands) can sum without overflow; use a smaller weight unit"
                )


def _encrypt(ctx: HEContext, state: Mapping[str, Any], weight: float, *, symmetric: bool) -> EncryptedUpdate:
    _check_finite_and_range(state, weight, ctx.params)
    vec, layout = flatten_state(state)
    payload = np.empty(vec.size + 1, dtype=np.float64)
    np.multiply(vec, float(weight), out=payload[:-1])
    payload[-1] = float(weight)
    chunks = ctx.encrypt_chunks(payload, symmetric=symmetric)
    return EncryptedUpdate(ctx.fingerprint, layout, chunks)


def encrypt_update(ctx: HEContext, state: Mapping[str, Any], weight: float) -> EncryptedUpdate:
    """Client side: encrypt ``[weight * state, weight]``.

    With the secret key (the normal case) this uses seeded symmetric encryption (half the bytes, less
    noise); a public-only context falls back to public-key encryption.
    """
    return _encrypt(ctx, state, weight, symmetric=ctx.has_secret_key)


def encrypt_state(ctx: HEContext, state: Mapping[str, Any]) -> EncryptedState:
    """Server side: encrypt the initial global state with the public key (weight 1)."""
    upd = _encrypt(ctx, state, 1.0, symmetric=False)
    return EncryptedState(upd.fingerprint, upd.layout, upd.chunks, num_summands=1)


# --------------------------------------------------------------------------------------------- server


def check_update(ctx: HEContext, update: EncryptedUpdate, expected: Layout | int) -> None:
    """Server side: raise ``HEReplyError(reason)`` unless ``update`` is well-formed for this run.

    ``expected`` is the global state's Layout (names and shapes must match) or its number of values.
    Checks, cheapest first: fingerprint, layout, number of chunks, integrity digest, then that every
    chunk decodes as a fresh 2-polynomial ciphertext of this context at the agreed scale.
    (``HEAccumulator.add`` runs the same checks and adds in one pass.)
    """
    _checked_ciphertexts(ctx, update, expected)


def _checked_ciphertexts(ctx: HEContext, update: EncryptedUpdate, expected: Layout | int) -> list[Any]:
    """The checks of ``check_update``; returns the parsed ciphertexts."""
    if not isinstance(update, EncryptedUpdate):
        raise HEReplyError(f"expected an EncryptedUpdate, got {type(update).__name__}")
    if update.fingerprint != ctx.fingerprint:
        raise HEReplyError(
            f"fingerprint mismatch: reply encrypted for key {update.fingerprint[:16]}..., the server holds "
            f"{ctx.fingerprint[:16]}... (client has another secret.ctx)"
        )
    if update.num_summands != 1:
        raise HEReplyError(f"a client reply must hold one update, this one claims {update.num_summands}")
    if isinstance(expected, Layout):
        if update.layout != expected:
            raise HEReplyError(f"layout mismatch: {layout_diff(expected, update.layout)}")
        n_values = expected.total
    else:
        n_values = int(expected)
        if update.layout.total != n_values:
            raise HEReplyError(f"layout mismatch: reply has {update.layout.total} values, expected {n_values}")
    want = ctx.num_chunks(n_values)
    if len(update.chunks) != want:
        raise HEReplyError(
            f"wrong number of ciphertexts: expected {want} for {n_values} values + weight, got {len(update.chunks)}"
        )
    if update.recompute_digest() != update.digest:
        raise HEReplyError("integrity digest mismatch: ciphertext bytes or metadata were altered in transit")
    return [ctx.load_chunk(data, j) for j, data in enumerate(update.chunks)]


class HEAccumulator:
    """Server side, streaming: check and add one reply at a time (each ciphertext parsed once).

    ``add`` raises ``HEReplyError`` for a bad reply and leaves the running sum untouched, so the server
    logs the reason, drops that reply and goes on; memory is one update plus the running sum.
    """

    def __init__(self, ctx: HEContext, expected: Layout | int) -> None:
        self.ctx = ctx
        self.expected = expected
        self.num_summands = 0
        self._layout: Layout | None = expected if isinstance(expected, Layout) else None
        self._acc: list[Any] | None = None

    def add(self, update: EncryptedUpdate) -> None:
        cts = _checked_ciphertexts(self.ctx, update, self.expected)
        if self._layout is None:
            self._layout = update.layout
        elif update.layout != self._layout:
            raise HEReplyError(f"layout mismatch with earlier replies: {layout_diff(self._layout, update.layout)}")
        if self.num_summands + 1 > self.ctx.params.max_summands:
            raise HEReplyError(f"more than max_summands={self.ctx.params.max_summands} replies: the sum could overflow")
        if self._acc is None:
            self._acc = cts
        else:
            for acc, ct in zip(self._acc, cts, strict=False):
                self.ctx.add_inplace(acc, ct)
        self.num_summands += 1

    def result(self) -> EncryptedState:
        """The encrypted sum of every reply added so far."""
        if self._acc is None or self._layout is None:
            raise HEReplyError("no valid updates to sum")
        chunks = [seal_save(ct) for ct in self._acc]
        return EncryptedState(self.ctx.fingerprint, self._layout, chunks, num_summands=self.num_summands)


def sum_updates(ctx: HEContext, updates: Iterable[EncryptedUpdate]) -> EncryptedState:
    """Server side: add the ciphertexts of the updates; never decrypts (works with public.ctx).

    Every update is checked as in ``check_update`` against the first one's layout; the first bad one
    raises ``HEReplyError`` naming its index. To drop bad replies and go on, use ``HEAccumulator``.
    """
    ups = list(updates)
    if not ups:
        raise HEReplyError("no updates to sum")
    if not isinstance(ups[0], EncryptedUpdate):
        raise HEReplyError(f"update 0: expected an EncryptedUpdate, got {type(ups[0]).__name__}")
    acc = HEAccumulator(ctx, ups[0].layout)
    for i, u in enumerate(ups):
        try:
            acc.add(u)
        except HEReplyError as exc:
            raise HEReplyError(f"update {i}: {exc.reason}") from exc
    return acc.result()


# --------------------------------------------------------------------------------------------- key holders


def decrypt_state(ctx: HEContext, state: EncryptedUpdate) -> dict[str, np.ndarray]:
    """Key holder: decrypt a summed state and divide by the summed weight (FedAvg)."""
    ctx.require_secret_key()
    if state.fingerprint != ctx.fingerprint:
        raise HEKeyError(
            f"the encrypted state belongs to key {state.fingerprint[:16]}..., but {ctx.source} has "
            f"{ctx.fingerprint[:16]}...: this run uses another key; refusing to decrypt"
        )
    if state.recompute_digest() != state.digest:
        raise HEFormatError("encrypted state: integrity digest mismatch (corrupted in transit or on disk)")
    n = state.layout.total
    if len(state.chunks) != ctx.num_chunks(n):
        raise HEFormatError(
            f"encrypted state: {len(state.chunks)} ciphertexts, expected {ctx.num_chunks(n)} for {n} values"
        )
    sums = ctx.decrypt_chunks(state.chunks, n + 1)
    grid = 2.0 ** (ctx.params.round_bits - ctx.params.global_scale_bits)
    sums = np.round(sums / grid) * grid  # hide the CKKS noise (see params.py's docstring)
    weight = float(sums[n])
    max_weight = ctx.params.max_client_value * max(1, state.num_summands)
    if not (math.isfinite(weight) and 0 < weight <= max_weight):
        raise HEFormatError(
            f"decryption gave an invalid weight slot ({weight:.3g}): the state was not made by this key's "
            "clients or is corrupted"
        )
    return unflatten(sums[:n] / weight, state.layout)
