"""Which clients train in a round: a sample drawn at the server from the run's seed and the round number.

Flower's FedAvg samples with the process-wide ``random`` module, so two runs with one seed train different
clients. Here the draw depends only on (seed, round, the connected node ids), so a run can be repeated and a
reader can tell from summary.json's ``participation`` who trained when. The sample is no secret and no privacy
amplification is claimed from it: each site composes its epsilon over the rounds it actually trained, with noise
calibrated as if it trained every round, so a site that sits rounds out ends below its target.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence


def sample_size(connected: int, fraction: float, clients_per_round: int, min_clients: int) -> int:
    """How many of ``connected`` clients train: ``clients_per_round`` if set, else ``fraction`` of them (floor,
    as Flower does), never fewer than ``min_clients`` nor more than are connected."""
    wanted = clients_per_round if clients_per_round > 0 else math.floor(connected * fraction)
    return min(connected, max(wanted, min_clients))


def sample_clients(
    node_ids: Sequence[int], count: int, seed: int, server_round: int, purpose: str = "train"
) -> list[int]:
    """``count`` of ``node_ids``, the same for the same seed, round and set of nodes (whatever their order).
    ``purpose="evaluate"`` draws the round's federated-evaluation sample, independently of the training one."""
    if not 0 <= count <= len(node_ids):
        raise ValueError(f"cannot sample {count} of {len(node_ids)} connected clients")
    salt = f"{seed}:{server_round}" if purpose == "train" else f"{purpose}:{seed}:{server_round}"
    digest = hashlib.sha256(f"privatune-sampling:{salt}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return sorted(rng.sample(sorted(node_ids), count))
