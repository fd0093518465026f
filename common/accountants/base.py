"""What every accountant shares: the mechanism format, the error type and the interface.

Kept free of Opacus, torch and dp-accounting so that importing an accountant's name costs nothing; each
accountant imports its library lazily, on first use.
"""

from __future__ import annotations

from typing import Protocol

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class AccountingError(ValueError):
    """Bad input to, or an infeasible request of, the privacy accountant."""


class Accountant(Protocol):
    """One way to bound the epsilon of a composition of Poisson-subsampled Gaussian mechanisms.

    ``epsilon`` gets mechanisms already validated and normalised by :mod:`privatune.common.accounting` (at least one, every
    noise multiplier > 0); it returns an upper bound on epsilon at ``delta`` or raises AccountingError when it
    cannot compute one at an affordable cost.
    """

    name: str
    library: str  # who implements the maths: the audit recomputes with an accountant of another library

    def epsilon(self, mechanisms: list[Mechanism], delta: float) -> float: ...
