"""HE vs plaintext secure aggregation benchmark: round time, bytes on the wire, HE seconds per million parameters.

    python -m privatune.simulations.benchmarks.he             # the full benchmark (about 20 minutes on 2 busy cores)
    python -m privatune.simulations.benchmarks.he --quick     # a smoke run of the same pipeline, ~5 minutes (not for figures)
    python -m privatune.simulations.benchmarks.he --repeats 3 --out DIR    # 3 plaintext/HE run pairs per config

Two configurations, each measured with and without HE in the same invocation, same seeds:

* ``text-default``: the default text config (preset sms-spam, MiniLM, ``head`` mode, DP at epsilon 8),
  10 clients, the preset's 5 rounds; 770 trainable parameters, i.e. one CKKS ciphertext.
* ``digits-full``: full fine-tuning of ``digits-cnn`` (preset digits, ``mode=full``, 390k trainable
  parameters, 48 ciphertexts), 3 clients, 2 rounds.

What is measured, and how:

1. **Round wall time** from real federations through :func:`privatune.simulations.simulate.run_simulation` (Flower + Ray,
   the real ServerApp/ClientApp): per-round seconds are the differences of the cumulative ``seconds`` in
   ``metrics.jsonl`` (a round = train messages + aggregation + federated evaluation messages). Round 1 also
   holds the warm-up (Ray actors, imports, model loading), so the HE/plaintext ratio is taken over rounds
   >= 2 ("steady rounds"); round 1 is reported apart. Plaintext and HE runs alternate (plain first in even
   repeats, HE first in odd ones) so that drifting load on the shared machine hits both alike; figures are
   medians over all steady rounds of all repeats. Central evaluation is off during the runs (a plaintext
   server would otherwise evaluate every round and an HE one cannot), and both final models are tested
   afterwards with the same :class:`privatune.server.central_eval.CentralEvaluator` (the HE one after decryption
   with the clients' key), which gives the test-accuracy difference.
   MiniLM features are computed once, through the clients' own data path, and copied into every run's
   feature cache, so no run pays for them.
2. **Bytes on the wire** per client and message: the records are built with the functions the apps use
   (``privatune.client.app.encode_update`` for the reply, ``aggregate_arrayrecords`` / ``HEAccumulator`` +
   ``state_to_arrayrecord`` for the global state) from the trained final weights, and sized as Flower
   serialises them (protobuf ``ArrayRecord``, ``flwr.common.serde``). Each round a client downloads the
   global state twice (train and evaluate messages) and uploads one reply.
3. **HE operation seconds** on the same records, medians of ``--op-repeats`` repetitions, CPU time of this
   process (SEAL runs single-threaded; steadier than wall time on a shared machine) and wall time:
   client context load (``load_context`` of secret.ctx, done per message), encrypt (``encrypt_update`` +
   record), server aggregate (parse + check + add every reply, as ``PrivatuneFedAvg`` does, + result
   record) and decrypt (parse + ``decrypt_state``), with the plaintext equivalents. A "modelled" round
   ratio adds what HE costs per round (from these op times, clients spread over the Ray workers) to the
   measured plaintext round: a low-noise cross-check of the measured ratio.
4. **Parameter alternatives** (bytes and aggregation error only, not what runs): the default parameters,
   ``compact_params()`` and a compact N=4096 ring, encrypting the same client states.

Results go to ``DIR/bench_he.json`` (default DIR: ``<tmp>/privatune-bench-he``).

The package: ``plan`` (cases, sizes, goals), ``runs`` (the federations, round times), ``records`` (bytes and
HE operation times on the apps' own records), ``tables`` (printing), ``bench`` (one run end to end, the
command line).
"""

from privatune.simulations.benchmarks.he.bench import main, run, run_case
from privatune.simulations.benchmarks.he.plan import (
    ACCURACY_GOAL_POINTS,
    BYTES_RATIO_GOAL,
    DEFAULT_OUT,
    ROUND_RATIO_GOAL,
    BenchPlan,
    Case,
)
from privatune.simulations.benchmarks.he.records import (
    client_states,
    fedavg,
    measure_records,
    modelled_he_extra,
    parameter_alternatives,
    per_million,
    record_bytes,
    relative_error,
)
from privatune.simulations.benchmarks.he.runs import RunResult, federated_run, round_durations, seed_feature_cache
from privatune.simulations.benchmarks.he.tables import render

__all__ = [
    "ACCURACY_GOAL_POINTS",
    "BYTES_RATIO_GOAL",
    "DEFAULT_OUT",
    "ROUND_RATIO_GOAL",
    "BenchPlan",
    "Case",
    "RunResult",
    "client_states",
    "fedavg",
    "federated_run",
    "main",
    "measure_records",
    "modelled_he_extra",
    "parameter_alternatives",
    "per_million",
    "record_bytes",
    "relative_error",
    "render",
    "round_durations",
    "run",
    "run_case",
    "seed_feature_cache",
]
