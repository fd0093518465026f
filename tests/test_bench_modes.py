"""The modes benchmark's pure parts: the plan's run configs, the records read back from a run, the tables."""

from __future__ import annotations

import math

from privatune.common.presets import PRESETS
from privatune.simulations.benchmarks.modes.plan import Cell, ModesPlan
from privatune.simulations.benchmarks.modes.records import cell_result, client_peak_kib, site_rounds
from privatune.simulations.benchmarks.modes.tables import cost_rows, render

LOG = (
    "\x1b[36m(ClientAppActor pid=1)\x1b[0m privatune INFO: [client-0] round 1: 100 records, train loss 1.2, "
    "epsilon 3.000, noise site-csprng, 4.000 s\n"
    "(ClientAppActor pid=1) privatune INFO: [client-1] round 1: 50 records, train loss 1.3, epsilon 3.000, noise site-csprng, 2.000 s\n"
    "(ClientAppActor pid=1) privatune INFO: [client-0] round 2: 100 records, train loss 1.0, epsilon 5.000, noise site-csprng, 3.500 s\n"
    "(ClientAppActor pid=1) privatune INFO: [client-0] round 2: 100 records, train loss 1.0, epsilon 5.000, noise site-csprng, 3.500 s\n"
)


def test_plan_cells_and_run_config() -> None:
    plan = ModesPlan(settings=("head", "lora"), rounds=3, max_records=3000, max_length=32)
    tags = [c.tag for c in plan.cells()]
    assert tags == ["head-nodp", "head-eps8", "head-eps1", "lora-nodp", "lora-eps8", "lora-eps1"]
    rc = plan.run_config(Cell("lora", 8.0))
    assert rc["mode"] == "lora" and rc["dp"] is True and rc["target-epsilon"] == 8.0
    assert rc["num-server-rounds"] == 3 and rc["max-records"] == 3000 and rc["max-length"] == 32
    assert "target-epsilon" not in plan.run_config(Cell("head", math.inf))
    assert plan.resolved(Cell("lora", 8.0)).local_epochs == 2
    assert Cell("lora", 8.0, "sms-spam").tag == "sms-spam-lora-eps8"


def test_the_tuned_lora_setting_trains_like_its_preset_on_the_cells_data() -> None:
    tuned = PRESETS["trec6-lora"]
    rc = ModesPlan(settings=("lora-tuned",)).resolved(Cell("lora-tuned", 8.0, "sms-spam"))
    assert (rc.mode, rc.lr, rc.batch_size, rc.local_epochs, rc.num_server_rounds, rc.max_length) == (
        tuned.mode,
        tuned.lr,
        tuned.batch_size,
        tuned.local_epochs,
        tuned.num_server_rounds,
        tuned.max_length,
    )
    assert rc.preset == "sms-spam"  # the cell's data, not the preset's
    # The plan's sizes still win over the setting's.
    assert ModesPlan(rounds=2, max_length=16).resolved(Cell("lora-tuned", 8.0)).num_server_rounds == 2


def test_run_config_overrides_win_over_the_settings_own_values() -> None:
    plan = ModesPlan(settings=("lora",), overrides={"lr": "0.25", "lora-rank": "4"})
    rc = plan.run_config(Cell("lora", 8.0))
    assert rc["lr"] == "0.25" and rc["lora-rank"] == "4"
    assert plan.resolved(Cell("lora", 8.0)).lr == 0.25


def test_records_parse_millisecond_times_once_per_round() -> None:
    rounds = site_rounds(LOG)
    assert [(r.client, r.round, r.seconds) for r in rounds] == [
        ("client-0", 1, 4.0),
        ("client-1", 1, 2.0),
        ("client-0", 2, 3.5),
    ]
    res = cell_result(
        {
            "status": "completed",
            "test_accuracy": 0.8,
            "per_client_epsilon": {"client-0": 5.0},
            "max_client_epsilon": 5.0,
        },
        {
            "seconds": 10.0,
            "peak_kib_by_title": {"ray::ClientAppActor.run": 2048, "ray::ClientAppActor": 1024, "raylet": 9999},
        },
        LOG,
        local_epochs=2,
    )
    assert res["epoch_seconds_by_round"] == {1: 3.0, 2: 1.75}
    assert res["epoch_seconds"] == 1.75  # rounds >= 2 only (round 1 holds the warm-up)
    assert res["client_peak_kib"] == 2048
    assert client_peak_kib({"raylet": 5}) is None


def test_tables_show_figures_and_ratios() -> None:
    cells = [
        {
            "tag": "lora-nodp",
            "setting": "lora",
            "epsilon": math.inf,
            "dp": False,
            "privacy": "no DP",
            "accuracy": 0.8383,
            "macro_f1": 0.74,
            "epoch_seconds": 50.0,
            "client_peak_kib": 1024 * 1000,
            "wall_seconds": 200,
        },
        {
            "tag": "lora-eps8",
            "setting": "lora",
            "epsilon": 8.0,
            "dp": True,
            "privacy": "eps=8",
            "accuracy": 0.6817,
            "macro_f1": 0.57,
            "max_client_epsilon": 7.995,
            "epoch_seconds": 60.0,
            "client_peak_kib": 1024 * 1250,
            "wall_seconds": 250,
        },
    ]
    text = render({"cells": cells})
    assert "83.83" in text and "68.17" in text and "7.995" in text
    assert cost_rows(cells, ["lora"]) == [["lora", "8", "1.20x", "1.25x"]]
