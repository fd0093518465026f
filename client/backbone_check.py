"""The site's model, and the check that it is the coordinator's: ``model-path`` puts the site's own copy of an
hf: folder (or torch: import folder) in place of the coordinator's path, and a round whose backbone fingerprint
(common/models/fingerprint.py) differs from the one the coordinator sent is refused before anything is spent.

What the coordinator learns of a refusal is only that the weights differ, or that the model does not load here:
never the site's paths or its fingerprint (the details stay in the site's log).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from privatune.client.round import Refusal
from privatune.client.site_config import SiteConfig
from privatune.common.config import RunConfig
from privatune.common.models import backbone_fingerprint
from privatune.common.models.names import model_source, relocate
from privatune.common.protocol import STATUS_REFUSED

log = logging.getLogger("privatune.client")


def site_run_config(cfg: RunConfig, site: SiteConfig) -> RunConfig:
    """The run config with the model this site loads: its ``model-path`` instead of the coordinator's folder."""
    if site.model_path is None:
        return cfg
    if model_source(cfg.model) == "preset":
        log.info("[%s] model-path ignored: the run uses the preset model '%s'", site.site_id, cfg.model)
        return cfg
    return replace(cfg, model=relocate(cfg.model, site.model_path))


def backbone_refusal(cfg: RunConfig, site: SiteConfig, expected: object, shown: str) -> Refusal | None:
    """Load this site's backbone (``cfg``: :func:`site_run_config`'s) and compare its fingerprint with the
    coordinator's (``expected``; a message without one is not checked). A Refusal when the model does not load
    or differs, None when it matches. ``shown``: the model as the coordinator named it (its reason says that)."""
    try:
        local = backbone_fingerprint(cfg.model)
    except (ValueError, OSError, RuntimeError) as err:  # a missing folder or package, a failing import
        log.error("[%s] the run's model does not load at this site: %s", site.site_id, err)
        return Refusal(
            STATUS_REFUSED,
            f"the run's model ({shown}) does not load at this site; the site's log has the details: install the "
            "coordinator's checkpoint and point model-path at it",
            site.site_id,
        )
    if not expected:
        log.warning("[%s] the coordinator sent no backbone fingerprint: not checked", site.site_id)
        return None
    if str(expected) != local:
        log.error(
            "[%s] backbone weights differ from the coordinator's: %s here is %s..., the coordinator's is %s...",
            site.site_id,
            cfg.model,
            local[:16],
            str(expected)[:16],
        )
        return Refusal(
            STATUS_REFUSED,
            f"backbone weights differ from the coordinator's (model {shown}): install the same checkpoint",
            site.site_id,
        )
    return None
