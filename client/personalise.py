"""Personalisation at a site: DP fine-tuning of the final global model on the site's own records, kept at the site.

After a federation each site may fine-tune the global model on its training split (docs/personalisation.md). The
spend goes through exactly the path a round's does (:func:`privatune.client.round.train_at_site`: the privacy
guard's plan, the write-ahead ledger row, DP-SGD in ``train_local``), with the ledger purpose ``personalise`` and
the run id ``<run id>/personalise`` (:func:`personalise_run_id`), so the personalisation has its own target
(``epsilon``) and every record's budget composes it with all the site's other spends. The weights are written to a
file in the site's folder (beside its ledger) and nothing of them, nor of the validation figures, is sent anywhere:
this module returns plain values to its caller (the simulation writes them into its run folder).

``mode``: ``run`` trains the run's own trainable set (head, last-k, LoRA + head, full); ``head`` only the head,
on top of the global body (for a ``head`` run the two are the same).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from privatune.client.personal_head import save_arrays, site_file
from privatune.client.round import LocalRun, Refusal, module_and_inputs, train_at_site
from privatune.client.site_config import SiteConfig
from privatune.common.config import RunConfig
from privatune.common.datasets import LabelledData
from privatune.common.evaluation import predict
from privatune.common.ledger import PURPOSE_PERSONALISE
from privatune.common.models import trainable_state

log = logging.getLogger("privatune.client")

PERSONALISE_MODES = ("run", "head")
PERSONALISE_RUN_SUFFIX = "/personalise"  # the ledger's run id of a personalisation: the federation's, tagged
PERSONAL_MODEL_PREFIX = "personal-"
PERSONAL_MODEL_SUFFIX = ".safetensors"
SIM_REPORT_DIR = "personalisation"  # simulation only: RUN/personalisation/ collects the simulated sites' outcomes


class PersonaliseError(ValueError):
    """Settings a personalisation cannot run with; the message names the option and the fix."""


@dataclass(frozen=True)
class PersonaliseSettings:
    """How a site personalises: ``epochs`` of DP-SGD at ``epsilon`` for the personalisation alone (its noise is
    calibrated to it unless ``noise_multiplier`` > 0 is given), training ``mode`` (PERSONALISE_MODES)."""

    epochs: int = 3
    epsilon: float = 1.0
    mode: str = "run"
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise PersonaliseError(f"--epochs must be an integer >= 1, got {self.epochs!r}")
        if not self.epsilon > 0:
            raise PersonaliseError(f"--epsilon must be > 0 (the personalisation's own target), got {self.epsilon!r}")
        if self.mode not in PERSONALISE_MODES:
            raise PersonaliseError(f"--mode must be one of {', '.join(PERSONALISE_MODES)}, got {self.mode!r}")
        if self.noise_multiplier < 0:
            raise PersonaliseError(f"--noise-multiplier must be >= 0 (0: calibrate), got {self.noise_multiplier!r}")


@dataclass(frozen=True)
class Personalised:
    """One site's outcome: kept at the site (the simulation writes it into its own run folder)."""

    site_id: str
    global_accuracy: float | None  # on the site's validation split; None without validation records
    personal_accuracy: float | None
    num_train: int
    num_val: int
    epsilon: float  # the personalisation's own epsilon (worst training record)
    epsilon_dataset: float  # the worst training record's epsilon over every spend in the site's ledger
    noise_multiplier: float
    model_file: str


def personalise_run_id(run_id: str) -> str:
    return f"{run_id}{PERSONALISE_RUN_SUFFIX}"


def personal_model_path(site: SiteConfig) -> Path:
    """The personalised model's file in the site's folder (beside its ledger); never sent."""
    return site_file(site, PERSONAL_MODEL_PREFIX, PERSONAL_MODEL_SUFFIX)


def personalise_config(cfg: RunConfig, settings: PersonaliseSettings) -> RunConfig:
    """The run config the personalisation plans and trains with: one 'round' of ``epochs`` at its own target.
    FedProx has no global model to stay near; HE has nothing to encrypt (nothing is sent)."""
    return replace(
        cfg,
        local_epochs=settings.epochs,
        num_server_rounds=1,
        target_epsilon=settings.epsilon,
        noise_multiplier=settings.noise_multiplier,
        proximal_mu=0.0,
        secure_aggregation="none",
    )


def accuracy_at_site(run: LocalRun, data: LabelledData) -> float | None:
    """The model's accuracy on ``data`` (the site's validation split), computed and kept at the site."""
    if not len(data):
        return None
    module, inputs = module_and_inputs(run, data)
    _, pred = predict(module, inputs, torch.as_tensor(data.labels, dtype=torch.long), device=run.site.device)
    run.model.to("cpu")
    return float((pred == np.asarray(data.labels)).mean())


def _train_head_only(run: LocalRun) -> list[torch.nn.Parameter]:
    """Freeze every trainable parameter but the head's; return those frozen (to thaw after training)."""
    frozen = [p for n, p in run.model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def personalise_at_site(run: LocalRun, settings: PersonaliseSettings) -> Personalised | Refusal:
    """Fine-tune ``run.model`` (holding the global weights) on the site's training split under the privacy
    guard, evaluate both models on its validation split, save the personalised weights in the site's folder."""
    global_acc = accuracy_at_site(run, run.val)
    prun = replace(
        run,
        cfg=personalise_config(run.cfg, settings),
        run_id=personalise_run_id(run.run_id),
        server_round=run.cfg.num_server_rounds + 1,  # after the federation's rounds (and its seeded noise)
    )
    frozen = _train_head_only(run) if settings.mode == "head" else []
    try:
        trained = train_at_site(prun, purpose=PURPOSE_PERSONALISE)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if isinstance(trained, Refusal):
        return trained
    personal_acc = accuracy_at_site(run, run.val)
    path = personal_model_path(run.site)
    save_personal_model(path, trainable_state(run.model), run)
    log.info(
        "[%s] personalised: %d records, epsilon %.3f; validation accuracy global %s, personalised %s (site only)",
        run.site.site_id,
        trained.num_examples,
        trained.epsilon_run,
        _fmt(global_acc),
        _fmt(personal_acc),
    )
    return Personalised(
        site_id=run.site.site_id,
        global_accuracy=global_acc,
        personal_accuracy=personal_acc,
        num_train=trained.num_examples,
        num_val=len(run.val),
        epsilon=trained.epsilon_run,
        epsilon_dataset=trained.epsilon_dataset,
        noise_multiplier=trained.mechanism.noise_multiplier,
        model_file=str(path),
    )


def save_personal_model(path: Path, state: dict[str, np.ndarray], run: LocalRun) -> Path:
    """The personalised trainable weights (the run mode's set, head included) with what they are."""
    meta = {
        "format": "privatune-personal-model",
        "model": run.cfg.model,
        "fine-tuning-mode": run.cfg.mode,
        "run-id": run.run_id,
        "site-id": run.site.site_id,
    }
    return save_arrays(path, state, meta)


def settings_of(cfg: RunConfig) -> PersonaliseSettings:
    """The run config's final personalisation (personalise-epochs > 0; the config validated the values)."""
    return PersonaliseSettings(
        epochs=cfg.personalise_epochs, epsilon=cfg.personalise_epsilon, mode=cfg.personalise_mode
    )


def final_personalisation(run: LocalRun) -> Personalised | Refusal | None:
    """After the last round's evaluation (the message holding the final global model), with personalise-epochs > 0:
    personalise at this site. Nothing of it goes into the reply: the outcome stays in the site's log and file; a
    simulated site also writes it to RUN/personalisation/<site>.json (one machine: the simulation's report)."""
    cfg = run.cfg
    if cfg.personalise_epochs <= 0 or run.server_round != cfg.num_server_rounds:
        return None
    try:
        outcome = personalise_at_site(run, settings_of(cfg))
    except (OSError, ValueError) as err:  # the evaluation's reply still goes; the site log says why
        log.error("[%s] personalisation failed: %s", run.site.site_id, err)
        return None
    if isinstance(outcome, Refusal):
        log.warning("[%s] not personalised: %s", run.site.site_id, outcome.reason)
    elif run.site.simulated and cfg.out_dir:
        import json
        from dataclasses import asdict

        folder = Path(cfg.out_dir) / SIM_REPORT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{run.site.site_id}.json").write_text(json.dumps(asdict(outcome), sort_keys=True) + "\n")
    return outcome


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
