"""The tuning and personalisation benchmarks' pure parts: plans refused before anything runs, splits, tables."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from privatune.simulations.benchmarks.personal import PersonalPlan, _means
from privatune.simulations.benchmarks.personal import table as personal_table
from privatune.simulations.benchmarks.tuning import TuningPlan, write_splits
from privatune.simulations.benchmarks.tuning import table as tuning_table


def test_a_bad_tuning_plan_is_refused() -> None:
    with pytest.raises(ValueError, match="--total-epsilon"):
        TuningPlan(total_epsilon=float("inf")).checked()
    with pytest.raises(ValueError, match="--proxy-fraction"):
        TuningPlan(proxy_fraction=0.6).checked()
    assert "alpha=1.0" in TuningPlan().shared()


def test_the_splits_are_disjoint_and_cover_the_records(tmp_path: Path) -> None:
    paths = write_splits(TuningPlan(max_records=300), tmp_path)
    rows = {}
    for name, path in paths.items():
        with path.open(newline="", encoding="utf-8") as fh:
            rows[name] = [tuple(r) for r in csv.reader(fh)][1:]
    sizes = {k: len(v) for k, v in rows.items()}
    assert sum(sizes.values()) == 300 and sizes["test"] == 60 and sizes["proxy"] < sizes["private"]
    # each record (text, label) sits in exactly one split (TREC-6 has a few repeated questions: count multiset)
    every = [r for v in rows.values() for r in v]
    assert len(every) == 300
    assert {label for _, label in every} <= {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}


def test_the_tuning_table_has_a_row_per_approach() -> None:
    row = {
        "approach": "private selection",
        "tuned_on": "private part",
        "trials": 5,
        "per_trial_epsilon": 4.1,
        "total_epsilon": 8.0,
        "accuracy": 0.8,
        "macro_f1": 0.7,
        "wall_seconds": 100.0,
    }
    lines = tuning_table([row]).splitlines()
    assert len(lines) == 3 and "private selection" in lines[2] and "80.00" in lines[2]


def test_a_bad_personalisation_plan_is_refused_and_the_means_compare_at_the_same_total() -> None:
    with pytest.raises(ValueError, match="--fed-epsilon"):
        PersonalPlan(fed_epsilon=0).checked()
    with pytest.raises(ValueError, match="--clients"):
        PersonalPlan(clients=1).checked()
    rows = [
        {"site": "a", "val_records": 10, "global_at_fed_epsilon": 0.5, "global_at_same_total": 0.6,
         "personalised": 0.9, "epsilon_total": 3.9},
        {"site": "b", "val_records": 0, "global_at_fed_epsilon": None, "global_at_same_total": None,
         "personalised": None, "epsilon_total": 3.8},
    ]  # fmt: skip
    mean = _means(rows)
    assert mean["personalised"] == pytest.approx(0.9) and mean["gain_points"] == pytest.approx(30.0)
    assert "**mean**" in personal_table(rows, mean)
