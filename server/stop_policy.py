"""When a federation stops early, and when a round keeps the last global model: the run's stop policy.

Kept apart from the strategy so the rule reads in one place: the run ends when too few sites still have
privacy budget to train (``FederationStopped``); a round with fewer valid updates than min-clients
aggregates nothing and the global model stands.
"""

from __future__ import annotations

from collections.abc import Sequence


class FederationStopped(RuntimeError):
    """Raised from a hook to end the run cleanly (e.g. too few clients have budget left)."""


def check_budgets(server_round: int, num_replies: int, exhausted: Sequence[str], min_clients: int) -> None:
    """Raise ``FederationStopped`` when the sites whose budget is exhausted leave fewer than min-clients."""
    can_still_train = num_replies - len(exhausted)
    if exhausted and can_still_train < min_clients:
        raise FederationStopped(
            f"round {server_round}: {len(exhausted)} client(s) have exhausted their privacy budget "
            f"({', '.join(sorted(exhausted))}); only {max(can_still_train, 0)} can still train and "
            f"min-clients is {min_clients}. The run ends here; the last global model stands."
        )


def enough_updates(num_accepted: int, min_clients: int) -> bool:
    """Whether a round has enough valid updates to aggregate."""
    return num_accepted >= min_clients
