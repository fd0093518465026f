"""The true epsilon of a client's whole run, recomputed from its data size alone (not from what either side says).

Both sides train each round with Opacus' Poisson sampling at ``q = 1 / ceil(n / B)`` for ``ceil(n / B)`` steps an
epoch, so a client with ``n`` records that trained ``R`` rounds of ``E`` local epochs released the composition of
``R * E * ceil(n / B)`` subsampled Gaussian steps at noise multiplier ``sigma``. Its epsilon is computed here with
dp-accounting's PLD (another library than the Opacus accountants both sides report with) and Opacus' RDP bound.
"""

from __future__ import annotations

from privatune.common.accountants import PLD, RDP
from privatune.common.accounting import Mechanism, epsilon_of, sample_rate, steps_per_epoch

#: The accountants of the recomputation: dp-accounting's PLD (tight) and the RDP upper bound.
ACCOUNTANTS = (PLD, RDP)


def round_mechanism(num_records: int, batch_size: int, local_epochs: int, noise_multiplier: float) -> Mechanism:
    """One round of local DP-SGD: ``(sigma, q, steps)``."""
    return (
        float(noise_multiplier),
        sample_rate(num_records, batch_size),
        local_epochs * steps_per_epoch(num_records, batch_size),
    )


def composed_epsilon(
    num_records: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    noise_multiplier: float,
    delta: float,
    accountant: str = PLD,
) -> float:
    """Epsilon at ``delta`` of ``rounds`` rounds (0 rounds: nothing spent)."""
    mech = round_mechanism(num_records, batch_size, local_epochs, noise_multiplier)
    return epsilon_of([mech] * rounds, delta, accountant)


def true_epsilons(
    num_records: dict[str, int],
    rounds_trained: dict[str, int],
    batch_size: int,
    local_epochs: int,
    noise_multiplier: float,
    delta: float,
) -> dict[str, dict[str, float]]:
    """Per client: its one-round and all-rounds epsilon under each of :data:`ACCOUNTANTS`."""
    out: dict[str, dict[str, float]] = {}
    for client, n in sorted(num_records.items()):
        rounds = rounds_trained.get(client, 0)
        row: dict[str, float] = {}
        for acc in ACCOUNTANTS:
            row[f"one_round_{acc}"] = composed_epsilon(n, batch_size, local_epochs, 1, noise_multiplier, delta, acc)
            row[f"composed_{acc}"] = composed_epsilon(n, batch_size, local_epochs, rounds, noise_multiplier, delta, acc)
        out[client] = row
    return out
