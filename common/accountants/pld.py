"""Google's dp-accounting privacy-loss-distribution accountant: tight, and written by other people than Opacus,
which is why the audit uses it to check what the clients computed with Opacus.

The PLD is discretised pessimistically (the result stays an upper bound); an interval of 1e-3 in privacy loss is
within 1 % of 1e-4 for privatune's mechanisms and 5-15x faster (measured in docs/privacy.md).
"""

from __future__ import annotations

import math

from privatune.common.accountants.base import AccountingError, Mechanism

VALUE_DISCRETIZATION_INTERVAL = 1e-3
# The PLD's support grows with epsilon / interval; past this the computation takes seconds and gigabytes.
PLD_MAX_EPSILON = 500.0
# A first pass at this coarse interval (milliseconds, an upper bound) refuses hopeless requests before the fine one
# (10 s and more for an epsilon in the thousands); its bound is loose, so only twice the limit refuses.
COARSE_INTERVAL = 0.1


class PLDAccountant:
    name = "pld"
    library = "dp-accounting"

    def __init__(self, value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL) -> None:
        self.interval = value_discretization_interval

    def epsilon(self, mechanisms: list[Mechanism], delta: float) -> float:
        if self.interval < COARSE_INTERVAL:
            coarse = PLDAccountant(COARSE_INTERVAL)._compute(mechanisms, delta)
            if coarse > 2 * PLD_MAX_EPSILON:
                raise AccountingError(
                    f"the PLD accountant bounds epsilon by {coarse:g} for {mechanisms} at delta={delta:g}: far above "
                    f"{PLD_MAX_EPSILON:g}, no meaningful privacy; use accountant 'rdp' to account it"
                )
        eps = self._compute(mechanisms, delta)
        if eps > PLD_MAX_EPSILON:
            raise AccountingError(
                f"the PLD accountant gives epsilon {eps:g} for {mechanisms} at delta={delta:g}: far above "
                f"{PLD_MAX_EPSILON:g}, no meaningful privacy; use accountant 'rdp' to account it"
            )
        return eps

    def _compute(self, mechanisms: list[Mechanism], delta: float) -> float:
        import dp_accounting
        from dp_accounting.pld import PLDAccountant as GooglePLD

        events = [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps
            )
            for noise, rate, steps in mechanisms
        ]
        acc = GooglePLD(
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=self.interval
        )
        try:
            acc.compose(events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events))
            eps = float(acc.get_epsilon(delta))
        except (MemoryError, OverflowError, ValueError) as exc:
            raise AccountingError(f"the PLD accountant failed for {mechanisms}: {exc!r}; use 'rdp'") from exc
        return eps if math.isfinite(eps) else math.inf
