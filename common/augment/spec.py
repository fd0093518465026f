"""The run config's ``augment`` spec, parsed and validated against a registry of operations; no torch here.

``augment`` is ``""`` (none) or a comma list of ``name=strength`` items applied in order, e.g.
``"shift=2,rotate=10,erase=0.25"``. Each operation (:class:`AugmentOp`) has a name, a strength validator
(:meth:`AugmentOp.check`: the allowed range, with its unit) and an apply function. Operations are grouped by the
kind of model they fit (``image`` or ``text``, as :data:`privatune.common.config.MODEL_KINDS` and
``models.names.model_kind`` name them); :func:`parse_augment` refuses an operation of the other kind. The apply
functions import their framework lazily, so validating a run config loads neither torch nor kornia.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

AUGMENT_KEY = "augment"
VIEWS_KEY = "augment-views"
IMAGE, TEXT = "image", "text"
MAX_VIEWS = 64  # K views of every sampled record cost K forward/backward passes; beyond this it is a typo


class AugmentSpecError(ValueError):
    """A bad ``augment`` / ``augment-views`` value; the message names the key, the operation and the range."""


@dataclass(frozen=True)
class AugmentOp:
    """One named operation: ``apply(batch, strength, generator)`` returns an augmented batch.

    ``low``/``high`` bound the strength (``low`` excluded unless ``low_closed``); ``integer`` asks for a whole
    number; ``unit`` and ``doc`` go into error messages and docs/augmentation.md's table.
    """

    name: str
    low: float
    high: float
    apply: Callable[..., Any]
    unit: str = ""
    doc: str = ""
    integer: bool = False
    low_closed: bool = False

    @property
    def allowed(self) -> str:
        bracket = "[" if self.low_closed else "("
        kind = "a whole number" if self.integer else "a number"
        unit = f" {self.unit}" if self.unit else ""
        return f"{kind} in {bracket}{self.low:g}, {self.high:g}]{unit}"

    def check(self, strength: float) -> str | None:
        """Why ``strength`` is refused, or None."""
        ok = math.isfinite(strength) and strength <= self.high
        ok = ok and (strength >= self.low if self.low_closed else strength > self.low)
        if ok and self.integer and not float(strength).is_integer():
            ok = False
        return None if ok else f"{self.name}={strength:g} is out of range: the strength must be {self.allowed}"


@dataclass(frozen=True)
class AugmentStep:
    """One parsed item of the spec: the operation and its strength."""

    op: AugmentOp
    strength: float


def registry(kind: str) -> Mapping[str, AugmentOp]:
    """The operations for models of ``kind`` (``image`` or ``text``)."""
    if kind == IMAGE:
        from privatune.common.augment.image import IMAGE_OPS

        return IMAGE_OPS
    if kind == TEXT:  # names and ranges only: WordNet is the site's business (text.text_site_problem)
        from privatune.common.augment.text import TEXT_AUGMENT_OPS

        return TEXT_AUGMENT_OPS
    raise AugmentSpecError(f"{AUGMENT_KEY}: no augmentation for models of kind {kind!r} (image or text)")


def parse_augment(spec: str, kind: str | None) -> tuple[AugmentStep, ...]:
    """The steps of ``spec`` for a model of ``kind``; () for "". Errors name the key, the operation and the range.

    ``kind`` None (a model whose kind is not known before it loads) accepts no operation.
    """
    text = spec.strip()
    if not text:
        return ()
    if kind is None:
        raise AugmentSpecError(f"{AUGMENT_KEY}: the model's kind (image or text) is not known, so no operation fits")
    ops = registry(kind)
    other = {TEXT: IMAGE, IMAGE: TEXT}.get(kind)
    steps: list[AugmentStep] = []
    for item in (part.strip() for part in text.split(",")):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not name or not sep or not value.strip():
            raise AugmentSpecError(
                f'{AUGMENT_KEY}: {item!r} is not name=strength; write e.g. augment="shift=2,rotate=10"'
            )
        if name not in ops:
            known = ", ".join(sorted(ops)) or "none yet"
            hint = ""
            if other is not None and name in _names(other):
                hint = f" ('{name}' is an operation for {other} models)"
            raise AugmentSpecError(f"{AUGMENT_KEY}: unknown operation '{name}' for {kind} models{hint}; known: {known}")
        if any(s.op.name == name for s in steps):
            raise AugmentSpecError(f"{AUGMENT_KEY}: operation '{name}' is given twice; give each once")
        try:
            strength = float(value)
        except ValueError:
            raise AugmentSpecError(
                f"{AUGMENT_KEY}: {name}={value.strip()!r} is not a number; the strength must be {ops[name].allowed}"
            ) from None
        why = ops[name].check(strength)
        if why:
            raise AugmentSpecError(f"{AUGMENT_KEY}: {why}")
        steps.append(AugmentStep(ops[name], strength))
    return tuple(steps)


def _names(kind: str) -> set[str]:
    try:
        return set(registry(kind))
    except AugmentSpecError:
        return set()


def check_augment(spec: str, views: int, kind: str | None, *, mode: str, ghost_clipping: bool, dp: bool) -> None:
    """Everything about ``augment`` and ``augment-views`` a run config can check before any training.

    ``head`` mode trains on backbone features computed once and cached: an augmented view would need its own
    features, so augmentation is refused there (docs/augmentation.md). K > 1 under DP averages materialised
    per-sample gradients before clipping, which Opacus' ghost clipping never materialises: refused with it.
    """
    if isinstance(views, bool) or not 1 <= views <= MAX_VIEWS:
        raise AugmentSpecError(
            f"{VIEWS_KEY}: must be a whole number in [1, {MAX_VIEWS}] (views of each sampled record), got {views!r}"
        )
    steps = parse_augment(spec, kind)
    if (steps or views > 1) and mode == "head":
        raise AugmentSpecError(
            f"{AUGMENT_KEY}: mode=head trains the head on backbone features computed once and cached, so "
            f"augmented views would change nothing; use mode=last-k (or lora, full) with {AUGMENT_KEY}/{VIEWS_KEY}, "
            f'or set {AUGMENT_KEY}="" and {VIEWS_KEY}=1'
        )
    if views > 1 and dp and ghost_clipping:
        raise AugmentSpecError(
            f"{VIEWS_KEY}: {views} views average each record's per-sample gradients before clipping, which "
            f"ghost clipping never materialises; set ghost-clipping=false (or {VIEWS_KEY}=1)"
        )
