"""The ServerApp: builds the strategy for one run and lets Flower drive the rounds.

The same app serves ``privatune simulate`` (in-process, with a fixed config and a progress
observer), ``flwr run .`` and a real deployment (config from ``context.run_config``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from privatune.common.config import RunConfig
from privatune.common.ledger import SERVER_LEDGER_NAME, ServerLedger
from privatune.common.model_card import KEY_PERSONAL_HEAD, ModelCard, Privacy, pooling_of
from privatune.common.models import backbone_fingerprint, configure_trainable, get_model_spec, trainable_state
from privatune.common.models.trainable import shared_state
from privatune.common.protocol import (
    KEY_CENTRAL_ACCURACY,
    KEY_CENTRAL_LOSS,
    KEY_CENTRAL_MACRO_F1,
    KEY_DELTA,
    NOISE_SOURCE_SEEDED,
    NOISE_SOURCE_SITE,
)
from privatune.server.central_plan import central_eval_plan
from privatune.server.checkpoint import COMMIT_NAME, CheckpointError, ServerCheckpoint, checkpoint_dir
from privatune.server.checkpoint import save as save_checkpoint
from privatune.server.optimisers import ServerOptimiser
from privatune.server.reasons import one_line
from privatune.server.resume import check_matches, check_shapes, earlier_rounds, load_start
from privatune.server.run_record import RoundReport, RunRecorder
from privatune.server.strategy import FederationStopped, PrivatuneFedAvg

if TYPE_CHECKING:
    from privatune.server.central_eval import CentralEvaluator

log = logging.getLogger("privatune.server")

HE_CHECKPOINT_NAME = "global.he-checkpoint"
PLAIN_WEIGHTS_NAME = "global.safetensors"


def make_server_app(
    fixed_config: RunConfig | None = None,
    observer: Callable[[RoundReport], None] | None = None,
    on_recorder: Callable[[RunRecorder], None] | None = None,
    resume: bool = False,
) -> ServerApp:
    """``on_recorder`` receives the run's recorder as soon as it exists (simulate marks it on a signal);
    ``resume``: continue the run in the config's out-dir from its checkpoint (``privatune simulate --resume``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = fixed_config or RunConfig.from_flower(dict(context.run_config))
        # `privatune simulate` (a fixed config) warns on its own terminal before the run starts.
        summary = run_federation(
            grid,
            cfg,
            run_id=str(context.run_id),
            observer=observer,
            warn_seeded=fixed_config is None,
            on_recorder=on_recorder,
            resume=resume,
        )
        if summary.get("status") == "failed" and fixed_config is None:
            # Under `flwr run` / a deployment, Flower then reports the run as failed, not completed.
            reasons = "; ".join(f"{k}: {v}" for k, v in (summary.get("failure_reasons") or {}).items())
            raise RuntimeError(f"run failed: no round aggregated an update ({reasons})")

    return server_app


app = make_server_app()


SEEDED_NOISE_WARNING = (
    "reproducible-noise=true: every site's DP noise comes from a seed derived from the run config, so whoever "
    "knows the seed can remove it; this run gives no privacy against the coordinator (simulation only)"
)


def noise_source_of(cfg: RunConfig) -> str:
    """The noise source this run asks its sites for (each site reports, and records, its own)."""
    return NOISE_SOURCE_SEEDED if cfg.reproducible_noise else NOISE_SOURCE_SITE


def resolve_out_dir(cfg: RunConfig, run_id: str) -> RunConfig:
    out = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / f"run-{run_id}"
    return replace(cfg, out_dir=str(out.resolve()))


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    run_id: str,
    observer: Callable[[RoundReport], None] | None = None,
    warn_seeded: bool = True,
    on_recorder: Callable[[RunRecorder], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every round of one federation and leave its record in ``cfg.out_dir``: build, run, record. ``resume``:
    from the out-dir's checkpoint, under the checkpoint's run id, its round numbers continuing."""
    cfg = resolve_out_dir(cfg, run_id)
    out = Path(cfg.out_dir)
    if not resume and (checkpoint_dir(out) / COMMIT_NAME).exists():
        # A fresh run here would collide with the earlier run's checkpoint after its first round (and its site
        # ledgers would mix two runs): refuse before any round.
        raise CheckpointError(
            f"{out} holds the checkpoint of an earlier run ({checkpoint_dir(out).name}/{COMMIT_NAME}): continue it "
            "with --resume, or start in an empty folder (privatune simulate --overwrite replaces it)"
        )
    saved = load_start(checkpoint_dir(out), "--resume") if resume else None
    if saved is not None:
        run_id = saved.run_id
    if cfg.reproducible_noise and warn_seeded:
        log.warning("run %s: %s", run_id, SEEDED_NOISE_WARNING)
    recorder = RunRecorder(out, summary_base=summary_base(cfg, run_id), observer=observer)
    if saved is not None:
        recorder.restore(earlier_rounds(out, saved.round))
    if on_recorder is not None:
        on_recorder(recorder)
    recorder.write_config(cfg.to_flower())
    if saved is None and cfg.initial_checkpoint:
        saved = load_start(Path(cfg.initial_checkpoint))
        log.info(
            "run %s: starts from %s (round %d of run %s)", run_id, cfg.initial_checkpoint, saved.round, saved.run_id
        )
        saved = replace(saved, round=0)  # a new run: its own round numbers, from 1
    start = initial_weights(cfg, run_id, saved)
    ledger = ServerLedger(out / SERVER_LEDGER_NAME)
    if not any(r.run_id == run_id for r in ledger.runs()):  # a resumed run is recorded once
        ledger.record_run(run_id, cfg.to_flower(), cfg.secure_aggregation)
    strategy = PrivatuneFedAvg(
        cfg,
        run_id,
        start.expected_shapes,
        he_context=start.he_context,
        ledger=ledger,
        backbone_fingerprint=start.backbone_fingerprint,
    )
    if saved is not None:
        strategy.round_offset = saved.round
        strategy.load_optimizer_state(dict(saved.optimizer))
    evaluator = central_evaluator(cfg, start, recorder.warnings)
    t0 = time.perf_counter()

    def keep(server_round: int, arrays: ArrayRecord) -> None:
        """After every completed round: the state a resume starts from (server/checkpoint.py)."""
        weights: Any = _plain(arrays)
        if start.he_context is not None:
            from privatune.common.he.records import arrayrecord_to_state

            weights = arrayrecord_to_state(arrays)
        save_checkpoint(
            checkpoint_dir(out),
            ServerCheckpoint(
                run_id,
                server_round,
                weights,
                start.he_context is not None,
                model_card(cfg, run_id, recorder, start).to_metadata(),
                strategy.optimizer_state(),
            ),
        )

    final = run_rounds(strategy, grid, cfg, start.arrays, recorder, evaluator, t0, keep)
    # After the rounds, so the file's card holds the privacy the whole run spent.
    save_global(final, model_card(cfg, run_id, recorder, start), out, start.he_context is not None)
    return record_run(recorder, cfg, out, start, t0)


def fine_tuning_metadata(cfg: RunConfig) -> dict[str, str]:
    """The settings that say what a saved model is beyond its mode (docs/fine-tuning.md): last-k's k, LoRA's."""
    ft = cfg.fine_tuning
    meta: dict[str, str] = {}
    if ft.mode == "last-k":
        meta["last-k"] = str(ft.last_k)
    if ft.mode == "lora":
        meta.update(
            {
                "lora-rank": str(ft.lora_rank),
                "lora-alpha": f"{ft.lora_alpha:g}",
                "lora-dropout": f"{ft.lora_dropout:g}",
                "lora-targets": ",".join(ft.lora_targets) or "the model's defaults",
                "lora-freeze-a": str(ft.lora_freeze_a).lower(),
                "lora-blocks": str(ft.lora_blocks) if ft.lora_blocks else "every block",
                "seed": str(ft.seed),  # the LoRA A matrices are drawn from it
            }
        )
    if ft.mode != "head" and ft.layer_lr_decay != 1.0:
        meta["layer-lr-decay"] = f"{ft.layer_lr_decay:g}"
    return meta


def summary_base(cfg: RunConfig, run_id: str) -> dict[str, Any]:
    """What summary.json says about the run before any round (its config, in brief)."""
    return {
        "run_id": run_id,
        "preset": cfg.preset,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "mode": cfg.mode,
        "fine_tuning": fine_tuning_metadata(cfg),
        "dp": cfg.private,
        "target_epsilon": cfg.target_epsilon if cfg.private else float("inf"),
        "delta": cfg.delta if cfg.delta else "each site's own (node-config delta, default 1e-5)",
        "secure_aggregation": cfg.secure_aggregation,
        "num_server_rounds": cfg.num_server_rounds,
        "noise_source": noise_source_of(cfg),
        "server_optimiser": ServerOptimiser.from_config(cfg).summary(),  # issue 15 (server/optimisers.py)
        "proximal_mu": cfg.proximal_mu,
        "central_eval": central_eval_plan(cfg).summary(),  # on what test data, or why off (server/central_plan.py)
        **({"data": sim_data_entry(cfg)} if cfg.sim_data else {}),
    }


def sim_data_entry(cfg: RunConfig) -> dict[str, Any]:
    """A run on the user's own data (sim-data): refuse a model of the other kind, and say in summary.json which
    records trained and which were scored (central evaluation never falls back to a preset's test split)."""
    from privatune.common.federation_data import central_split
    from privatune.common.sim_data import check_kind, summary_entry

    check_kind(cfg.sim_data, cfg.model)
    pool, test = central_split(cfg)
    return summary_entry(cfg.sim_data, len(pool), len(test))


@dataclass(frozen=True)
class InitialWeights:
    """The first global model as it travels (plaintext, or encrypted under the run's public HE context)."""

    arrays: ArrayRecord
    expected_shapes: dict[str, tuple[int, ...]]
    num_params: int
    he_context: Any = None  # the public TenSEAL context under secure-aggregation=he
    backbone_fingerprint: str = ""  # of the pretrained backbone; sites refuse a round if theirs differs


def _plain(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def initial_weights(cfg: RunConfig, run_id: str, saved: ServerCheckpoint | None = None) -> InitialWeights:
    """The pretrained model's trainable weights, or ``saved`` ones (a resume, an initial-checkpoint) once their
    model card and tensors are shown to be this run's."""
    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
    configure_trainable(model, cfg.fine_tuning)
    state = shared_state(trainable_state(model), cfg.personal_head)  # personal-head: the heads stay at the sites
    expected = {k: tuple(v.shape) for k, v in state.items()}
    if saved is not None:
        source = f"checkpoint of run {saved.run_id} (round {saved.round})"
        check_matches(saved, cfg, source)
        check_shapes(saved, expected, source)
        if not saved.encrypted:
            state = {k: np.asarray(saved.weights[k], dtype=v.dtype) for k, v in state.items()}
    n_params = int(sum(v.size for v in state.values()))
    fingerprint = backbone_fingerprint(cfg.model)
    log.info(
        "run %s: %s/%s mode=%s, %d trainable parameters travel", run_id, cfg.model, cfg.dataset, cfg.mode, n_params
    )
    if cfg.secure_aggregation != "he":
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
        return InitialWeights(arrays, expected, n_params, backbone_fingerprint=fingerprint)
    from privatune.common import he
    from privatune.common.he.records import state_to_arrayrecord

    if not cfg.he_public_context:
        raise ValueError("secure-aggregation=he needs he-public-context (the public.ctx from `privatune keygen`)")
    he_ctx = he.load_context(Path(cfg.he_public_context), require_secret=False)
    if saved is not None and saved.encrypted:
        check_he_key(saved, he_ctx)
        return InitialWeights(state_to_arrayrecord(saved.weights), expected, n_params, he_ctx, fingerprint)
    return InitialWeights(
        state_to_arrayrecord(he.encrypt_state(he_ctx, state)), expected, n_params, he_ctx, fingerprint
    )


def check_he_key(saved: ServerCheckpoint, he_ctx: Any) -> None:
    """Encrypted saved state can only continue under the key it was encrypted with."""
    have = getattr(he_ctx, "fingerprint", None)
    if have is not None and saved.weights.fingerprint != have:
        raise CheckpointError(
            f"the checkpoint of run {saved.run_id} is encrypted under HE key {saved.weights.fingerprint[:12]}, "
            f"this run's he-public-context is key {str(have)[:12]}: use the same keys, or decrypt the checkpoint"
        )


def central_evaluator(
    cfg: RunConfig, start: InitialWeights, warnings: list[str] | None = None
) -> CentralEvaluator | None:
    """The server's own test-set evaluation, only on the task's own test data (server/central_plan.py); it
    cannot read encrypted weights. Off for want of the task's test data, it says so in the log and in
    ``warnings`` (summary.json's)."""
    plan = central_eval_plan(cfg)
    if not plan.on or start.he_context is not None:
        if plan.warn:
            line = f"central evaluation off: {plan.reason}; test_accuracy stays null"
            log.warning("%s", line)
            if warnings is not None:
                warnings.append(line)
        return None
    from privatune.common.cache import resolve_cache_dir
    from privatune.server.central_eval import PERSONAL_HEAD_NOTE, CentralEvaluator

    if cfg.personal_head and warnings is not None:
        warnings.append(PERSONAL_HEAD_NOTE)
    return CentralEvaluator(cfg, resolve_cache_dir(cfg.cache_dir))


def run_rounds(
    strategy: PrivatuneFedAvg,
    grid: Grid,
    cfg: RunConfig,
    initial: ArrayRecord,
    recorder: RunRecorder,
    evaluator: CentralEvaluator | None,
    t0: float,
    keep: Callable[[int, ArrayRecord], None] | None = None,
) -> ArrayRecord:
    """Let Flower drive the rounds; each round's record is closed after its evaluation. Returns the last
    global weights (those of the last aggregated round, when the federation stopped early)."""
    latest = [initial]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Flower after every round (and before the first): closes the round's record."""
        latest[0] = arrays
        if server_round == 0 and strategy.round_offset:
            return None  # a resumed run: its round 0 is already recorded
        server_round += strategy.round_offset
        report = strategy.current if server_round > 0 else RoundReport(round=0)
        if evaluator is not None:
            res = evaluator({k: v.numpy() for k, v in arrays.items()})
            report.central = {
                KEY_CENTRAL_ACCURACY: res.accuracy,
                KEY_CENTRAL_MACRO_F1: res.macro_f1,
                KEY_CENTRAL_LOSS: res.loss,
            }
        report.seconds = time.perf_counter() - t0
        recorder.finish_round(report)
        if server_round > 0 and keep is not None:
            keep(server_round, arrays)
        return MetricRecord({key: value for key, value in report.central.items()}) if report.central else None

    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_server_rounds - strategy.round_offset,
            timeout=cfg.round_timeout,
            evaluate_fn=evaluate_fn,
        )
    except FederationStopped as stop:
        recorder.stopped_reason = one_line(stop, limit=1000)
        log.warning("%s", recorder.stopped_reason)
        recorder.status = "stopped"
        # The interrupted round has no evaluation; record what it did (who was refused).
        if strategy.current.round > 0 and (not recorder.rounds or recorder.rounds[-1].round != strategy.current.round):
            recorder.finish_round(strategy.current)
    return latest[0]


def record_run(recorder: RunRecorder, cfg: RunConfig, out: Path, start: InitialWeights, t0: float) -> dict[str, Any]:
    """The run's picture and its final summary."""
    from privatune.server.plots import plot_rounds

    title = f"{cfg.preset or cfg.model}: {cfg.mode}, " + (
        f"target epsilon {cfg.target_epsilon:g}" if cfg.private else "no DP"
    )
    plot_rounds(
        recorder.rounds, out / "rounds.png", title=title, target_epsilon=cfg.target_epsilon if cfg.private else None
    )
    recorder.conclude()
    return recorder.write_summary(
        trainable_parameters=start.num_params,
        wall_seconds=time.perf_counter() - t0,
        weights_file=HE_CHECKPOINT_NAME if start.he_context is not None else PLAIN_WEIGHTS_NAME,
    )


def model_card(cfg: RunConfig, run_id: str, recorder: RunRecorder, start: InitialWeights) -> ModelCard:
    """What the saved model is and what the run spent, from the run config and the server's own record of the
    sites' reports (common/model_card.py); nothing is asked of a site."""
    deltas = [
        float(rep[KEY_DELTA])
        for r in recorder.rounds
        for rep in r.clients.values()
        if isinstance(rep.get(KEY_DELTA), (int, float))
    ]
    summary = recorder.summary()
    kind = get_model_spec(cfg.model).kind
    return ModelCard(
        model=cfg.model,
        kind=kind,
        fine_tuning=cfg.fine_tuning,
        labels=cfg.label_names,
        privacy=Privacy(
            dp=cfg.private,
            target_epsilon=cfg.target_epsilon if cfg.private else float("inf"),
            max_client_epsilon=summary["max_client_epsilon"],
            delta=max(deltas) if deltas else (cfg.delta or None),
            accountant=cfg.accountant,
            noise_source=noise_source_of(cfg),
        ),
        max_length=cfg.max_length if kind == "text" else None,
        pooling=pooling_of(cfg.model) if kind == "text" else "",
        run_id=run_id,
        preset=cfg.preset,
        dataset=cfg.dataset,
        backbone_fingerprint=start.backbone_fingerprint,
        secure_aggregation=cfg.secure_aggregation,
        rounds_completed=int(summary["rounds_completed"]),
        extra={KEY_PERSONAL_HEAD: "true"} if cfg.personal_head else {},  # the file holds the body alone
    )


def save_global(arrays: ArrayRecord, card: ModelCard, out: Path, encrypted: bool) -> Path:
    """The final global weights with their model card (an encrypted checkpoint keeps it in its header, and
    ``privatune decrypt`` writes it into the plaintext file)."""
    if encrypted:
        from privatune.common import he
        from privatune.common.he.records import arrayrecord_to_state

        path = out / HE_CHECKPOINT_NAME
        he.save_checkpoint(path, arrayrecord_to_state(arrays), metadata=card.to_metadata())
        return path
    from safetensors.numpy import save_file

    path = out / PLAIN_WEIGHTS_NAME
    save_file({k: np.ascontiguousarray(v.numpy()) for k, v in arrays.items()}, str(path), metadata=card.to_metadata())
    return path
