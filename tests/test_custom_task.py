"""A task of the user's own: labels as a list or a comma string, a model chosen by name with no preset, central
evaluation only on the task's own test data (never on a preset's split), and errors in the user's own keys."""

import json
import logging
import tomllib
from pathlib import Path

import pytest
from flwr.app import ArrayRecord
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from privatune.cli import app
from privatune.cli.inputs import parse_kv
from privatune.cli.own_data import load_own_data
from privatune.client.site_data import SiteDataError, SiteDataSpec, load_site_data
from privatune.common.config import (
    DATASET_LABELS,
    MODEL_KINDS,
    MODEL_ONLY_ROUNDS,
    PRESETS,
    ConfigError,
    RunConfig,
    parse_labels,
)
from privatune.common.models.modes import recommended_hyperparameters
from privatune.server.app import InitialWeights, central_evaluator, summary_base
from privatune.server.central_plan import central_eval_plan
from privatune.server.run_record import RunRecorder

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize(
    "value",
    [
        "neg,pos",
        " neg , pos ",
        ["neg", "pos"],
        ("neg", "pos"),
        '["neg","pos"]',
        "['neg', 'pos']",
        "[neg, pos]",
    ],
)
def test_labels_as_a_list_or_a_comma_string(value):
    cfg = RunConfig.create(labels=value, dataset="own")
    assert cfg.label_names == ("neg", "pos")
    assert cfg.labels == "neg,pos"  # one canonical form travels to the sites
    assert RunConfig.from_flower(cfg.to_flower()) == cfg


def test_labels_as_a_toml_list_in_a_run_config():
    """`labels = ["neg", "pos"]` as TOML reads it (a pyproject run config, a --run-config file)."""
    run_config = tomllib.loads('labels = ["neg", "pos"]\npreset = ""\nmodel = "minilm"')
    assert RunConfig.from_flower(run_config).label_names == ("neg", "pos")


def test_labels_through_flower_and_privatune_run_config_parsers():
    # Flower's own --run-config parser keeps a quoted list as text; privatune reads the list from it.
    flower = parse_config_args(['labels=\'["neg","pos"]\' dataset="own"'])
    assert RunConfig.from_flower(flower).label_names == ("neg", "pos")
    # privatune's --run-config (simulate, site check): the shell split at the space is rejoined.
    ours = parse_kv('labels=["neg", "pos"] dataset=own')
    assert ours == {"labels": "[neg, pos]", "dataset": "own"}
    assert RunConfig.from_flower(ours).label_names == ("neg", "pos")


@pytest.mark.parametrize(
    "value, words",
    [
        ("neg,,pos", "empty label name"),
        ("neg,pos,", "empty label name"),
        ("[neg,pos", "bracket"),
        ([], "the list is empty"),
        ("[]", "the list is empty"),
        (["neg", "p,os"], "contains a comma"),
        ("neg,neg", "unique"),
        ("neg", "at least 2"),
    ],
)
def test_bad_labels_name_the_key(value, words):
    with pytest.raises(ConfigError, match=r"^labels: ") as err:
        RunConfig.create(labels=value, dataset="own")
    assert words in str(err.value)


def test_parse_labels_names_the_callers_key():
    with pytest.raises(ConfigError, match=r"^--labels: .*empty label"):
        parse_labels("a,,b", key="--labels")
    assert parse_labels("") == ()


# ------------------------------------------------------------------------------------------ model by name
@pytest.mark.parametrize(
    "model, kind", [("minilm", "text"), ("digits-cnn", "image"), ("torch:my_models.nets:small", "image")]
)
@pytest.mark.parametrize("mode", ["", "head", "last-k", "lora", "full"])
def test_a_model_without_a_preset_takes_its_kinds_recommendations(model, kind, mode):
    cfg = RunConfig.create(preset="", model=model, labels="neg,pos", mode=mode)
    rec = recommended_hyperparameters(mode or "head", kind)
    assert (cfg.preset, cfg.model, cfg.dataset) == ("", model, "")
    assert cfg.mode == (mode or "head")
    assert (cfg.lr, cfg.batch_size, cfg.local_epochs) == (rec.lr, rec.batch_size, rec.local_epochs)
    assert cfg.num_server_rounds == MODEL_ONLY_ROUNDS and cfg.max_length == 64
    assert RunConfig.from_flower(cfg.to_flower()) == cfg  # a site reads back the same run


def test_a_model_without_a_preset_keeps_what_the_run_sets(tmp_path):
    cfg = RunConfig.create(
        preset="", model=f"hf:{tmp_path}", labels=["a", "b", "c"], lr=0.3, num_server_rounds=2, pooling="cls"
    )
    assert cfg.model.startswith(f"hf:{tmp_path}") and "pooling=cls" in cfg.model
    assert (cfg.lr, cfg.num_server_rounds, cfg.label_names) == (0.3, 2, ("a", "b", "c"))
    # text recommendations for hf: models, head's batch size
    assert cfg.batch_size == recommended_hyperparameters("head", "text").batch_size


def test_a_preset_with_a_model_keeps_the_presets_data():
    """`preset=sms-spam model=hf:...` still means the preset's dataset with another encoder."""
    cfg = RunConfig.create(preset="trec6", model="minilm")
    assert cfg.dataset == "trec6" and cfg.label_names == DATASET_LABELS["trec6"]
    assert cfg.lr == PRESETS["trec6"].lr


@pytest.mark.parametrize(
    "values, words",
    [
        ({"preset": ""}, r"^preset: .*needs model="),
        ({"preset": "", "model": "bert"}, r"^model: 'bert' is not a model"),
        ({"preset": "", "model": "minilm"}, r"^labels: a run without a preset"),
        ({"preset": "imagenet"}, r"^preset: unknown preset 'imagenet'.*preset=\"\""),
    ],
)
def test_a_model_only_run_is_refused_with_the_key(values, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig.create(**values)


def test_simulate_model_without_data_or_preset_is_refused_quickly(tmp_path):
    result = runner.invoke(app, ["simulate", "--model", "minilm", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--model minilm without --preset" in result.output and "--data FILE" in result.output
    result = runner.invoke(
        app, ["simulate", "--model", "minilm", "--run-config", "model=digits-cnn", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "disagree" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_simulate_model_reads_data_of_its_kind(tmp_path):
    """--model digits-cnn with a CSV is refused before anything loads, naming --model."""
    data = tmp_path / "reviews.csv"
    data.write_text("review,sentiment\n" + "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    result = runner.invoke(
        app, ["simulate", "--model", "digits-cnn", "--data", str(data), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "(--model digits-cnn)" in result.output and "--model minilm" in result.output


# ------------------------------------------------------------------------------------- central evaluation
def test_custom_labels_on_a_presets_dataset_are_never_scored_on_its_split():
    cfg = RunConfig.create(preset="sms-spam", labels="neg,pos")
    plan = central_eval_plan(cfg)
    assert not plan.on and plan.warn
    assert "neg,pos" in plan.reason and "sms-spam" in plan.reason


@pytest.mark.parametrize(
    "values, on",
    [
        ({"preset": "sms-spam"}, True),
        ({"preset": "sms-spam", "labels": "ham,spam"}, True),  # the preset's own labels, in order
        ({"preset": "sms-spam", "labels": "spam,ham"}, False),  # same names, another index order
        ({"preset": "digits", "labels": ",".join(str(d) for d in range(9, -1, -1))}, False),
        ({"preset": "", "model": "minilm", "labels": "neg,pos"}, False),  # no dataset: the sites hold the data
        ({"preset": "", "model": "minilm", "labels": "ham,spam", "dataset": "sms-spam"}, True),
        ({"preset": "sms-spam", "central_eval": False}, False),
        ({"preset": "sms-spam", "secure_aggregation": "he"}, False),
    ],
)
def test_central_evaluation_only_on_the_tasks_own_test_data(values, on):
    plan = central_eval_plan(RunConfig.create(**values))
    assert plan.on is on
    assert bool(plan.reason) is not on and bool(plan.test_data) is on


def test_a_run_on_its_own_data_is_scored_on_it(tmp_path):
    cfg = RunConfig.create(sim_data=str(tmp_path / "sim-data.npz"), labels="neg,pos")
    plan = central_eval_plan(cfg)
    assert plan.on and "sim-data" in plan.test_data


def test_asked_off_is_no_warning_but_a_missing_test_set_is():
    assert not central_eval_plan(RunConfig.create(central_eval=False)).warn
    assert not central_eval_plan(RunConfig.create(secure_aggregation="he")).warn
    assert central_eval_plan(RunConfig.create(preset="", model="digits-cnn", labels="a,b")).warn


def test_the_summary_says_why_and_test_accuracy_is_null(tmp_path, caplog):
    cfg = RunConfig.create(preset="sms-spam", labels="neg,pos")
    base = summary_base(cfg, "r-1")
    assert base["central_eval"]["on"] is False and "neg,pos" in base["central_eval"]["reason"]
    recorder = RunRecorder(tmp_path, summary_base=base)
    with caplog.at_level(logging.WARNING, logger="privatune.server"):
        # No evaluator is built, so no test split is ever loaded.
        assert central_evaluator(cfg, InitialWeights(ArrayRecord(), {}, 0), recorder.warnings) is None
    assert any("central evaluation off" in r.getMessage() for r in caplog.records)
    recorder.write_summary()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] is None and summary["central_eval"]["on"] is False
    assert any(w.startswith("central evaluation off: labels neg,pos") for w in summary["warnings"])


def test_the_summary_names_the_test_data_when_on():
    base = summary_base(RunConfig.create(preset="trec6"), "r-2")
    assert base["central_eval"] == {"on": True, "test_data": "dataset 'trec6''s held-out test split"}


# ---------------------------------------------------------------------------------- the user's own keys
def _csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\ngreat,pos\nawful,neg\n")
    return path


def test_site_errors_name_node_config_keys(tmp_path):
    with pytest.raises(SiteDataError) as err:
        load_site_data(SiteDataSpec(_csv(tmp_path), "csv"), ("neg", "pos"), kind="text")
    assert "text-column/label-column" in str(err.value) and "node config" in str(err.value)
    assert "text_column" not in str(err.value)
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text('{"review": "great", "sentiment": "pos"}\n')
    with pytest.raises(SiteDataError) as err:
        load_site_data(SiteDataSpec(jsonl, "jsonl"), ("neg", "pos"), kind="text")
    assert "text-column/label-column" in str(err.value) and "text_column" not in str(err.value)
    with pytest.raises(SiteDataError, match="Check data-path in the site's node config"):
        load_site_data(SiteDataSpec(tmp_path / "missing.csv", "csv"), ("neg", "pos"), kind="text")


def test_simulate_errors_name_its_options(tmp_path):
    def load(path, **kw):
        return load_own_data(
            path,
            None,
            fmt="",
            text_column=kw.get("text_column", "text"),
            label_column="sentiment",
            labels=kw.get("labels", ""),
            model="minilm",
            model_option="--model minilm",
        )

    with pytest.raises(SiteDataError) as err:
        load(_csv(tmp_path))
    assert "pass --text-column/--label-column" in str(err.value) and "node config" not in str(err.value)
    with pytest.raises(SiteDataError, match="Check the path given to --data"):
        load(tmp_path / "missing.csv")
    own = load(_csv(tmp_path), text_column="review", labels='["pos", "neg"]')  # the list form, as --labels
    assert own.data.label_names == ("pos", "neg")
    with pytest.raises(ConfigError, match=r"^--labels: "):
        load(_csv(tmp_path), text_column="review", labels="pos,,neg")


# ------------------------------------------------------------------------------------ the docs say what runs
def _table(doc: str, heading: str) -> list[list[str]]:
    """The rows of the first table under ``heading`` in docs/DOC (cells stripped, backticks dropped)."""
    lines = (REPO / "docs" / doc).read_text().split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:  # after the header and its rule
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("`", "") for c in line.strip("|").split("|")])
    return rows


def test_the_presets_table_is_the_presets():
    rows = _table("fine-tuning.md", "## Presets and their defaults")
    assert [r[0].split()[0] for r in rows] == list(PRESETS)
    for name, model, dataset, mode, lr, batch, epochs, rounds, max_length in rows:
        p = PRESETS[name.split()[0]]
        assert (model, dataset.split()[0], mode) == (p.model, p.dataset, p.mode)
        lr, _, without_dp = lr.partition(" ")  # "6.0 (1.0 without DP)" for a preset tuned under DP
        assert without_dp == (f"({p.lr_without_dp} without DP)" if p.lr_without_dp else "")
        assert (float(lr), int(batch), int(epochs), int(rounds)) == (
            p.lr,
            p.batch_size,
            p.local_epochs,
            p.num_server_rounds,
        )
        assert max_length == (str(p.max_length) if MODEL_KINDS[p.model] == "text" else "-")
        assert f"({len(DATASET_LABELS[p.dataset])}" in dataset


def test_the_recommendations_table_is_the_code():
    from privatune.common.models.modes import RECOMMENDED_HYPERPARAMETERS

    rows = _table("fine-tuning.md", "## Recommended hyperparameters")
    assert len(rows) == sum(len(v) for v in RECOMMENDED_HYPERPARAMETERS.values())
    for kind, mode, lr, batch, epochs in rows:
        rec = RECOMMENDED_HYPERPARAMETERS[kind][mode]
        assert (float(lr), int(batch), int(epochs)) == (rec.lr, rec.batch_size, rec.local_epochs)


def _documented_run_configs() -> list[str]:
    """The custom-task run configs the docs give to `flwr run`, as Flower's --run-config receives them."""
    found = []
    for doc in ("deploy-coordinator.md", "fine-tuning.md"):
        for line in (REPO / "docs" / doc).read_text().splitlines():
            if 'preset=""' in line and ("RUN_CONFIG='" in line or "flwr run" in line):
                found.append(line.split("'")[1])
    return found


def test_the_documented_custom_task_run_configs_resolve_without_a_preset():
    configs = _documented_run_configs()
    assert len(configs) == 2
    for text in configs:
        cfg = RunConfig.from_flower(parse_config_args([text]))  # exactly as `flwr run --run-config` parses it
        assert (cfg.preset, cfg.model, cfg.dataset, cfg.label_names) == ("", "minilm", "", ("neg", "pos"))
        rec = recommended_hyperparameters("head", "text")
        assert (cfg.mode, cfg.lr, cfg.batch_size) == ("head", rec.lr, rec.batch_size)
        plan = central_eval_plan(cfg)
        assert not plan.on and "no dataset" in plan.reason


@pytest.mark.slow
def test_simulate_model_on_an_npz_the_test_writes(tmp_path):
    """The docs' `privatune simulate --model digits-cnn --data scans.npz ...`: no preset, the run's own test split."""
    import os
    import subprocess
    import sys

    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < 2
    names = np.array(["zero", "one"])[digits.target[keep]]
    np.savez(tmp_path / "scans.npz", x=digits.images[keep], y=names)  # raw 8x8 digits, labels as names
    out = tmp_path / "runs" / "scans"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "MPLCONFIGDIR")} | {"HOME": str(home)}
    cmd = [sys.executable, "-m", "privatune.cli", "simulate", "--model", "digits-cnn", "--data"]
    cmd += [str(tmp_path / "scans.npz"), "--clients", "2", "--rounds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "labels one,zero found in the data" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["preset"] == "" and summary["model"] == "digits-cnn"
    assert summary["central_eval"]["on"] and "sim-data" in summary["central_eval"]["test_data"]
    assert summary["test_accuracy"] is not None and summary["test_accuracy"] >= 0.8
    config = json.loads((out / "config.json").read_text())
    rec = recommended_hyperparameters("head", "image")
    assert (config["lr"], config["batch-size"], config["local-epochs"]) == (rec.lr, rec.batch_size, rec.local_epochs)
