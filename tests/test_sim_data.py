"""Your own data in simulation: `privatune simulate --data FILE` (the site readers, the canonical copy, the
federation's split and central evaluation on it, summary.json's data entry, the errors)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from privatune.cli import app
from privatune.cli.own_data import load_own_data, write_copy
from privatune.client.site_data import SiteDataError
from privatune.common.config import ConfigError, RunConfig
from privatune.common.federation_data import central_split, client_records
from privatune.common.sim_data import load_sim_data, sim_data_info


def rows(n: int = 60) -> list[dict[str, str]]:
    out = []
    for i in range(n // 2):
        out.append({"review": f"I loved this film, wonderful and delightful story {i}", "sentiment": "good"})
        out.append({"review": f"Terrible boring awful movie, a waste of time {i}", "sentiment": "bad"})
    return out


def write_csv(path: Path, records: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "review", "sentiment"])
        w.writeheader()
        for i, r in enumerate(records):
            w.writerow({"id": i, **r})
    return path


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load(data: Path, test: Path | None = None, labels: str = "", model: str = "minilm", **kw: str):
    return load_own_data(
        data,
        test,
        fmt=kw.get("fmt", ""),
        text_column=kw.get("text_column", "review"),
        label_column=kw.get("label_column", "sentiment"),
        labels=labels,
        model=model,
        model_option="--preset sms-spam",
    )


def test_csv_labels_inferred_sorted_and_the_copy_round_trips(tmp_path):
    own = load(write_csv(tmp_path / "r.csv", rows()))
    assert own.data.label_names == ("bad", "good") and own.labels_found
    path = write_copy(own, tmp_path / "run")
    assert path == (tmp_path / "run" / "data" / "sim-data.npz").resolve()
    back, test = load_sim_data(path, ("bad", "good"))
    assert test is None and back.inputs == own.data.inputs and np.array_equal(back.labels, own.data.labels)
    assert sim_data_info(path)["source"] == {"file": "r.csv", "format": "csv", "records": 60}


def test_jsonl_with_given_labels_and_a_test_file(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", rows(40))
    test = write_jsonl(tmp_path / "test.jsonl", rows(10))
    own = load(data, test, labels="good,bad")
    assert own.data.label_names == ("good", "bad") and not own.labels_found
    assert own.data.labels[0] == 0 and len(own.test) == 10
    path = write_copy(own, tmp_path / "run")
    cfg = RunConfig.create(sim_data=str(path), labels="good,bad", seed=3)
    pool, central = central_split(cfg)
    # The central test set is the user's test file, whole; the pool is the data file, whole.
    assert len(central) == 10 and central.fingerprint() == own.test.fingerprint()
    assert len(pool) == 40
    parts = [client_records(cfg, i, 2) for i in range(2)]
    assert sum(len(p) for p in parts) == 40


def test_held_out_split_is_stratified_and_central_eval_never_uses_a_preset(tmp_path):
    path = write_copy(load(write_csv(tmp_path / "r.csv", rows())), tmp_path / "run")
    cfg = RunConfig.create(sim_data=str(path), labels="bad,good", test_fraction=0.2, partition="iid")
    assert cfg.dataset == "sim-data"
    pool, test = central_split(cfg)
    assert len(test) == 12 and len(pool) == 48
    assert list(test.label_counts()) == [6, 6]  # stratified, like the presets' split
    assert all("film" in t or "movie" in t for t in test.inputs)  # the user's records, not SMS Spam


def test_missing_column_names_the_column_and_the_file(tmp_path):
    data = write_csv(tmp_path / "r.csv", rows())
    with pytest.raises(SiteDataError) as err:
        load(data, text_column="body")
    assert "'body'" in str(err.value) and "r.csv" in str(err.value) and "--text-column" in str(err.value)


def test_unknown_label_names_the_record(tmp_path):
    records = rows(10)
    records[3]["sentiment"] = "meh"
    with pytest.raises(SiteDataError) as err:
        load(write_csv(tmp_path / "r.csv", records), labels="bad,good")
    assert "record 4" in str(err.value) and "unknown label 'meh'" in str(err.value)
    # A test-file label outside the data's (found) label set names the test file's record.
    test = rows(4)
    test[1]["sentiment"] = "meh"
    with pytest.raises(SiteDataError) as err:
        load(write_csv(tmp_path / "a.csv", rows(10)), write_jsonl(tmp_path / "t.jsonl", test))
    assert "t.jsonl, record 2" in str(err.value)


def test_text_file_with_an_image_model_names_the_option(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(write_csv(tmp_path / "r.csv", rows(10)), model="digits-cnn")
    assert "holds text data" in str(err.value) and "--preset sms-spam" in str(err.value)


def test_config_validation():
    with pytest.raises(ConfigError, match=r"^labels: sim-data="):
        RunConfig.create(sim_data="/x/sim-data.npz")
    with pytest.raises(ConfigError, match=r"^dataset: 'sim-data' means data from a file"):
        RunConfig.create(dataset="sim-data", labels="a,b")
    with pytest.raises(ConfigError, match=r"^dataset: sim-data brings"):
        RunConfig.create(sim_data="/x/sim-data.npz", labels="a,b", dataset="trec6")


def test_cli_errors_come_before_the_run_folder(tmp_path):
    data = write_csv(tmp_path / "r.csv", rows(10))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["simulate", "--data", str(data), "--preset", "digits", "--out", str(out)], catch_exceptions=False
    )
    assert res.exit_code == 2 and "reads image data" in res.output and not out.exists()
    res = CliRunner().invoke(app, ["simulate", "--labels", "a,b", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 2 and "go with --data" in res.output


@pytest.mark.slow
def test_simulation_on_a_csv_the_test_writes(tmp_path):
    data = write_csv(tmp_path / "reviews.csv", rows())
    out = tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("FLWR_HOME", None)
    env.pop("MPLCONFIGDIR", None)
    cmd = [sys.executable, "-m", "privatune.cli", "simulate", "--data", str(data), "--text-column", "review"]
    cmd += ["--label-column", "sentiment", "--clients", "2", "--rounds", "1", "--mode", "head", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "labels bad,good found in the data" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["dp"] and summary["dataset"] == "sim-data"
    assert summary["test_accuracy"] is not None and summary["test_accuracy"] >= 0.75
    entry = summary["data"]
    assert entry["source"] == "reviews.csv" and entry["format"] == "csv" and entry["labels"] == ["bad", "good"]
    assert entry["records"] == {"train": 48, "test": 12}
    import hashlib

    copy = out / "data" / "sim-data.npz"
    assert entry["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    config = json.loads((out / "config.json").read_text())
    assert config["sim-data"] == str(copy.resolve()) and config["labels"] == "bad,good"
    assert not any(home.iterdir())
