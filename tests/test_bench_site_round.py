"""The site-round benchmark's parts: the site file it writes is one a site loads, the per-record figure, and
(slow) a smoke run through the real ClientApp."""

from __future__ import annotations

import json

import numpy as np
import pytest

from privatune.simulations.benchmarks import site_round


def test_the_site_file_is_the_preset_records_as_a_site_holds_them(tmp_path):
    from privatune.client.site_data import load_site_data
    from privatune.client.site_data.spec import SiteDataSpec
    from privatune.common.datasets import load_dataset

    path, fmt = site_round.write_site_file("digits", 40, tmp_path)
    assert fmt == "npz" and path.exists()
    want = load_dataset("digits", max_records=40, seed=0)
    got = load_site_data(SiteDataSpec(path, "npz"), list(want.label_names), kind="image", name="bench")
    assert np.array_equal(got.labels, want.labels)
    assert np.allclose(got.inputs, want.inputs, atol=0.02)  # 8-bit pixels: within one grey level, normalised


def test_seconds_per_thousand_records_per_epoch_is_from_the_last_round():
    row = site_round.RoundTime("digits", "digits-cnn", "head", 500, 2, 32, [9.0, 4.0], ["trained"] * 2)
    assert row.per_1000_epoch_s == pytest.approx(4.0 / 2 * 1000 / 500)


@pytest.mark.slow
def test_a_quick_run_times_a_real_round(tmp_path, capsys):
    assert site_round.main(["--quick", "--presets", "digits", "--modes", "head", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "site_round.json").read_text())
    (row,) = result["rows"]
    assert row["status"] == ["trained"] and row["round_s"][0] > 0 and row["records"] == 60
    assert "| digits" in capsys.readouterr().out
