"""`privatune evaluate` and self-describing model files (common/model_card.py, common/model_eval.py, docs/evaluate.md).

Fast: the card's round trip and its errors, a model file scored through the command (table, --json, PNG), a text
model scored exactly like the server's central evaluation, an encrypted checkpoint's card surviving `decrypt`,
bad test files. Slow: models written by real simulations (plaintext and HE) score what their summary.json says.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from typer.testing import CliRunner

from privatune.cli import app
from privatune.common.config import RunConfig
from privatune.common.datasets import LabelledData
from privatune.common.federation_data import central_split
from privatune.common.imaging import MNIST_MEAN, MNIST_STD
from privatune.common.model_card import ModelCard, ModelCardError, Privacy, read_model_file
from privatune.common.models import (
    FineTuning,
    backbone_fingerprint,
    configure_trainable,
    get_model_spec,
    load_trainable_state,
)
from privatune.common.models import trainable_state as state_of
from privatune.server.app import save_global

ROOT = Path(__file__).resolve().parents[1]


def text_card(**kw) -> ModelCard:
    values = dict(
        model="minilm",
        kind="text",
        fine_tuning=FineTuning(mode="lora", lora_rank=4, lora_alpha=8.0, lora_targets=("query", "value"), seed=7),
        labels=("neg", "pos, mixed", "neutral"),
        privacy=Privacy(dp=True, target_epsilon=8.0, max_client_epsilon=6.76, delta=1e-5, accountant="prv"),
        max_length=48,
        pooling="mean",
        run_id="123",
        preset="sms-spam",
        dataset="sim-data",
        rounds_completed=3,
    )
    values.update(kw)
    return ModelCard(**values)  # type: ignore[arg-type]


def digits_card(cfg: RunConfig, **kw) -> ModelCard:
    values = dict(
        model=cfg.model,
        kind="image",
        fine_tuning=cfg.fine_tuning,
        labels=cfg.label_names,
        privacy=Privacy(dp=False, target_epsilon=float("inf"), max_client_epsilon=None, delta=None, accountant="prv"),
        run_id="r1",
        backbone_fingerprint=backbone_fingerprint(cfg.model),
    )
    values.update(kw)
    return ModelCard(**values)  # type: ignore[arg-type]


def write_split_npz(path: Path, data: LabelledData) -> Path:
    """Model inputs back to [0, 1] pixels (the site reader normalises them again), labels as indices."""
    pixels = np.clip(np.asarray(data.inputs)[:, 0] * MNIST_STD + MNIST_MEAN, 0.0, 1.0).astype(np.float32)
    np.savez(path, x=pixels, y=np.asarray(data.labels, dtype=np.int64))
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args], catch_exceptions=False)


# ---------------------------------------------------------------------------------------------- the card


def test_card_round_trips_through_metadata():
    for card in (text_card(), text_card(pooling="cls", model="hf:/models/bert|pooling=cls", fine_tuning=FineTuning())):
        meta = card.to_metadata()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        assert json.loads(meta["labels"]) == list(card.labels)  # a label holding a comma survives
        assert ModelCard.from_metadata(meta) == card
    lora = text_card(fine_tuning=FineTuning(mode="lora", lora_blocks=2))
    meta = lora.to_metadata()
    assert meta["lora-blocks"] == "2" and ModelCard.from_metadata(meta) == lora
    older = {k: v for k, v in meta.items() if k != "lora-blocks"}  # a file written before the key: every block
    assert ModelCard.from_metadata(older).fine_tuning == FineTuning(mode="lora")
    image = digits_card(RunConfig.create(preset="digits"))
    meta = image.to_metadata()
    assert meta["image-side"] == "28" and "MNIST-normalised" in meta["input"] and "max-length" not in meta
    back = ModelCard.from_metadata({**meta, "he_fingerprint": "abc"})
    assert back.privacy.target_epsilon == float("inf") and back.privacy.max_client_epsilon is None
    assert dict(back.extra) == {"he_fingerprint": "abc"} and dataclasses.replace(back, extra={}) == image


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"labels": None}, "field 'labels' is missing"),
        ({"labels": "neg,pos"}, "field 'labels' is not a JSON list"),
        ({"labels": '["a"]'}, "'labels': needs at least 2 distinct"),
        ({"last-k": "two"}, "field 'last-k' must be an integer, got 'two'"),
        ({"last-k": "0"}, "last-k must be at least 1"),
        ({"lora-freeze-a": "yes"}, "field 'lora-freeze-a' must be true or false"),
        ({"max-length": None}, "field 'max-length' is missing"),
        ({"kind": "audio"}, "field 'kind': must be text or image"),
        ({"pooling": "max"}, "field 'pooling': must be mean or cls"),
        ({"target-epsilon": "nan"}, "field 'target-epsilon' must be a number"),
        ({"format": None}, "carries no privatune model card"),
        ({"format-version": "9"}, "model card version '9' is not supported"),
    ],
)
def test_card_errors_name_the_file_and_the_field(change, words):
    meta = text_card().to_metadata()
    for key, value in change.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    with pytest.raises(ModelCardError) as err:
        ModelCard.from_metadata(meta, source="m.safetensors")
    assert words in str(err.value) and str(err.value).startswith("m.safetensors")


def test_the_server_card_holds_what_the_sites_reported(tmp_path):
    from privatune.server.app import InitialWeights, model_card
    from privatune.server.run_record import RoundReport, RunRecorder

    cfg = RunConfig.create(preset="trec6", mode="lora", lora_rank=4, target_epsilon=3.0, max_length=40)
    recorder = RunRecorder(tmp_path, summary_base={"run_id": "7"})
    recorder.finish_round(RoundReport(round=0))
    recorder.finish_round(
        RoundReport(
            round=1,
            aggregated=True,
            clients={"a": {"epsilon": 1.5, "delta": 1e-5}, "b": {"epsilon": 2.25, "delta": 1e-6}},
            released={"a": 2.5},  # a metric release after training counts in the spend
        )
    )
    card = model_card(cfg, "7", recorder, InitialWeights(ArrayRecord(), {}, 0, backbone_fingerprint="f" * 64))
    assert card.privacy == Privacy(True, 3.0, 2.5, 1e-5, "prv", "site-csprng")
    assert card.labels == cfg.label_names and card.fine_tuning == cfg.fine_tuning and card.rounds_completed == 1
    assert (card.kind, card.max_length, card.pooling, card.model, card.run_id) == ("text", 40, "mean", "minilm", "7")
    assert ModelCard.from_metadata(card.to_metadata()) == card


# ---------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A digits head model written by the server's save_global, and the run's central test split as an npz."""
    folder = tmp_path_factory.mktemp("digits-model")
    cfg = RunConfig.create(preset="digits", max_records=300, seed=3)
    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
    configure_trainable(model, cfg.fine_tuning)
    state = state_of(model)
    state["head.weight"] = np.random.default_rng(0).normal(0, 0.1, state["head.weight"].shape).astype(np.float32)
    load_trainable_state(model, state)
    path = save_global(ArrayRecord({k: Array(v) for k, v in state.items()}), digits_card(cfg), folder, False)
    _, test = central_split(cfg)
    return path, write_split_npz(folder / "test.npz", test), model, test


def test_evaluate_prints_the_figures_and_writes_the_png(digits_model, tmp_path):
    path, test_file, _, test = digits_model
    res = invoke(str(path), str(test_file), "--out", str(tmp_path / "report"))
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "macro-F1" in res.output and "per class" in res.output
    assert "confusion" in res.output and "digits-cnn (head)" in res.output
    png = tmp_path / "report" / "evaluation-test.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    saved = json.loads((tmp_path / "report" / "evaluation-test.json").read_text())
    assert saved["num_examples"] == len(test)


def test_the_default_report_folder_is_beside_the_model_and_goes_with_the_run(digits_model, tmp_path):
    from privatune.simulations.run_folder import claim

    path, test_file, *_ = digits_model
    assert invoke(str(path), str(test_file), "--json").exit_code == 0
    assert (path.parent / "evaluation" / "evaluation-test.json").is_file()
    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    (run / "evaluation" / "evaluation-test.png").write_bytes(b"png")
    claim(run, overwrite=True)  # `simulate --overwrite` deletes a run's evaluations with it
    assert list(run.iterdir()) == []


def test_json_output_parses_and_agrees_with_an_independent_computation(digits_model, tmp_path):
    import torch
    from sklearn.metrics import confusion_matrix, f1_score

    path, test_file, model, test = digits_model
    res = invoke(str(path), str(test_file), "--json", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)  # one JSON object, nothing else on stdout
    with torch.no_grad():
        pred = model.eval()(torch.as_tensor(test.inputs)).argmax(1).numpy()
    assert got["accuracy"] == pytest.approx(float((pred == test.labels).mean()), abs=1e-12)
    present = sorted(set(test.labels.tolist()) | set(pred.tolist()))
    assert got["macro_f1"] == pytest.approx(f1_score(test.labels, pred, labels=present, average="macro"), abs=1e-12)
    assert got["confusion_matrix"] == confusion_matrix(test.labels, pred, labels=list(range(10))).tolist()
    assert [c["support"] for c in got["per_class"]] == np.bincount(test.labels, minlength=10).tolist()
    assert got["model"]["run_id"] == "r1" and got["model"]["labels"] == [str(i) for i in range(10)]


def test_a_label_the_model_does_not_know_names_file_label_and_labels(digits_model, tmp_path):
    path, test_file, *_ = digits_model
    with np.load(test_file) as npz:
        x, y = npz["x"][:5], npz["y"][:5].copy()
    y[2] = 12
    np.savez(tmp_path / "odd.npz", x=x, y=y)
    res = invoke(str(path), str(tmp_path / "odd.npz"))
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "odd.npz, record 3: unknown label 12" in text and "The model knows only the labels 0, 1, 2" in text


def test_bad_test_files_and_model_files_are_one_line_errors(digits_model, tmp_path):
    path, test_file, *_ = digits_model
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("text,label\nhello,1\n")
    cases = [
        ((str(path), str(csv_file)), "holds text data (csv), but the model 'digits-cnn' reads image data"),
        ((str(path), str(tmp_path / "none.npz")), "none.npz: file not found"),
        ((str(tmp_path / "none.safetensors"), str(test_file)), "none.safetensors: not found"),
        ((str(test_file), str(test_file)), "is not a safetensors model file"),
    ]
    for args, words in cases:
        res = invoke(*args)
        assert res.exit_code == 2, res.output
        assert words in " ".join(res.output.split()), res.output
    bare = tmp_path / "bare.safetensors"
    from safetensors.numpy import save_file

    weights = read_model_file(path)[1]
    save_file(weights, str(bare), metadata={"model": "digits-cnn"})
    res = invoke(str(bare), str(test_file))
    assert res.exit_code == 2 and "carries no privatune model card" in res.output


def test_an_hf_model_whose_folder_is_elsewhere_asks_for_model_path(digits_model, tmp_path):
    from safetensors.numpy import save_file

    _, weights = read_model_file(digits_model[0])
    card = text_card(model="hf:/nowhere/bert", fine_tuning=FineTuning())
    save_file(weights, str(tmp_path / "m.safetensors"), metadata=card.to_metadata())
    (tmp_path / "t.csv").write_text("text,label\nhello,neg\n")
    res = invoke(str(tmp_path / "m.safetensors"), str(tmp_path / "t.csv"))
    assert res.exit_code == 2 and "hf:/nowhere/bert" in res.output and "--model-path" in res.output
    res = invoke(str(tmp_path / "m.safetensors"), str(tmp_path / "t.csv"), "--model-path", str(tmp_path / "none"))
    assert res.exit_code == 2 and "--model-path" in res.output and "is not a folder" in res.output


def test_weights_that_do_not_fit_the_card_are_refused(digits_model, tmp_path):
    from safetensors.numpy import save_file

    path, test_file, *_ = digits_model
    card, weights = read_model_file(path)
    lora = dataclasses.replace(card, fine_tuning=FineTuning(mode="lora", seed=card.fine_tuning.seed))
    save_file(weights, str(tmp_path / "m.safetensors"), metadata=lora.to_metadata())
    res = invoke(str(tmp_path / "m.safetensors"), str(test_file))
    assert res.exit_code == 2 and "the weights do not fit the model its card describes" in res.output


def write_reviews(path: Path, n: int, offset: int = 0) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["review", "sentiment"])
        w.writeheader()
        for i in range(offset, offset + n):
            w.writerow({"review": f"a wonderful, delightful film number {i}", "sentiment": "good"})
            w.writerow({"review": f"boring and awful, a waste of time {i}", "sentiment": "bad"})
    return path


def test_a_text_model_scores_exactly_as_the_central_evaluation(tmp_path, monkeypatch):
    """Same records, same model: evaluate's loss, accuracy and macro-F1 equal the server's CentralEvaluator's
    (mean-pooled, unnormalised MiniLM features; normalising them would change the loss)."""
    from privatune.cli.own_data import load_own_data, write_copy
    from privatune.server.central_eval import CentralEvaluator

    train, test = write_reviews(tmp_path / "train.csv", 10), write_reviews(tmp_path / "test.csv", 8, offset=50)
    own = load_own_data(
        train,
        test,
        fmt="",
        text_column="review",
        label_column="sentiment",
        labels="",
        model="minilm",
        model_option="--preset sms-spam",
    )
    cfg = RunConfig.create(sim_data=str(write_copy(own, tmp_path / "run")), labels="bad,good", max_length=32, seed=5)
    model = get_model_spec(cfg.model).build(2, cfg.seed)
    configure_trainable(model, cfg.fine_tuning)
    state = state_of(model)
    card = ModelCard(
        model=cfg.model,
        kind="text",
        fine_tuning=cfg.fine_tuning,
        labels=cfg.label_names,
        privacy=Privacy(True, 8.0, 7.9, 1e-5, "prv"),
        max_length=cfg.max_length,
        pooling="mean",
    )
    folder = tmp_path / "runs" / "reviews"
    folder.mkdir(parents=True)
    path = save_global(ArrayRecord({k: Array(v) for k, v in state.items()}), card, folder, False)
    central = CentralEvaluator(cfg, cache_dir=None)(state)
    monkeypatch.chdir(tmp_path)
    got = json.loads(run_command(EVALUATE_TEXT + " --json", tmp_path).output)  # the command docs/evaluate.md shows
    assert got["num_examples"] == central.num_examples == 16
    assert got["loss"] == pytest.approx(central.loss, rel=1e-6)
    assert got["accuracy"] == central.accuracy and got["macro_f1"] == pytest.approx(central.macro_f1, abs=1e-12)
    res = invoke(str(path), str(test))  # the default columns are not this file's
    assert res.exit_code == 2 and "--text-column" in res.output


def test_an_encrypted_checkpoint_keeps_its_card_through_decrypt(digits_model, tmp_path):
    from privatune.common import he

    path, test_file, *_ = digits_model
    card, weights = read_model_file(path)
    keys = he.write_keys(tmp_path / "keys")
    public = he.load_context(keys.public, require_secret=False)
    ckpt = he.save_checkpoint(tmp_path / "global.he-checkpoint", he.encrypt_state(public, weights), card.to_metadata())
    assert he.checkpoint_metadata(ckpt) == card.to_metadata()
    out = tmp_path / "plain" / "global.decrypted.safetensors"
    args = ["decrypt", "--secret-context", str(keys.secret), "--checkpoint", str(ckpt), "--out", str(out)]
    assert CliRunner().invoke(app, args, catch_exceptions=False).exit_code == 0
    back, _ = read_model_file(out)
    assert dataclasses.replace(back, extra={}) == card and set(back.extra) == {"he_fingerprint", "num_summands"}
    plain = json.loads(invoke(str(path), str(test_file), "--json", "--out", str(tmp_path)).output)
    res = invoke(str(out), str(test_file), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["accuracy"] == plain["accuracy"]
    # A checkpoint written without a card (before this version) still loads; its decrypted file says what is missing.
    old = he.save_checkpoint(tmp_path / "old.he-checkpoint", he.encrypt_state(public, weights))
    assert he.checkpoint_metadata(old) == {} and he.load_checkpoint(old).num_summands == 1
    he.decrypt_checkpoint_to_safetensors(keys.secret, old, tmp_path / "old.safetensors")
    res = invoke(str(tmp_path / "old.safetensors"), str(test_file))
    assert res.exit_code == 2 and "carries no privatune model card" in res.output


# ---------------------------------------------------------------------------------------------- real runs

# The commands docs/evaluate.md shows, run as written (from a fresh folder; test.npz is the run's own test split).
SIMULATE = (
    "privatune simulate --preset digits --clients 2 --rounds 1 --epsilon 4 --run-config max-records=300 "
    "--out runs/digits"
)
EVALUATE = "privatune evaluate runs/digits/global.safetensors test.npz"
EVALUATE_JSON = EVALUATE + " --json"
SIMULATE_HE = (
    "privatune simulate --preset digits --clients 2 --rounds 1 --epsilon 4 --run-config max-records=300 "
    "--secure-aggregation he --out runs/digits-he"
)
DECRYPT = (
    "privatune decrypt --secret-context runs/digits-he/keys/secret.ctx "
    "--checkpoint runs/digits-he/global.he-checkpoint --out final.safetensors"
)
EVALUATE_HE = "privatune evaluate final.safetensors test.npz"
EVALUATE_TEXT = (
    "privatune evaluate runs/reviews/global.safetensors test.csv --text-column review --label-column sentiment"
)
DOC_COMMANDS = (SIMULATE, EVALUATE, EVALUATE_JSON, SIMULATE_HE, DECRYPT, EVALUATE_HE, EVALUATE_TEXT)


def test_the_docs_show_the_commands_the_tests_run():
    doc = (ROOT / "docs" / "evaluate.md").read_text()
    missing = [cmd for cmd in DOC_COMMANDS if cmd not in doc]
    assert missing == []
    assert "[docs/evaluate.md](docs/evaluate.md)" in (ROOT / "README.md").read_text()


def run_command(command: str, folder: Path):
    """One documented command, run from ``folder``: simulate in its own process (as a user would), the rest
    in-process."""
    argv = shlex.split(command)
    assert argv[0] == "privatune"
    if argv[1] == "simulate":
        env = {**os.environ, "HOME": str(folder / "home"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("FLWR_HOME", None)
        env.pop("MPLCONFIGDIR", None)
        (folder / "home").mkdir(exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "privatune.cli", *argv[1:]],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=folder,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc
    res = CliRunner().invoke(app, argv[1:], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def write_run_test_split(run: Path, path: Path) -> Path:
    """The central test split of the run in ``run`` (rebuilt from its config.json) as an npz test file."""
    cfg = RunConfig.from_flower(json.loads((run / "config.json").read_text()))
    return write_split_npz(path, central_split(cfg)[1])


@pytest.mark.slow
def test_a_simulated_model_scores_its_summary_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_command(SIMULATE, tmp_path)
    run = tmp_path / "runs" / "digits"
    summary = json.loads((run / "summary.json").read_text())
    write_run_test_split(run, tmp_path / "test.npz")
    printed = run_command(EVALUATE, tmp_path).output
    assert f"accuracy {summary['test_accuracy']:.4f}" in printed
    got = json.loads(run_command(EVALUATE_JSON, tmp_path).output)
    assert got["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
    assert got["macro_f1"] == pytest.approx(summary["test_macro_f1"], abs=1e-12)
    card = got["model"]
    assert card["run_id"] == summary["run_id"] and card["mode"] == "head" and card["dp"]
    assert card["max_client_epsilon"] == summary["max_client_epsilon"] > 0 and card["target_epsilon"] == 4.0
    assert card["delta"] == 1e-5 and card["accountant"] == "prv" and card["rounds_completed"] == 1
    assert (run / "evaluation" / "evaluation-test.png").exists()  # beside the model file by default


@pytest.mark.slow
def test_a_decrypted_he_model_evaluates_with_no_extra_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_command(SIMULATE_HE, tmp_path)
    run = tmp_path / "runs" / "digits-he"
    summary = json.loads((run / "summary.json").read_text())
    run_command(DECRYPT, tmp_path)
    write_run_test_split(run, tmp_path / "test.npz")
    run_command(EVALUATE_HE, tmp_path)
    got = json.loads((tmp_path / "evaluation" / "evaluation-test.json").read_text())  # beside final.safetensors
    # summary.json's figure is the simulation's own decryption of the same checkpoint, scored on the same split.
    assert got["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
    card = got["model"]
    assert card["secure_aggregation"] == "he" and card["run_id"] == summary["run_id"]
    assert card["max_client_epsilon"] == summary["max_client_epsilon"]
