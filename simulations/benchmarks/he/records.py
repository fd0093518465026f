"""The HE benchmark's records: the messages the apps build, their bytes, and the HE operations timed on them.

Separate from the federations: these figures come from records rebuilt in this process, not from a run's log.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from privatune.common.config import RunConfig
from privatune.simulations.benchmarks.he.plan import Case


def per_million(seconds: float, num_params: int) -> float:
    return seconds * 1e6 / num_params if num_params else math.nan


def modelled_he_extra(ops: Mapping[str, float], clients: int, workers: int) -> float:
    """Seconds HE adds to one round: each client's train message loads the key, decrypts and encrypts,
    its evaluate message loads the key and decrypts (minus the plaintext decode/encode they replace),
    the clients spread over ``workers`` parallel Ray workers; the server then adds every reply."""
    waves = math.ceil(clients / max(1, min(workers, clients)))
    client = 2 * ops["ctx_load"] + 2 * ops["decrypt"] + ops["encrypt"] - 2 * ops["plain_decode"] - ops["plain_encode"]
    return waves * client + ops["aggregate"] - ops["plain_aggregate"]


def record_bytes(record: Any) -> dict[str, int]:
    """Serialised size of an ArrayRecord: ``payload`` (array bytes) and ``proto`` (as Flower sends it)."""
    from flwr.common.serde import array_record_to_proto

    payload = sum(len(arr.data) for arr in record.values())
    return {"payload": int(payload), "proto": int(array_record_to_proto(record).ByteSize())}


def relative_error(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> float:
    num = math.sqrt(sum(float(np.sum((np.asarray(got[k], np.float64) - ref[k]) ** 2)) for k in ref))
    den = math.sqrt(sum(float(np.sum(np.asarray(ref[k], np.float64) ** 2)) for k in ref))
    return num / den if den else math.nan


def fedavg(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {
        k: np.asarray(sum(np.asarray(s[k], np.float64) * w for s, w in zip(states, weights, strict=False)) / total)
        for k in states[0]
    }


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """(first result, median CPU seconds, median wall seconds) over ``repeats`` calls."""
    cpu, wall, first = [], [], None
    for i in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        if i == 0:
            first = out
    return first, statistics.median(cpu), statistics.median(wall)


def client_states(base: Mapping[str, np.ndarray], clients: int, seed: int) -> list[dict[str, np.ndarray]]:
    """K distinct realistic updates: the trained weights plus a per-client perturbation."""
    rng = np.random.default_rng(seed)
    return [
        {k: (v + 1e-3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()} for _ in range(clients)
    ]


def measure_records(
    case: Case, he_run_dir: Path, base_state: Mapping[str, np.ndarray], weights: Sequence[int], repeats: int
) -> dict[str, Any]:
    """Build every record the apps build, size them, and time the HE operations on them."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from privatune.client.app import encode_update
    from privatune.client.site_config import SiteConfig
    from privatune.common import he
    from privatune.common.he.records import arrayrecord_to_state, arrayrecord_to_update, state_to_arrayrecord

    cfg_he = RunConfig.from_flower(json.loads((he_run_dir / "config.json").read_text()))
    cfg_plain = replace(cfg_he, secure_aggregation="none", he_public_context="")
    secret = Path(cfg_he.he_public_context).parent / "secret.ctx"
    sites = [
        SiteConfig.from_node_config({"partition-id": i, "num-partitions": case.clients}, cfg_he)
        for i in range(case.clients)
    ]
    states = client_states(base_state, case.clients, seed=cfg_he.seed)
    n_params = int(sum(v.size for v in base_state.values()))
    k = case.clients

    # What the apps send, built with their own functions.
    plain_up = [encode_update(s, w, cfg_plain, site) for s, w, site in zip(states, weights, sites, strict=False)]
    he_up = [encode_update(s, w, cfg_he, site) for s, w, site in zip(states, weights, sites, strict=False)]
    contents = [
        RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": int(w)})})
        for r, w in zip(plain_up, weights, strict=False)
    ]

    sctx = he.load_context(secret, require_secret=True)
    pctx = he.load_context(cfg_he.he_public_context, require_secret=False)

    def server_he() -> Any:  # what PrivatuneFedAvg.aggregate_train does under HE
        acc = he.HEAccumulator(pctx, n_params)
        for rec in he_up:
            acc.add(arrayrecord_to_update(rec))
        return state_to_arrayrecord(acc.result())

    plain_down, t_pagg_cpu, t_pagg_wall = _timed(lambda: aggregate_arrayrecords(contents, "num-examples"), repeats)
    he_down, t_agg_cpu, t_agg_wall = _timed(server_he, repeats)
    _, t_ctx_cpu, t_ctx_wall = _timed(lambda: he.load_context(secret, require_secret=True), repeats)
    _, t_enc_cpu, t_enc_wall = _timed(lambda: he_records_update(sctx, states[0], weights[0]), repeats)
    _, t_penc_cpu, t_penc_wall = _timed(lambda: encode_update(states[0], weights[0], cfg_plain, sites[0]), repeats)
    decrypted, t_dec_cpu, t_dec_wall = _timed(lambda: he.decrypt_state(sctx, arrayrecord_to_state(he_down)), repeats)
    _, t_pdec_cpu, t_pdec_wall = _timed(lambda: {key: v.numpy() for key, v in plain_down.items()}, repeats)
    initial_he = state_to_arrayrecord(he.encrypt_state(pctx, base_state))

    ref = fedavg(states, weights)
    sizes = {
        "upload_plain": record_bytes(plain_up[0]),
        "upload_he": record_bytes(he_up[0]),
        "download_plain": record_bytes(plain_down),
        "download_he": record_bytes(he_down),
        "initial_state_he": record_bytes(initial_he),
    }
    cpu = {
        "ctx_load": t_ctx_cpu,
        "encrypt": t_enc_cpu,
        "aggregate": t_agg_cpu,
        "decrypt": t_dec_cpu,
        "plain_encode": t_penc_cpu,
        "plain_aggregate": t_pagg_cpu,
        "plain_decode": t_pdec_cpu,
    }
    wall = {
        "ctx_load": t_ctx_wall,
        "encrypt": t_enc_wall,
        "aggregate": t_agg_wall,
        "decrypt": t_dec_wall,
        "plain_encode": t_penc_wall,
        "plain_aggregate": t_pagg_wall,
        "plain_decode": t_pdec_wall,
    }
    return {
        "num_params": n_params,
        "num_ciphertexts": sctx.num_chunks(n_params),
        "clients": k,
        "weights": [int(w) for w in weights],
        "bytes": sizes,
        "ops_cpu_seconds": cpu,
        "ops_wall_seconds": wall,
        "he_vs_fedavg_relative_error": relative_error(decrypted, ref),
        "plain_vs_fedavg_relative_error": relative_error({key: v.numpy() for key, v in plain_down.items()}, ref),
        "params": sctx.params.to_dict(),
        "states": states,  # dropped before JSON; the alternatives reuse them
    }


def he_records_update(ctx: Any, state: Mapping[str, np.ndarray], weight: float) -> Any:
    """The client's encryption step alone (``encode_update`` without its per-message key load)."""
    from privatune.common import he
    from privatune.common.he.records import update_to_arrayrecord

    return update_to_arrayrecord(he.encrypt_update(ctx, state, weight=float(weight)))


def parameter_alternatives(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[int]) -> list[dict[str, Any]]:
    """Bytes and aggregation error of the same updates under other CKKS parameters (not what runs)."""
    from privatune.common import he
    from privatune.common.he.records import state_to_arrayrecord, update_to_arrayrecord

    options = {
        "default (N=8192, 60/60/60)": lambda: he.HEParams(),
        "compact (N=8192, 60/40)": he.compact_params,
        "compact N=4096 (60/40)": lambda: he.HEParams(
            poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 40), global_scale_bits=40, round_bits=8, max_summands=64
        ),
    }
    # float64 so that the error shown is the CKKS error, not the float32 rounding of the model's dtype.
    states = [{k: np.asarray(v, np.float64) for k, v in s.items()} for s in states]
    ref = fedavg(states, weights)
    rows = []
    for name, make in options.items():
        row: dict[str, Any] = {"params": name}
        try:
            params = make()
            kp = he.generate_keys(params)
            sctx = he.load_context(kp.secret_context, require_secret=True)
            pctx = he.load_context(kp.public_context, require_secret=False)
            ups = [he.encrypt_update(sctx, s, float(w)) for s, w in zip(states, weights, strict=False)]
            acc = he.HEAccumulator(pctx, ups[0].layout)
            for u in ups:
                acc.add(u)
            state = acc.result()
            row.update(
                upload=record_bytes(update_to_arrayrecord(ups[0]))["proto"],
                download=record_bytes(state_to_arrayrecord(state))["proto"],
                relative_error=relative_error(he.decrypt_state(sctx, state), ref),
                num_ciphertexts=len(ups[0].chunks),
            )
        except he.HEError as err:
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return rows
