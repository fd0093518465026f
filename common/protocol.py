"""Names both sides agree on: message keys and reply statuses."""

from __future__ import annotations

# Keys the server adds to the run config it sends; they are not part of RunConfig.
PROTOCOL_KEYS = frozenset({"server-round", "run-id"})

STATUS_TRAINED = "trained"  # an update is attached
STATUS_BUDGET = "budget-exhausted"  # the site's privacy budget (or the run's target) forbids this round
STATUS_DATA_ERROR = "data-error"  # the site's data failed validation; nothing was trained
STATUS_REFUSED = "refused"  # any other refusal (bad keys, bad config at this site)
STATUS_EVALUATED = "evaluated"

# Where a site's DP randomness came from (the reply's status record, the site and server ledgers, summary.json).
KEY_NOISE_SOURCE = "noise-source"
NOISE_SOURCE_SITE = "site-csprng"  # the default everywhere: unpredictable by anyone but the site
NOISE_SOURCE_SEEDED = "seeded"  # simulation only, an explicit and recorded choice
NOISE_SOURCES = (NOISE_SOURCE_SITE, NOISE_SOURCE_SEEDED)
