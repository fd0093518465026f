"""Names both sides agree on: message keys and reply statuses."""

from __future__ import annotations

# Keys the server adds to the run config it sends; they are not part of RunConfig.
PROTOCOL_KEYS = frozenset({"server-round", "run-id"})

STATUS_TRAINED = "trained"  # an update is attached
STATUS_BUDGET = "budget-exhausted"  # the site's privacy budget (or the run's target) forbids this round
STATUS_DATA_ERROR = "data-error"  # the site's data failed validation; nothing was trained
STATUS_REFUSED = "refused"  # any other refusal (bad keys, bad config at this site)
STATUS_EVALUATED = "evaluated"
