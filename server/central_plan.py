"""Whether the server scores the global model centrally, and on what: only on the task's own test data.

A central accuracy on another task's records is worse than none (a custom-label model scored on SMS Spam's test
split once reported 0.54 with no warning), so the rule is narrow: the server evaluates only where it holds the
task's own test data, that is a run on its own data (``sim-data``: the --test-data file, or test-fraction of
--data) or on a preset's dataset with that dataset's labels in its index order. Otherwise central evaluation is
off and summary.json says why (``central_eval``), with ``test_accuracy`` null. Torch-free: the decision is the
config's alone, and tests check it without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from privatune.common.config import DATASET_LABELS, RunConfig


@dataclass(frozen=True)
class CentralEvalPlan:
    """``on``: the server evaluates every round on ``test_data``; else ``reason`` says why not."""

    on: bool
    test_data: str = ""
    reason: str = ""
    warn: bool = False  # off although the run asked for it (no test data of the task): a warning, not a choice

    def summary(self) -> dict[str, Any]:
        """summary.json's ``central_eval`` entry."""
        return {"on": True, "test_data": self.test_data} if self.on else {"on": False, "reason": self.reason}


def central_eval_plan(cfg: RunConfig) -> CentralEvalPlan:
    """The rule above, for one resolved run config."""
    if not cfg.central_eval:
        return CentralEvalPlan(False, reason="central-eval=false in the run config")
    if cfg.secure_aggregation == "he":
        return CentralEvalPlan(
            False,
            reason="secure-aggregation=he: the server cannot read the encrypted model; a site evaluates it after "
            "`privatune decrypt`",
        )
    if cfg.sim_data:
        return CentralEvalPlan(True, test_data="the run's own test records (sim-data)")
    builtin = DATASET_LABELS.get(cfg.dataset)
    if builtin is None:
        where = f"dataset '{cfg.dataset}' is not a preset's" if cfg.dataset else "the run names no dataset"
        return CentralEvalPlan(
            False,
            reason=f"the server has no test data for this task ({where}; the sites hold the data); evaluate the "
            "final model on your own test file",
            warn=True,
        )
    if cfg.label_names != builtin:
        return CentralEvalPlan(
            False,
            reason=f"labels {','.join(cfg.label_names)} are the sites' own, not dataset '{cfg.dataset}''s "
            f"({','.join(builtin)}, in that order): its test split would score another task; evaluate the final "
            "model on your own test file",
            warn=True,
        )
    return CentralEvalPlan(True, test_data=f"dataset '{cfg.dataset}''s held-out test split")
