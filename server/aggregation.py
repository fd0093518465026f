"""Aggregation of plaintext client updates that passed screening (server.screening).

The aggregators are Flower's (``flwr.serverapp.strategy``): FedAvg's weighted mean
(``aggregate_arrayrecords``), FedMedian's coordinate-wise median, FedTrimmedAvg's ``trim_mean`` and
Krum / MultiKrum's ``select_multikrum``. They are called here on the screened replies' contents instead
of through Flower's strategy classes, whose ``aggregate_train`` would re-screen (and mutate) the replies.

- fedavg: mean weighted by ``num-examples`` (the default; the only one under HE, which adds ciphertexts);
- fedmedian: unweighted coordinate-wise median;
- fedtrimmedavg: unweighted coordinate-wise mean after cutting the ``trim-beta`` fraction at each end;
- krum: the ``krum-select`` replies with the smallest Krum score (sum of squared distances to their
  n - f - 2 nearest, f = ``krum-byzantine``), averaged by ``num-examples``; krum-select 1 is Krum.

All of them are post-processing of DP-noised updates: the privacy accounting does not change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from privatune.common.protocol import KEY_EVAL_COUNT, KEY_FED_ACCURACY, KEY_FED_LOSS, KEY_NUM_EXAMPLES
from privatune.server.records import screened_arrays

AGGREGATORS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")


class UpdateRejected(ValueError):
    """An update the server will not aggregate; the message is the logged reason."""


def aggregate_plain(
    contents: Sequence[RecordDict],
    aggregator: str = "fedavg",
    *,
    trim_beta: float = 0.2,
    krum_byzantine: int = 0,
    krum_select: int = 1,
    weighted: bool = True,
) -> ArrayRecord:
    """Aggregate the ``arrays`` of screened train replies (each: one ArrayRecord + a MetricRecord).
    ``weighted``: FedAvg (and Krum's average) weight by ``num-examples``; False: equal weights (the sites sent
    no count, run-config ``weighting="equal"``)."""
    contents = list(contents)
    if not contents:
        raise ValueError("nothing to aggregate")

    def mean(chosen: Sequence[RecordDict]) -> ArrayRecord:
        if weighted:
            return aggregate_arrayrecords(list(chosen), KEY_NUM_EXAMPLES)
        avg = equal_mean([{k: v.numpy() for k, v in screened_arrays(c).items()} for c in chosen])
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in avg.items()})

    if aggregator == "fedavg":
        return mean(contents)
    if aggregator == "krum":
        chosen = select_multikrum(
            contents, num_malicious_nodes=krum_byzantine, num_nodes_to_select=min(krum_select, len(contents))
        )
        return mean(chosen)
    if aggregator not in ("fedmedian", "fedtrimmedavg"):
        raise ValueError(f"unknown aggregator {aggregator!r}; choose one of {AGGREGATORS}")
    updates = [screened_arrays(c) for c in contents]
    out = ArrayRecord()
    for key in updates[0]:
        layers = np.stack([u[key].numpy() for u in updates])
        if aggregator == "fedmedian":
            agg = np.median(layers, axis=0)  # FedMedian.aggregate_train's reduction
        else:
            agg = trim_mean(layers, trim_beta)
        out[key] = Array(np.asarray(agg, dtype=layers.dtype))
    return out


def equal_mean(states: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """FedAvg with equal weights (run-config weighting="equal": no site sends its example count)."""
    if not states:
        raise ValueError("no states to average")
    out = {k: np.array(v, dtype=np.float64) for k, v in states[0].items()}
    for s in states[1:]:
        for k in out:
            out[k] += s[k]
    return {k: (v / len(states)).astype(np.asarray(states[0][k]).dtype) for k, v in out.items()}


def pool_noised_eval(sums: list[tuple[float, float, float]]) -> dict[str, float] | None:
    """Federated accuracy and loss from the sites' noised (correct, clipped loss sum, count) sums.

    Ratios of sums pooled over sites (post-processing of DP releases: no further cost); clamped to their
    ranges because noise can push a ratio outside them. None when the pooled count is not positive.
    """
    correct = sum(c for c, _, _ in sums)
    loss = sum(loss_sum for _, loss_sum, _ in sums)
    count = sum(n for _, _, n in sums)
    if not sums or not count > 0:
        return None
    return {
        KEY_FED_ACCURACY: float(min(1.0, max(0.0, correct / count))),
        KEY_FED_LOSS: float(max(0.0, loss / count)),
        KEY_EVAL_COUNT: float(count),  # the pooled noised count
    }
