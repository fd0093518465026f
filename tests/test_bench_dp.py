"""Pure parts of simulations.benchmarks.dp: override parsing, plan, gaps, tables, the goal verdict."""

from __future__ import annotations

import json
import math

import pytest

from privatune.common.config import RunConfig
from privatune.simulations.benchmarks import dp as b
from privatune.simulations.benchmarks.report import json_safe


def test_parse_overrides_reads_kv_and_refuses_what_the_benchmark_sets():
    assert b.parse_overrides("lr=1.0 local-epochs=3 labels='a b'") == {
        "lr": "1.0",
        "local-epochs": "3",
        "labels": "a b",
    }
    assert b.parse_overrides("") == {}
    with pytest.raises(ValueError, match="not key=value"):
        b.parse_overrides("lr")
    with pytest.raises(ValueError, match="target-epsilon"):
        b.parse_overrides("target-epsilon=3")


def test_base_config_applies_overrides_and_refuses_unknown_keys():
    plan = b.BenchPlan.make(False, {"lr": "0.5", "batch-size": "128"})
    cfg = b.base_config("trec6", plan)
    assert (cfg.lr, cfg.batch_size, cfg.mode, cfg.partition, cfg.alpha) == (0.5, 128, "head", "dirichlet", 1.0)
    assert cfg.num_server_rounds == RunConfig.create(preset="trec6").num_server_rounds
    digits = b.base_config("digits", plan, overrides=False)
    assert digits.lr == RunConfig.create(preset="digits").lr
    with pytest.raises(ValueError, match="lrr"):
        b.base_config("trec6", b.BenchPlan.make(False, {"lrr": "1"}))


def test_quick_plan_is_smaller_but_complete():
    full, quick = b.BenchPlan.make(False, {}), b.BenchPlan.make(True, {})
    assert quick.quick and not full.quick
    assert quick.clients < full.clients == 10 and quick.max_records > 0 and full.max_records == 0
    assert quick.rounds and full.rounds == 0  # full runs use the preset's rounds
    with pytest.raises(ValueError, match="threads"):
        b.BenchPlan.make(False, {}, threads=0)


def test_median_gap_and_ratio():
    assert b.median([3.0, 1.0, 2.0]) == 2.0
    assert b.median([1.0, 2.0, 3.0, 4.0]) == 2.5
    with pytest.raises(ValueError):
        b.median([])
    assert b.gap_points(0.97, 0.98) == pytest.approx(-1.0)
    row = b.TimingRow("head", "m", "d", 10, 2, 1, 3, 5, [1.0, 2.0, 9.0], [3.0, 4.0, 5.0], [2.0] * 3, [6.0] * 3)
    assert row.ratio == pytest.approx(2.0) and row.call_ratio == pytest.approx(3.0)
    assert row.to_json()["min_ratio"] == pytest.approx(3.0)


def _row(setting, dp, eps, acc, gap=None, error=""):
    return b.AccuracyRow("sms-spam", setting, dp, eps, acc, acc, gap_accuracy_pts=gap, error=error)


def test_goal_line_verdicts():
    assert "MET" in b.goal_line([_row("federated", True, 8.0, 0.97, -1.5)])
    assert "NOT MET" in b.goal_line([_row("federated", True, 8.0, 0.95, -2.5)])
    assert "failed" in b.goal_line([_row("federated", True, 8.0, math.nan, None, "boom")])
    assert "not measured" in b.goal_line([_row("federated", True, 1.0, 0.9, -5.0)])


def test_tables_and_json_are_well_formed():
    rows = [_row("central", False, math.inf, 0.98), _row("federated", True, 8.0, 0.97, -1.0)]
    text = b.accuracy_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "federated, DP eps=8" in text and "-1.00" in text and "98.00" in text
    safe = json_safe({"a": math.inf, "b": [math.nan, 1.0]})
    assert json.loads(json.dumps(safe)) == {"a": "inf", "b": ["nan", 1.0]}


def test_timing_rows_share_the_non_dp_calls_and_name_each_dp_path():
    import torch
    from torch import nn

    x, y = torch.randn(40, 6), torch.randint(0, 2, (40,))
    rows = b.time_dp_vs_nondp(
        "head",
        "m",
        "d",
        lambda: nn.Linear(6, 2),
        (x,),
        y,
        batch_size=8,
        lr=0.1,
        epochs=1,
        repeats=2,
        log=lambda _msg: None,
        dp_paths={"head": {"closed_form_linear": False}, "head-closed-form": {}},
    )
    assert [(r.case, r.dp_path) for r in rows] == [("head", "hooks"), ("head-closed-form", "linear")]
    assert rows[0].nondp_epoch_s is rows[1].nondp_epoch_s and len(rows[0].nondp_epoch_s) == 2
    assert all(len(r.dp_epoch_s) == 2 and r.trainable_params == 14 for r in rows)
    table = b.timing_table(rows).splitlines()
    assert table[0].split("|")[2].strip() == "DP path" and table[3].split("|")[2].strip() == "linear"


def test_the_cnn_rows_time_hooks_ghost_and_bookkeeping_and_cases_pick_rows():
    import torch
    from torch import nn

    from privatune.simulations.benchmarks.dp.timing import CASE_PATHS, ROW_NAMES

    def cnn() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))

    x, y = torch.randn(24, 1, 6, 6), torch.randint(0, 2, (24,))
    rows = b.time_dp_vs_nondp(
        "full", "m", "d", cnn, (x,), y, batch_size=8, lr=0.1, epochs=1, repeats=1, log=lambda _msg: None,
        dp_paths=CASE_PATHS["full"],
    )  # fmt: skip
    assert [(r.case, r.dp_path) for r in rows] == [
        ("full", "hooks"),
        ("full-ghost", "ghost"),
        ("full-bookkeeping", "bookkeeping"),
    ]
    assert "full-bookkeeping" in ROW_NAMES
    with pytest.raises(SystemExit):
        b.main(["--timing-only", "--cases", "full,nope"])
    with pytest.raises(SystemExit):
        b.main(["--cases", "full"])  # rows are a timing-only choice
