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

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

AGGREGATORS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
WEIGHT_KEY = "num-examples"
ARRAYS_KEY = "arrays"


class UpdateRejected(ValueError):
    """An update the server will not aggregate; the message is the logged reason."""


def aggregate_plain(
    contents: Sequence[RecordDict],
    aggregator: str = "fedavg",
    *,
    trim_beta: float = 0.2,
    krum_byzantine: int = 0,
    krum_select: int = 1,
) -> ArrayRecord:
    """Aggregate the ``arrays`` of screened train replies (each: one ArrayRecord + a MetricRecord)."""
    contents = list(contents)
    if not contents:
        raise ValueError("nothing to aggregate")
    if aggregator == "fedavg":
        return aggregate_arrayrecords(contents, WEIGHT_KEY)
    if aggregator == "krum":
        chosen = select_multikrum(contents, num_malicious_nodes=krum_byzantine,
                                  num_nodes_to_select=min(krum_select, len(contents)))
        return aggregate_arrayrecords(chosen, WEIGHT_KEY)
    if aggregator not in ("fedmedian", "fedtrimmedavg"):
        raise ValueError(f"unknown aggregator {aggregator!r}; choose one of {AGGREGATORS}")
    keys = list(contents[0][ARRAYS_KEY].keys())
    out = ArrayRecord()
    for key in keys:
        layers = np.stack([c[ARRAYS_KEY][key].numpy() for c in contents])
        if aggregator == "fedmedian":
            agg = np.median(layers, axis=0)  # FedMedian.aggregate_train's reduction
        else:
            agg = trim_mean(layers, trim_beta)
        out[key] = Array(np.asarray(agg, dtype=layers.dtype))
    return out


def weighted_mean(values: list[tuple[float, float]]) -> float:
    """Weighted mean of (value, weight) pairs; NaN when there is no weight."""
    total = sum(w for _, w in values)
    if total <= 0:
        return float("nan")
    return float(sum(v * w for v, w in values) / total)
