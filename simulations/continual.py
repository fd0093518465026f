"""``privatune simulate --stages S``: a continual federation, data arriving at every site in S stages.

Each stage is one ``run_simulation`` (the code path of a plain simulation) in OUT/stage-s/, started from the last
stage's final global model through ``initial-checkpoint`` (server/resume.py), with the stage keys that tell every
client which of its records arrive now (common/stages.py). All stages share one folder of site ledgers and site keys
(``sim-ledger-dir``, OUT/ledgers unless given): record ids are keyed by the site key, so a record keeps its id, and
its spends compose, from stage to stage; a new record starts fresh; a rehearsed one composes its new spends with
its old. After each stage the final global model is scored on every stage's test records so far with the central
evaluator's model and inputs (server/central_eval.py); OUT/continual.json holds the accuracy matrix, average
accuracy, forgetting and backward transfer, OUT/continual.png the curves, OUT/summary.json one summary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from privatune.common.config import ConfigError, RunConfig
from privatune.common.stages import average_accuracy, backward_transfer, forgetting, stage_test_indices
from privatune.server.run_record import RoundReport, write_json_atomic

CONTINUAL_JSON = "continual.json"
CONTINUAL_PLOT = "continual.png"
FINAL_MODEL = "global.safetensors"


def stage_dir(out: Path, stage: int) -> Path:
    return Path(out) / f"stage-{stage}"


def stage_configs(cfg: RunConfig, out: Path, stages: int, split: str, rehearsal: float) -> list[RunConfig]:
    """Every stage's run config: its folder, the shared ledgers, its stage keys and (from stage 2) the last stage's
    run folder as its initial checkpoint. Refuses what a continual run cannot do, naming the option."""
    if stages < 1:
        raise ConfigError(f"--stages must be >= 1, got {stages}")
    if cfg.secure_aggregation == "he":
        raise ConfigError(
            "--stages: a continual run scores each stage's plaintext model on every stage's test data, which an HE "
            "run's server cannot read; use --secure-aggregation none for a continual simulation"
        )
    out = Path(out)
    ledgers = cfg.sim_ledger_dir or str((out / "ledgers").resolve())
    built = []
    for s in range(1, stages + 1):
        one = replace(
            cfg,
            out_dir=str(stage_dir(out, s).resolve()),
            sim_ledger_dir=ledgers,
            sim_stages=stages,
            sim_stage=s,
            sim_stage_split=split,
            sim_rehearsal=rehearsal,
            initial_checkpoint=str(stage_dir(out, s - 1).resolve()) if s > 1 else cfg.initial_checkpoint,
        )
        one.validate()
        built.append(one)
    return built


def stage_accuracies(cfg: RunConfig, model_file: Path, upto: int) -> list[float]:
    """Accuracy of a saved model on the test records of stages 1..upto: the central evaluator's model and test
    inputs (the server's central evaluation), cut to each stage's test records."""
    import torch
    from safetensors.numpy import load_file

    from privatune.common.cache import resolve_cache_dir
    from privatune.common.evaluation import evaluate
    from privatune.common.models import load_trainable_state
    from privatune.server.central_eval import CentralEvaluator

    ev = CentralEvaluator(cfg, resolve_cache_dir(cfg.cache_dir))
    load_trainable_state(ev.model, load_file(str(model_file)))
    tests = stage_test_indices(ev.test.labels, cfg.sim_stages, cfg.sim_stage_split, cfg.seed, len(cfg.label_names))
    scores = []
    for idx in tests[:upto]:
        t = torch.as_tensor(idx)
        res = evaluate(ev.module, tuple(x[t] for x in ev.inputs), ev.labels[t], num_classes=len(cfg.label_names))
        scores.append(float(res.accuracy))
    return scores


def check_stage_tests(cfg: RunConfig) -> None:
    """Before any training: every stage needs test records to be scored on."""
    from privatune.common.federation_data import central_split

    _, test = central_split(cfg)
    tests = stage_test_indices(test.labels, cfg.sim_stages, cfg.sim_stage_split, cfg.seed, len(cfg.label_names))
    empty = [s for s, idx in enumerate(tests, start=1) if len(idx) == 0]
    if empty:
        raise ConfigError(
            f"--stages {cfg.sim_stages}: the central test set ({len(test)} records) has none for stage(s) "
            f"{', '.join(map(str, empty))}; raise max-records or test-fraction, or use fewer stages"
        )


def continual_figures(acc: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """One row per stage: the accuracies so far, their mean, forgetting and backward transfer."""
    return [
        {
            "stage": s,
            "accuracy": [float(a) for a in acc[s - 1][:s]],
            "average_accuracy": average_accuracy(acc, s),
            "forgetting": forgetting(acc, s),
            "backward_transfer": backward_transfer(acc, s),
        }
        for s in range(1, len(acc) + 1)
    ]


def plot_continual(acc: Sequence[Sequence[float]], path: Path, title: str = "") -> Path:
    """Accuracy on each stage's test set (one line per test set) against the stage trained, and the average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    n = len(acc)
    for j in range(n):
        xs = list(range(j + 1, n + 1))
        ax.plot(xs, [acc[i - 1][j] for i in xs], "o-", label=f"stage {j + 1} test set")
    ax.plot(range(1, n + 1), [average_accuracy(acc, s) for s in range(1, n + 1)], "k--", label="average so far")
    ax.set_xlabel("after training stage")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(range(1, n + 1))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "continual federation: accuracy per stage's test set")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_continual(
    cfg: RunConfig,
    num_clients: int,
    out: Path,
    *,
    stages: int,
    split: str = "iid",
    rehearsal: float = 0.0,
    observer_for: Callable[[int, RunConfig], Callable[[RoundReport], None] | None] | None = None,
    after_stage: Callable[[int, dict[str, Any]], None] | None = None,
    **sim: Any,
) -> dict[str, Any]:
    """Run the S stages one after the other (``sim``: run_simulation's keyword options); a failed stage ends the
    run there, with the stages done recorded. Returns the top summary (also OUT/summary.json)."""
    from privatune.simulations.simulate import run_simulation

    out = Path(out)
    configs = stage_configs(cfg, out, stages, split, rehearsal)
    check_stage_tests(configs[0])
    acc: list[list[float]] = []
    stage_rows: list[dict[str, Any]] = []
    status = "completed"
    for s, one in enumerate(configs, start=1):
        observer = observer_for(s, one) if observer_for else None
        summary = run_simulation(one, num_clients, stage_dir(out, s), observer=observer, **sim)
        row: dict[str, Any] = {
            "stage": s,
            "folder": stage_dir(out, s).name,
            "run_id": summary.get("run_id"),
            "status": summary.get("status"),
            "test_accuracy": summary.get("test_accuracy"),
            "max_client_epsilon": summary.get("max_client_epsilon"),  # within this stage's run
        }
        stage_rows.append(row)
        if after_stage is not None:
            after_stage(s, summary)
        model = stage_dir(out, s) / FINAL_MODEL
        if summary.get("status") in ("failed", "interrupted") or not model.exists():
            status = str(summary.get("status") or "failed")
            break
        acc.append(stage_accuracies(one, model, s))
        write_results(out, cfg, stages, split, rehearsal, acc, stage_rows, "running")
    return write_results(out, cfg, stages, split, rehearsal, acc, stage_rows, status)


def write_results(
    out: Path,
    cfg: RunConfig,
    stages: int,
    split: str,
    rehearsal: float,
    acc: list[list[float]],
    stage_rows: list[dict[str, Any]],
    status: str,
) -> dict[str, Any]:
    """continual.json, continual.png and the top summary.json, rewritten after every stage."""
    figures = continual_figures(acc)
    for row, fig in zip(stage_rows, figures, strict=False):
        row.update(fig)
    result = {
        "stages": stages,
        "split": split,
        "rehearsal": rehearsal,
        "ledgers": cfg.sim_ledger_dir or str((Path(out) / "ledgers").resolve()),
        "per_stage": stage_rows,
        "accuracy_matrix": acc,
    }
    write_json_atomic(Path(out) / CONTINUAL_JSON, result)
    if acc:
        plot_continual(acc, Path(out) / CONTINUAL_PLOT)
    last = figures[-1] if figures else {}
    summary = {
        "status": status,
        "continual": True,
        "stages": stages,
        "stages_completed": len(acc),
        "split": split,
        "rehearsal": rehearsal,
        "average_accuracy": last.get("average_accuracy"),
        "forgetting": last.get("forgetting"),
        "backward_transfer": last.get("backward_transfer"),
        # the worst client's epsilon within one stage's run; a record's composed spends are in the ledgers
        "max_stage_epsilon": max(
            (r["max_client_epsilon"] for r in stage_rows if r.get("max_client_epsilon") is not None), default=None
        ),
        "stage_folders": [r["folder"] for r in stage_rows],
        "results": CONTINUAL_JSON,
    }
    write_json_atomic(Path(out) / "summary.json", summary)
    return summary
