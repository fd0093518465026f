"""Server optimisers: the step the coordinator takes from the round's aggregate (docs/server-optimisers.md).

FedAvg takes the aggregate as the next global model. FedAvgM (Hsu et al. 2019), FedAdam and FedYogi (Reddi et
al. 2021, "Adaptive Federated Optimization") treat ``current - aggregate`` as a pseudo-gradient and step on it
with server momentum or adaptive moments. The maths is Flower 1.42's, written as pure functions of
``(current, aggregated, state, round)`` so the strategy keeps no hidden state and a resume can checkpoint it:

- FedAvgM: ``flwr/serverapp/strategy/fedavgm.py`` ``FedAvgM.aggregate_train`` (momentum ``m = beta m + g``,
  the first round ``m = g``; ``new = current - lr m``; with momentum 0 and lr 1 the aggregate itself);
- FedAdam / FedYogi: ``flwr/serverapp/strategy/fedopt.py`` ``FedOpt._compute_deltat_and_mt`` (``delta =
  aggregate - current``, ``m = b1 m + (1 - b1) delta``) and ``fedadam.py`` / ``fedyogi.py``
  ``aggregate_train`` (Adam's ``v = b2 v + (1 - b2) delta^2`` and bias-corrected rate ``eta sqrt(1 - b2^(t+1)) /
  (1 - b1^(t+1))``; Yogi's ``v = v - (1 - b2) delta^2 sign(v - delta^2)`` and rate ``eta``);
  ``new = current + rate m / (sqrt(v) + tau)``.

The aggregate is whatever the run's ``aggregator`` produced (FedAvg's weighted mean, or a robust one): the
optimiser only sees the resulting weights, so they compose. All of it is post-processing of DP-noised
updates (no privacy cost). Plaintext only: under HE the server holds encrypted sums (config refuses it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from privatune.common.config import RunConfig
from privatune.common.optimizers import DEFAULT_SERVER_LR

__all__ = ["DEFAULT_SERVER_LR", "ServerOptimiser", "State", "fedavgm_step", "fedopt_step"]

State = dict[str, np.ndarray]  # flat: "momentum/<name>", "m/<name>", "v/<name>" (a resume saves it as is)


@dataclass(frozen=True)
class ServerOptimiser:
    """One run's server optimiser and its settings (server-lr resolved to the optimiser's default)."""

    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ServerOptimiser:
        name = cfg.server_optimiser
        return cls(
            name=name,
            lr=cfg.server_lr or DEFAULT_SERVER_LR[name],
            momentum=cfg.server_momentum,
            beta1=cfg.server_beta1,
            beta2=cfg.server_beta2,
            tau=cfg.server_tau,
        )

    def summary(self) -> dict[str, Any]:
        """summary.json's record of the optimiser: its name and only the settings it uses."""
        if self.name == "fedavg":
            return {"name": "fedavg"}
        if self.name == "fedavgm":
            return {"name": self.name, "lr": self.lr, "momentum": self.momentum}
        return {"name": self.name, "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def step(
        self,
        current: Mapping[str, np.ndarray],
        aggregated: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        server_round: int,
    ) -> tuple[dict[str, np.ndarray], State]:
        """The next global weights (in ``current``'s dtypes) and the new state; the inputs are not changed."""
        if set(current) != set(aggregated):
            raise ValueError(
                f"the aggregate's arrays {sorted(aggregated)} are not the global model's {sorted(current)}"
            )
        if self.name == "fedavg":
            return {k: np.asarray(v) for k, v in aggregated.items()}, dict(state)
        if self.name == "fedavgm":
            new, out = fedavgm_step(current, aggregated, state, self.lr, self.momentum)
        elif self.name in ("fedadam", "fedyogi"):
            new, out = fedopt_step(
                self.name, current, aggregated, state, server_round, self.lr, self.beta1, self.beta2, self.tau
            )
        else:
            raise ValueError(f"unknown server optimiser {self.name!r}")
        return {k: np.asarray(v, dtype=np.asarray(current[k]).dtype) for k, v in new.items()}, out


def fedavgm_step(
    current: Mapping[str, np.ndarray],
    aggregated: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
    lr: float,
    momentum: float,
) -> tuple[dict[str, np.ndarray], State]:
    """Flower's FedAvgM: pseudo-gradient ``g = current - aggregate``; ``m = g`` in the first round, then
    ``beta m + g``; ``new = current - lr m`` (torch.optim.SGD's convention, no Nesterov)."""
    if momentum == 0.0 and lr == 1.0:  # Flower's server_opt=False: the aggregate unchanged
        return {k: np.asarray(v) for k, v in aggregated.items()}, dict(state)
    out: State = dict(state)
    new: dict[str, np.ndarray] = {}
    for k, old in current.items():
        g = old - aggregated[k]
        if momentum > 0.0:
            prev = state.get(f"momentum/{k}")
            g = g if prev is None else momentum * prev + g
            out[f"momentum/{k}"] = g
        new[k] = old - lr * g
    return new, out


def fedopt_step(
    name: str,
    current: Mapping[str, np.ndarray],
    aggregated: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
    server_round: int,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[dict[str, np.ndarray], State]:
    """Flower's FedAdam (``name="fedadam"``) or FedYogi (``"fedyogi"``); moments start at zero."""
    out: State = dict(state)
    new: dict[str, np.ndarray] = {}
    if name == "fedadam":
        rate = eta * np.sqrt(1 - np.power(beta2, server_round + 1.0)) / (1 - np.power(beta1, server_round + 1.0))
    else:
        rate = eta
    for k, old in current.items():
        delta = aggregated[k] - old
        m = beta1 * state.get(f"m/{k}", np.zeros_like(delta)) + (1 - beta1) * delta
        v = state.get(f"v/{k}", np.zeros_like(delta))
        if name == "fedadam":
            v = beta2 * v + (1 - beta2) * (delta**2)
        else:
            v = v - (1.0 - beta2) * (delta**2) * np.sign(v - delta**2)
        out[f"m/{k}"], out[f"v/{k}"] = m, v
        new[k] = old + rate * m / (np.sqrt(v) + tau)
    return new, out
