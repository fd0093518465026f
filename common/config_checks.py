"""Groups of RunConfig checks kept out of common/config.py, which holds the fields: each takes the config and the
``need(condition, key, message)`` reporter of ``RunConfig.validate``, so every error still names its key."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from privatune.common.accounting import TARGET_EPSILON_MAX, TARGET_EPSILON_MIN

if TYPE_CHECKING:
    from privatune.common.config import RunConfig

Need = Callable[[bool, str, str], None]


def check_dp(cfg: RunConfig, need: Need) -> None:
    """The privacy keys: a target epsilon the calibration reaches, a delta that protects, a usable noise and clip."""
    from privatune.common.config import MAX_DELTA

    need(
        cfg.target_epsilon > 0 and not math.isnan(cfg.target_epsilon),
        "target-epsilon",
        f"must be > 0 (got {cfg.target_epsilon}); use inf or dp=false for a non-private baseline",
    )
    need(
        not cfg.private or cfg.noise_multiplier > 0 or TARGET_EPSILON_MIN <= cfg.target_epsilon <= TARGET_EPSILON_MAX,
        "target-epsilon",
        f"{cfg.target_epsilon:g} is outside the range the noise calibration reaches, "
        f"[{TARGET_EPSILON_MIN:g}, {TARGET_EPSILON_MAX:g}]; use inf (or dp=false) for a non-private baseline",
    )
    need(
        cfg.delta == 0 or 0 < cfg.delta < MAX_DELTA,
        "delta",
        f"must be in (0, {MAX_DELTA:g}) or 0, got {cfg.delta:g}; 0 means each site's own delta",
    )
    need(
        math.isfinite(cfg.noise_multiplier) and cfg.noise_multiplier >= 0,
        "noise-multiplier",
        f"must be a finite number >= 0 (0 = calibrate from target-epsilon), got {cfg.noise_multiplier:g}",
    )
    need(
        math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm > 0,
        "max-grad-norm",
        f"must be a finite number > 0 (the clipping bound the noise is scaled to), got {cfg.max_grad_norm:g}",
    )


def check_aggregation(cfg: RunConfig, need: Need) -> None:
    """How the server combines updates: HE only adds ciphertexts, so the robust aggregators need plaintext."""
    from privatune.common.config import AGGREGATORS, SECURE_AGGREGATION

    need(
        cfg.secure_aggregation in SECURE_AGGREGATION,
        "secure-aggregation",
        f"must be one of {SECURE_AGGREGATION}",
    )
    need(cfg.aggregator in AGGREGATORS, "aggregator", f"'{cfg.aggregator}' is not one of {AGGREGATORS}")
    need(
        cfg.aggregator == "fedavg" or cfg.secure_aggregation != "he",
        "aggregator",
        f"'{cfg.aggregator}' compares plaintext updates, but secure-aggregation=he only lets the server add "
        "ciphertexts; use aggregator=fedavg with he, or secure-aggregation=none",
    )
    need(0 <= cfg.trim_beta < 0.5, "trim-beta", "must be in [0, 0.5): the fraction cut at each end")
    need(cfg.krum_byzantine >= 0, "krum-byzantine", "must be >= 0")
    need(cfg.krum_select >= 1, "krum-select", "must be at least 1 (1 = Krum, more = MultiKrum)")
    if cfg.aggregator == "krum" and cfg.krum_byzantine > 0:
        need(
            cfg.min_clients >= 2 * cfg.krum_byzantine + 3,
            "krum-byzantine",
            f"Krum tolerates f={cfg.krum_byzantine} faulty clients only with at least 2f+3 = "
            f"{2 * cfg.krum_byzantine + 3} replies; raise min-clients or lower krum-byzantine",
        )


def check_personalisation(cfg: RunConfig, need: Need) -> None:
    """Personalisation (issue 15, docs/personalisation.md): a kept head needs a body that travels; a final
    personalisation needs epochs, its own target and a mode."""
    need(
        not cfg.personal_head or cfg.mode != "head",
        "personal-head",
        "in mode=head only the head trains, so with personal-head nothing would travel; use mode=last-k, lora or "
        "full, or personal-head=false",
    )
    need(cfg.personalise_epochs >= 0, "personalise-epochs", "must be >= 0 (0 = no final personalisation)")
    need(
        cfg.personalise_epsilon > 0 and not math.isnan(cfg.personalise_epsilon),
        "personalise-epsilon",
        "must be > 0: the final personalisation's own epsilon target at each site",
    )
    need(cfg.personalise_mode in ("run", "head"), "personalise-mode", "must be run (the mode's set) or head")


def check_scale(cfg: RunConfig, need: Need) -> None:
    """issue 13: the federated-evaluation sample (docs/scale.md)."""
    need(
        0 <= cfg.fraction_evaluate <= 1,
        "fraction-evaluate",
        f"must be in [0, 1] (got {cfg.fraction_evaluate:g}); 0 = no federated evaluation",
    )
    need(
        cfg.personalise_epochs == 0 or cfg.fraction_evaluate == 1,
        "fraction-evaluate",
        "personalise-epochs > 0 personalises every site in the last evaluation, so it needs fraction-evaluate=1",
    )
