"""Privacy accountants by name (in the style of Opacus' ``accountants/``): one small module each over its library.

- ``prv`` (default): Opacus' PRV accountant, near-tight; what clients calibrate with and report.
- ``rdp``: Opacus' RDP accountant, a looser but always computable upper bound.
- ``pld``: Google dp-accounting's PLD accountant, tight and independent of Opacus.

The audit checks every recorded epsilon with an accountant of *another* library (:func:`independent_of`), so a
bug in the library the clients used cannot hide itself.
"""

from __future__ import annotations

from privatune.common.accountants.base import Accountant, AccountingError, Mechanism
from privatune.common.accountants.pld import PLDAccountant
from privatune.common.accountants.prv import PRV_MAX_GRID, PRVAccountant
from privatune.common.accountants.rdp import RDPAccountant

PRV = PRVAccountant.name
RDP = RDPAccountant.name
PLD = PLDAccountant.name
DEFAULT_ACCOUNTANT = PRV
REGISTRY: dict[str, Accountant] = {a.name: a for a in (PRVAccountant(), RDPAccountant(), PLDAccountant())}
ACCOUNTANTS: tuple[str, ...] = tuple(REGISTRY)  # (PRV, RDP, PLD)


def get_accountant(name: str) -> Accountant:
    """The accountant registered as ``name``; a clear error naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise AccountingError(f"unknown accountant {name!r}: use one of {', '.join(ACCOUNTANTS)}") from None


def independent_of(name: str) -> str:
    """The accountant the audit recomputes with: dp-accounting's PLD for Opacus' accountants, Opacus' PRV for PLD."""
    return PRV if get_accountant(name).library == "dp-accounting" else PLD


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "PLD",
    "PRV",
    "PRV_MAX_GRID",
    "RDP",
    "REGISTRY",
    "Accountant",
    "AccountingError",
    "Mechanism",
    "get_accountant",
    "independent_of",
]
