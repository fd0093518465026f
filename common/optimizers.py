"""The optimisers a run may train with (``optimizer`` in the run config) and how far each can move a weight;
the server optimisers' names and settings check (``server-optimiser``, FedProx's ``proximal-mu``: issue 15).

Sites build the optimiser (:mod:`privatune.client.dp_options`); the coordinator bounds how far an honest
update can move (:func:`privatune.server.screening.dp_change_bound`). Both read the names and Adam's fixed
hyperparameters from here, so they agree. Free of torch.

Under DP the optimiser only post-processes the noised gradient (Opacus' ``DPOptimizer`` clips and noises,
then hands the result to SGD or Adam): it changes neither the mechanism nor its epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from privatune.common.config import RunConfig

OPTIMIZER_SGD = "sgd"
OPTIMIZER_ADAM = "adam"
OPTIMIZERS: tuple[str, ...] = (OPTIMIZER_SGD, OPTIMIZER_ADAM)

# Adam as every site builds it: torch's defaults, no weight decay, no AMSGrad, a fresh state every round.
ADAM_BETAS: tuple[float, float] = (0.9, 0.999)
ADAM_EPS = 1e-8


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return name


def adam_step_factor(t: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The most one Adam step ``t`` (1-based, bias-corrected) can move one coordinate, in units of lr.

    Adam moves a coordinate by lr m_hat / (sqrt(v_hat) + eps) with m_t = sum_i (1 - b1) b1^(t-i) g_i and
    v_t = sum_i (1 - b2) b2^(t-i) g_i^2. Cauchy-Schwarz gives |m_t| <= sqrt(v_t) (1 - b1) / sqrt(1 - b2)
    sqrt(sum_{k<t} (b1^2 / b2)^k) whatever the gradients, and eps only shrinks the step; the bias corrections
    add the factor sqrt(1 - b2^t) / (1 - b1^t). With torch's betas this is 1 at t = 1 and rises to 7.3 for large
    t ("about lr" per step is Kingma and Ba's rule of thumb, not a bound). Needs b1^2 < b2.
    """
    b1, b2 = betas
    if t < 1:
        raise ValueError("Adam steps count from 1")
    if not (0 <= b1 < 1 and 0 < b2 < 1 and b1 * b1 < b2):
        raise ValueError(f"the Adam bound needs 0 <= b1 < 1, 0 < b2 < 1 and b1^2 < b2, got {betas}")
    r = b1 * b1 / b2
    geometric = float(t) if r == 1.0 else (1.0 - r**t) / (1.0 - r)
    return math.sqrt(1.0 - b2**t) / (1.0 - b1**t) * (1.0 - b1) / math.sqrt(1.0 - b2) * math.sqrt(geometric)


_EXACT_STEPS = 10_000  # beyond this the per-step factor is bounded by its limit (cost stays O(1) in steps)


def adam_max_coordinate_move(steps: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The most ``steps`` Adam steps from a fresh state can move one coordinate, in units of lr.

    Exact sum of :func:`adam_step_factor` up to 10,000 steps; each later step counts as the factor's supremum
    over t > 10,000 (sqrt(1 - b2^t) <= 1, 1 / (1 - b1^t) <= 1 / (1 - b1^10000)), so the result stays an upper bound.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    exact = min(steps, _EXACT_STEPS)
    total = sum(adam_step_factor(t, betas) for t in range(1, exact + 1))
    if steps > exact:
        b1, b2 = betas
        limit = (1.0 - b1) / math.sqrt(1.0 - b2) / math.sqrt(1.0 - b1 * b1 / b2) / (1.0 - b1**_EXACT_STEPS)
        total += (steps - exact) * limit
    return total


# -- server optimisers (server/optimisers.py; docs/server-optimisers.md) ----------------------------------------
SERVER_OPTIMISERS: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi")
#: Flower 1.42's default server learning rates (FedAvgM server_learning_rate, FedAdam / FedYogi eta): server-lr 0.
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-1, "fedyogi": 1e-2}


def check_server_optimiser(cfg: RunConfig, need: Callable[[bool, str, str], None]) -> None:
    """RunConfig.validate's checks of the server optimiser and FedProx keys (``need(ok, key, message)``).

    Under HE the server holds only the encrypted sums [sum w*v, sum w]: the mean is formed at decryption, so
    no server step can be taken on it (FedProx, at the sites, works). With SGD a proximal step ``lr mu`` above 2
    overshoots the global model every step and diverges (and would break the server's change bound).
    """
    opt = cfg.server_optimiser
    need(opt in SERVER_OPTIMISERS, "server-optimiser", f"'{opt}' is not one of {SERVER_OPTIMISERS}")
    need(
        opt == "fedavg" or cfg.secure_aggregation != "he",
        "server-optimiser",
        f"'{opt}' steps from the plaintext mean update"
        + (" and its squares" if opt in ("fedadam", "fedyogi") else "")
        + ", but under secure-aggregation=he the server holds only encrypted sums (the mean is formed at "
        "decryption); use server-optimiser=fedavg with he (proximal-mu works with he), or secure-aggregation=none",
    )
    need(math.isfinite(cfg.server_lr) and cfg.server_lr >= 0, "server-lr", "must be a finite number >= 0 (0 = default)")
    need(0 <= cfg.server_momentum < 1, "server-momentum", f"must be in [0, 1), got {cfg.server_momentum:g}")
    need(0 <= cfg.server_beta1 < 1, "server-beta1", f"must be in [0, 1), got {cfg.server_beta1:g}")
    need(0 <= cfg.server_beta2 < 1, "server-beta2", f"must be in [0, 1), got {cfg.server_beta2:g}")
    need(math.isfinite(cfg.server_tau) and cfg.server_tau > 0, "server-tau", f"must be > 0, got {cfg.server_tau:g}")
    mu = cfg.proximal_mu
    need(math.isfinite(mu) and mu >= 0, "proximal-mu", f"must be a finite number >= 0 (0 = off), got {mu:g}")
    top_lr = cfg.lr * max(1.0, cfg.backbone_lr_scale)
    need(
        cfg.optimizer != OPTIMIZER_SGD or mu * top_lr <= 2.0,
        "proximal-mu",
        f"{mu:g} with optimizer=sgd at lr {top_lr:g} gives a proximal step lr x mu = {mu * top_lr:g} > 2, which "
        f"overshoots the global model and diverges; use proximal-mu <= {2.0 / top_lr:g} (FedProx uses 0.001-1)",
    )
