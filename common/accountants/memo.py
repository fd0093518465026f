"""Opacus' RDP arithmetic and PRV grid, with the pure parts computed once per process.

Why: a client's round spent most of its accounting in Opacus' pure-Python RDP series. The PRV accountant sizes its
grid from RDP epsilons (``compute_safe_domain_size``: the whole composition, then each mechanism alone, i.e. the
same one-step RDP twice), privatune sized the grid once to refuse unaffordable requests and Opacus sized it again
inside ``get_epsilon``, and every round asks again for the (noise, sample rate) pair it calibrated in round 1.

The one-step RDP at each order comes from :mod:`~privatune.common.accountants.rdp_series` (Opacus' series with
its terms computed in numpy: the same floats, several times faster). It is a pure function of (sample rate, noise, order), and the grid a pure function of
the mechanisms and the error bounds, so keeping them per process returns Opacus' floats bit for bit
(tests/test_accounting_memo.py checks against Opacus itself). The code below is Opacus 1.6.0's own
(``RDPAccountant.get_privacy_spent``, ``compute_safe_domain_size``, ``PRVAccountant._get_domain``) with the memoised
pieces in place; opacus is pinned in pyproject.toml.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from privatune.common.accountants.base import Mechanism
from privatune.common.accountants.rdp_series import compute_rdp_one_step

#: (sample rate, noise) pairs whose per-order RDP is kept: a run uses a handful per site; this bounds a long sweep.
RDP_MEMO_SIZE = 4096
#: Grids kept (each a few floats): one per distinct composition a process accounts.
DOMAIN_MEMO_SIZE = 1024


@functools.lru_cache(maxsize=RDP_MEMO_SIZE)
def _one_step_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """Opacus' ``compute_rdp(q, sigma, steps=1, orders)`` before the multiplication by steps (read-only), by
    :func:`~privatune.common.accountants.rdp_series.compute_rdp_one_step` (Opacus' floats, faster)."""
    out = np.array([compute_rdp_one_step(q, sigma, order) for order in orders])
    out.setflags(write=False)
    return out


def compute_rdp(*, q: float, noise_multiplier: float, steps: int, orders: Sequence[float]) -> np.ndarray:
    """``opacus.accountants.analysis.rdp.compute_rdp`` for a list of orders: the same array, memoised per step."""
    return _one_step_rdp(float(q), float(noise_multiplier), tuple(orders)) * steps


def rdp_epsilon(history: Sequence[Mechanism], delta: float, alphas: Sequence[float] | None = None) -> float:
    """Opacus' ``RDPAccountant(history).get_epsilon(delta)`` (its ``get_privacy_spent``, line for line)."""
    from opacus.accountants import RDPAccountant as OpacusRDP
    from opacus.accountants.analysis import rdp as privacy_analysis

    if not history:
        return 0.0
    orders = list(OpacusRDP.DEFAULT_ALPHAS if alphas is None else alphas)
    rdp = sum(
        [
            compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=num_steps, orders=orders)
            for (noise_multiplier, sample_rate, num_steps) in history
        ]
    )
    eps, _ = privacy_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=DOMAIN_MEMO_SIZE)
def _safe_domain(history: tuple[Mechanism, ...], eps_error: float, delta_error: float) -> Any:
    """Opacus' ``PRVAccountant._get_domain`` (with ``compute_safe_domain_size``) for ``history``'s mechanisms."""
    from opacus.accountants.analysis.prv.domain import Domain

    compositions = [steps for _, _, steps in history]
    total = sum(compositions)
    size = rdp_epsilon(list(history), delta_error / 4)
    for noise, rate, _ in history:
        size = max(size, rdp_epsilon([(noise, rate, 1)], delta=delta_error / (8 * total)))
    half_width = max(size, eps_error) + 3
    mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    return Domain.create_aligned(-half_width, half_width, mesh_size)


def prv_domain(history: Sequence[Mechanism], eps_error: float, delta_error: float) -> Any:
    """The grid Opacus' PRV accountant discretises ``history`` on (an ``opacus...prv.Domain``, shared: do not
    change it)."""
    key = tuple((noise, rate, int(steps)) for noise, rate, steps in history)
    return _safe_domain(key, float(eps_error), float(delta_error))


@functools.cache
def _memo_prv_class() -> Any:
    """Opacus' ``PRVAccountant`` with its grid from :func:`prv_domain` (made once: opacus is imported lazily)."""
    from opacus.accountants import PRVAccountant as OpacusPRV

    class MemoPRV(OpacusPRV):
        def _get_domain(self, prvs: Any, num_self_compositions: Any, eps_error: float, delta_error: float) -> Any:
            mechanisms = [
                (p.noise_multiplier, p.sample_rate, n) for p, n in zip(prvs, num_self_compositions, strict=True)
            ]
            return prv_domain(mechanisms, eps_error, delta_error)

    return MemoPRV


def memo_prv_accountant(history: Sequence[Mechanism]) -> Any:
    """An Opacus ``PRVAccountant`` holding ``history`` whose grid comes from :func:`prv_domain`."""
    acc = _memo_prv_class()()
    acc.history = list(history)
    return acc
