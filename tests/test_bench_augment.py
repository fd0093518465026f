"""The augmentation benchmark's pure parts: its grid, each cell's run config (validated), and its table."""

from __future__ import annotations

import math

import pytest

from privatune.common.config import RunConfig
from privatune.simulations.benchmarks.augment import IMAGE_AUGMENT, QUICK, TEXT_AUGMENT, AugmentPlan, table


def test_the_grid_is_the_issues_k_1_4_8_per_image_preset_and_text_with_and_without() -> None:
    cells = AugmentPlan(only="image").cells()
    assert [(c.preset, c.views) for c in cells] == [
        ("digits", 1),
        ("digits", 4),
        ("digits", 8),
        ("fashion-mnist", 1),
        ("fashion-mnist", 4),
        ("fashion-mnist", 8),
    ]
    assert all(c.epsilon == 4.0 and c.mode == "last-k" for c in cells)
    # K = 1 is the run without augmentation, not one augmented view
    assert [c.augment for c in cells if c.views == 1] == ["", ""]
    assert {c.augment for c in cells if c.views > 1} == {IMAGE_AUGMENT}
    text = AugmentPlan(only="text").cells()
    assert [(c.preset, c.epsilon, bool(c.augment)) for c in text] == [("trec6", 8.0, False), ("trec6", 8.0, True)]
    assert len({c.tag for c in AugmentPlan().cells()}) == len(AugmentPlan().cells())


def test_each_image_cell_is_a_valid_dp_run_config_with_its_views() -> None:
    plan = AugmentPlan(only="image").checked()
    for cell in plan.cells():
        cfg = RunConfig.from_flower(plan.run_config(cell))
        assert cfg.private and cfg.target_epsilon == 4.0
        assert cfg.augment_views == cell.views and cfg.augment == cell.augment
        assert cfg.partition == "dirichlet" and cfg.alpha == 1.0
    fashion = next(c for c in plan.cells() if c.preset == "fashion-mnist")
    assert plan.run_config(fashion)["max-records"] == 4000


def test_a_bad_plan_is_refused_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="--only"):
        AugmentPlan(only="audio").checked()
    with pytest.raises(ValueError, match="augment"):
        AugmentPlan(only="image", image_augment="shift=99").checked()
    with pytest.raises(ValueError, match="--clients"):
        AugmentPlan(clients=0).checked()


def test_the_quick_plan_is_two_small_digits_cells() -> None:
    plan = AugmentPlan(only="image", **QUICK).checked()  # type: ignore[arg-type]
    assert [c.views for c in plan.cells()] == [1, 2]


def test_the_table_has_one_row_per_cell_with_its_figures() -> None:
    cells = [
        {
            "preset": "digits",
            "mode": "last-k",
            "augment": "",
            "views": 1,
            "epsilon": 4.0,
            "accuracy": 0.9,
            "macro_f1": 0.88,
            "max_client_epsilon": 3.99,
            "seconds_per_round": 12.0,
            "epoch_seconds": 3.0,
        },
        {
            "preset": "digits",
            "mode": "last-k",
            "augment": IMAGE_AUGMENT,
            "views": 4,
            "epsilon": 4.0,
            "accuracy": None,
            "macro_f1": None,
            "max_client_epsilon": None,
            "seconds_per_round": math.nan,
            "epoch_seconds": None,
        },
    ]
    lines = table(cells).splitlines()
    assert len(lines) == 4
    assert "90.00" in lines[2] and "none" in lines[2] and "12.0" in lines[2]
    assert IMAGE_AUGMENT in lines[3] and "| 4 " in lines[3]


def test_a_failed_cell_is_a_failed_row_not_figures() -> None:
    cell = {"preset": "fashion-mnist", "mode": "last-k", "augment": IMAGE_AUGMENT, "views": 8, "epsilon": 4.0}
    failed = {**cell, "status": "failed", "error": "CheckpointError: boom", "accuracy": 0.47, "macro_f1": 0.44}
    row = table([failed]).splitlines()[2]
    assert "failed: CheckpointError: boom" in row and "47.00" not in row


def test_the_text_cells_are_valid_lora_runs_with_and_without_the_text_ops() -> None:
    plan = AugmentPlan(only="text").checked()
    plain, augmented = (RunConfig.from_flower(plan.run_config(c)) for c in plan.cells())
    assert (plain.augment, plain.augment_views) == ("", 1)
    assert augmented.augment == TEXT_AUGMENT and augmented.augment_views == 2
    assert plain.mode == augmented.mode == "lora" and plain.target_epsilon == augmented.target_epsilon == 8.0
