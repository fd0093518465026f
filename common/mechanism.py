"""One DP-SGD release, as one value: what a site trained under, carried unchanged from training to the audit.

A round at a site runs ``steps`` Poisson-subsampled Gaussian steps (noise multiplier ``sigma``, sampling rate ``q``),
each clipping per-record gradients to ``max_grad_norm``, and states its epsilon at ``delta`` with ``accountant``.
Training reports it (:mod:`privatune.client.training`), the privacy guard plans and records it, the site ledger and
the server ledger store it as columns of the same names, the reply carries it under the wire keys of
:mod:`privatune.common.protocol`, and the audit recomputes epsilon from it. Adding a field is one edit here.

The accountants' own history format stays the bare ``(sigma, q, steps)`` triple (:attr:`DPMechanism.gaussian`):
composition needs nothing more, and the clip and delta do not change an epsilon once sigma is fixed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from privatune.common import protocol as wire
from privatune.common.accountants import ACCOUNTANTS, Mechanism

# Field -> wire key of the reply's numeric "metrics" record. The accountant travels in the "status" record
# (a string); see protocol.TRAIN_MECHANISM_KEYS for everything a trained reply's metrics hold.
NUMERIC_WIRE_KEYS: dict[str, str] = {
    "noise_multiplier": wire.KEY_NOISE_MULTIPLIER,
    "sample_rate": wire.KEY_SAMPLE_RATE,
    "steps": wire.KEY_STEPS,
    "max_grad_norm": wire.KEY_MAX_GRAD_NORM,
    "delta": wire.KEY_DELTA,
}


#: Fields the site ledger records with the mechanism that the wire, the server's reports and the audit's
#: site/server comparison leave out (:data:`RELEASE_FIELDS` are the others): they do not change epsilon.
RECORDED_ONLY: tuple[str, ...] = ("augment_views",)


class MechanismError(ValueError):
    """A mechanism value out of range; the message names the field (or the wire key) and the value."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise MechanismError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPMechanism:
    """What one DP-SGD round at one site released, and how its epsilon is stated."""

    noise_multiplier: float  # sigma: noise std / max_grad_norm; 0 = no noise (a non-private round)
    sample_rate: float  # q: each record's Poisson inclusion probability per step, in (0, 1]
    steps: int  # optimizer steps in the round (each one a subsampled Gaussian release)
    max_grad_norm: float  # per-record clipping bound C (> 0)
    delta: float  # the delta the epsilon is stated at, in (0, 1)
    accountant: str  # the accountant that turns the history into epsilon (common.accountants)
    # Augmentation multiplicity K (issue 16): views of each sampled record, averaged before clipping. Recorded in
    # the site ledger; it changes neither the sensitivity nor epsilon, and is not on the wire (the run config holds it).
    augment_views: int = 1

    def __post_init__(self) -> None:
        sigma = _number("noise_multiplier", self.noise_multiplier)
        if sigma < 0:
            raise MechanismError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        q = _number("sample_rate", self.sample_rate)
        if not 0.0 < q <= 1.0:
            raise MechanismError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 0:
            raise MechanismError(f"steps must be an integer >= 0, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        views = self.augment_views
        if isinstance(views, bool) or not isinstance(views, numbers.Integral) or views < 1:
            raise MechanismError(f"augment_views must be an integer >= 1, got {views!r}")
        object.__setattr__(self, "augment_views", int(views))
        clip = _number("max_grad_norm", self.max_grad_norm)
        if clip <= 0:
            raise MechanismError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        delta = _number("delta", self.delta)
        if not 0.0 < delta < 1.0:
            raise MechanismError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise MechanismError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        # Exact Python types, so equal mechanisms hash and serialise alike whatever numpy type built them.
        for name, value in (("noise_multiplier", sigma), ("sample_rate", q), ("max_grad_norm", clip), ("delta", delta)):
            object.__setattr__(self, name, value)

    @property
    def gaussian(self) -> Mechanism:
        """The accountants' history entry: ``(noise_multiplier, sample_rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def columns(self) -> dict[str, Any]:
        """The ledger columns (site spends and server reports use these names)."""
        return asdict(self)

    @classmethod
    def from_columns(cls, row: Mapping[str, Any]) -> DPMechanism:
        """From a ledger row (or any mapping holding the field names); extra keys are ignored. A recorded-only
        field (:data:`RECORDED_ONLY`) missing or None (a row older than it) takes its default."""
        missing = [f.name for f in fields(cls) if f.name not in row and f.name not in RECORDED_ONLY]
        if missing:
            raise MechanismError(f"mechanism fields missing: {', '.join(missing)}")
        return cls(
            **{f.name: row[f.name] for f in fields(cls) if row.get(f.name) is not None or f.name not in RECORDED_ONLY}
        )

    def to_metrics(self) -> dict[str, float | int]:
        """The numeric part, under the reply's metric keys."""
        return {key: getattr(self, name) for name, key in NUMERIC_WIRE_KEYS.items()}

    def to_status(self) -> dict[str, str]:
        """The string part, under the reply's status keys."""
        return {wire.KEY_ACCOUNTANT: self.accountant}

    @classmethod
    def from_reply(cls, metrics: Mapping[str, Any], status: Mapping[str, Any]) -> DPMechanism:
        """From a reply's metrics and status records; a missing or bad value names its wire key."""
        values: dict[str, Any] = {}
        for name, key in NUMERIC_WIRE_KEYS.items():
            if key not in metrics:
                raise MechanismError(f"the reply's metrics lack {key!r}")
            values[name] = metrics[key]
        if isinstance(values["steps"], float) and values["steps"].is_integer():
            values["steps"] = int(values["steps"])  # a MetricRecord may hand back an integral float
        values["accountant"] = str(status.get(wire.KEY_ACCOUNTANT, ""))
        try:
            return cls(**values)
        except MechanismError as err:
            for name, key in NUMERIC_WIRE_KEYS.items():
                if str(err).startswith(name):
                    raise MechanismError(f"{key}: {str(err)[len(name) + 1 :]}") from None
            raise


#: The mechanism's fields every ledger (site and server) and the reply carry.
RELEASE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DPMechanism) if f.name not in RECORDED_ONLY)
