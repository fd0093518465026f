"""Your own model: a local Hugging Face encoder folder (``hf:FOLDER``) or an image backbone function
(``torch:module:function``), named in the run config, loaded offline, trained in every mode under DP, and
refused at a site whose backbone weights are not the coordinator's.

Every model here is tiny and randomly initialised, saved by the test to a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from privatune.common.config import ConfigError, RunConfig
from privatune.common.models import (
    FineTuning,
    backbone_fingerprint,
    configure_trainable,
    frozen_state_fingerprint,
    get_model_spec,
    trainable_state,
)
from privatune.common.models.hf import ModelFolderError
from privatune.common.models.names import relocate, run_model_name
from privatune.common.models.torch_backbone import BackboneImportError

WORDS = [
    "win",
    "a",
    "prize",
    "now",
    "lunch",
    "tomorrow",
    "how",
    "far",
    "is",
    "the",
    "moon",
    "who",
    "wrote",
    "it",
    "cash",
    "reward",
    "ok",
    "later",
    "film",
    "good",
    "bad",
]
TEXTS = ["win a prize now", "lunch tomorrow", "how far is the moon", "who wrote it", "cash reward", "ok later"]
LABELS = torch.tensor([1, 0, 0, 0, 1, 0])


def save_tiny_encoder(folder: Path, seed: int = 0, family: str = "bert") -> Path:
    """A 2-block, 16-wide random encoder of ``family`` with a word-level BERT tokenizer, saved to ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizer, DistilBertConfig, DistilBertModel

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(seed)
    if family == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=len(vocab), dim=16, n_layers=2, n_heads=2, hidden_dim=32))
    else:
        model = BertModel(
            BertConfig(
                vocab_size=len(vocab),
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=64,
            )
        )
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("models") / "tiny-bert", seed=0)


@pytest.fixture(scope="module")
def other_bert(tmp_path_factory) -> Path:
    """Same architecture and tokenizer, other weights: what a site with the wrong checkpoint holds."""
    return save_tiny_encoder(tmp_path_factory.mktemp("models") / "tiny-bert-other", seed=1)


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("models") / "tiny-distilbert", family="distilbert")


# ------------------------------------------------------------------------------------------------ names
def test_an_hf_name_becomes_absolute_and_pooling_folds_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_model_name("hf:models/bert") == f"hf:{tmp_path}/models/bert"
    cls = run_model_name("hf:models/bert", "cls")
    assert cls == f"hf:{tmp_path}/models/bert|pooling=cls"
    assert run_model_name(cls, "cls") == cls  # idempotent: a site reads back what the coordinator sent
    assert run_model_name("minilm") == "minilm"
    assert relocate(cls, "/site/copy") == "hf:/site/copy|pooling=cls"  # a site's model-path, same pooling
    assert relocate("minilm", "/site/copy") == "minilm"


@pytest.mark.parametrize(
    ("model", "pooling", "names"),
    [
        ("hf:", "", "model:"),
        ("hf:/m", "max", "pooling:"),
        ("minilm", "cls", "pooling:"),
        ("hf:/m|pooling=mean", "cls", "pooling:"),
        ("torch:not a module:f", "", "model:"),
        ("torch:pkg.mod", "", "model:"),
    ],
)
def test_a_bad_model_name_is_refused_naming_the_key(model, pooling, names):
    with pytest.raises(ConfigError) as err:
        RunConfig(preset="sms-spam", model=model, pooling=pooling).resolved()
    assert str(err.value).startswith(names), err.value


# -------------------------------------------------------------------------------------------- the folder
def _folder_error(folder: Path) -> str:
    with pytest.raises(ModelFolderError) as err:
        get_model_spec(run_model_name(f"hf:{folder}"))
    return str(err.value)


def test_a_folder_that_is_not_an_encoder_checkpoint_is_refused_with_the_fix(tmp_path, bert):
    assert "does not exist" in _folder_error(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _folder_error(empty) and "save_pretrained" in _folder_error(empty)
    decoder = tmp_path / "gpt"
    decoder.mkdir()
    (decoder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model_type 'gpt2'" in _folder_error(decoder)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((bert / "config.json").read_text())
    assert "no tokenizer" in _folder_error(no_tokenizer)
    (no_tokenizer / "vocab.txt").write_text((bert / "vocab.txt").read_text())
    message = _folder_error(no_tokenizer)
    assert "no weights" in message and str(no_tokenizer) in message


# ---------------------------------------------------------------------------------------- build and pool
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_a_local_encoder_builds_a_classifier_with_its_blocks_and_lora_targets(family, bert, distilbert):
    folder = bert if family == "bert" else distilbert
    name = run_model_name(f"hf:{folder}")
    spec = get_model_spec(name)
    assert spec.kind == "text" and spec.feature_dim == 16
    model = spec.build(3, 0)
    inputs = spec.encode(TEXTS, max_length=8)
    assert [tuple(t.shape) for t in inputs] == [(6, 8), (6, 8)]
    model.eval()
    with torch.no_grad():
        assert tuple(model(*inputs).shape) == (6, 3)
    layers = "transformer.layer" if family == "distilbert" else "encoder.layer"
    assert model.block_prefixes == (f"backbone.model.{layers}.0.", f"backbone.model.{layers}.1.")
    targets = ("q_lin", "v_lin") if family == "distilbert" else ("query", "value")
    assert tuple(model.lora_targets) == targets


def test_mean_and_cls_pooling_give_different_features(bert):
    mean = get_model_spec(run_model_name(f"hf:{bert}"))
    cls = get_model_spec(run_model_name(f"hf:{bert}", "cls"))
    inputs = mean.encode(TEXTS, max_length=8)
    with torch.no_grad():
        a = mean.build(2, 0).eval().backbone(*inputs)
        b = cls.build(2, 0).eval().backbone(*inputs)
    assert a.shape == b.shape == (6, 16) and not torch.allclose(a, b)


# ------------------------------------------------------------------------------------------- DP training
@pytest.mark.parametrize(
    "settings",
    [FineTuning(mode="last-k", last_k=1), FineTuning(mode="lora", lora_rank=2), FineTuning(mode="full")],
    ids=["last-k-1", "lora", "full"],
)
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_own_encoder_weights_move_under_dp_and_frozen_ones_do_not(family, settings, bert, distilbert):
    from privatune.client.randomness import SeededRandomness
    from privatune.client.training import TrainHooks, train_local

    spec = get_model_spec(run_model_name(f"hf:{bert if family == 'bert' else distilbert}"))
    model = spec.build(2, 0)
    names = configure_trainable(model, settings)
    trainable = set(names)
    frozen = frozen_state_fingerprint(model)
    before = trainable_state(model)
    without_sample: set[str] = set()

    def before_step(step: int, module: torch.nn.Module, optimizer: object) -> None:
        for n, p in module.named_parameters():
            if n.removeprefix("_module.") in trainable and getattr(p, "grad_sample", None) is None:
                without_sample.add(n)

    result = train_local(
        model,
        spec.encode(TEXTS, max_length=8),
        LABELS,
        epochs=1,
        batch_size=2,
        lr=0.5,
        dp=True,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        randomness=SeededRandomness(3),
        backbone_lr_scale=1.0,
        hooks=TrainHooks(before_step=before_step),
    )
    assert result.steps == 3 and without_sample == set()
    after = trainable_state(model)
    assert list(after) == names and "head.weight" in trainable
    assert any(n.startswith("backbone.") for n in names)  # the mode trains inside the encoder
    assert frozen_state_fingerprint(model) == frozen
    assert [n for n in names if np.array_equal(before[n], after[n])] == []


# ---------------------------------------------------------------------------------------- fingerprints
def test_the_backbone_fingerprint_is_the_weights(bert, other_bert, tmp_path):
    import shutil

    copy = tmp_path / "copy-of-bert"
    shutil.copytree(bert, copy)
    a = backbone_fingerprint(run_model_name(f"hf:{bert}"))
    assert len(a) == 64 and a == backbone_fingerprint(run_model_name(f"hf:{copy}"))  # the same checkpoint
    assert a != backbone_fingerprint(run_model_name(f"hf:{other_bert}"))  # other weights, same shapes


def _site_reply(cfg: RunConfig, fingerprint: str, node_config: dict[str, str]) -> dict[str, object]:
    """What the site's ClientApp answers a train message carrying the coordinator's backbone fingerprint."""
    from privatune.client.app import train
    from privatune.common.protocol import KEY_BACKBONE_FINGERPRINT, RECORD_CONFIG, RECORD_STATUS
    from tests.helpers.messages import initial_state, make_context, make_message

    msg = make_message(cfg, initial_state(cfg))
    msg.content[RECORD_CONFIG][KEY_BACKBONE_FINGERPRINT] = fingerprint
    reply = train(msg, make_context(node_config))
    return dict(reply.content[RECORD_STATUS])


def test_a_site_whose_backbone_differs_is_refused_before_data_or_ledger(bert, other_bert, tmp_path):
    from privatune.common.protocol import KEY_REASON, KEY_STATUS, STATUS_DATA_ERROR, STATUS_REFUSED

    cfg = RunConfig(preset="sms-spam", model=f"hf:{bert}", mode="head").resolved()
    coordinator = backbone_fingerprint(cfg.model)
    ledger = tmp_path / "site.ledger.sqlite"
    node = {"site-id": "bank", "data-path": str(tmp_path / "no-such.csv"), "ledger-path": str(ledger)}

    wrong = _site_reply(cfg, coordinator, {**node, "model-path": str(other_bert)})
    assert wrong[KEY_STATUS] == STATUS_REFUSED
    assert "backbone weights differ" in str(wrong[KEY_REASON]) and "install the same checkpoint" in str(
        wrong[KEY_REASON]
    )
    assert str(other_bert) not in str(wrong[KEY_REASON])  # the site's paths stay at the site
    assert backbone_fingerprint(run_model_name(f"hf:{other_bert}"))[:16] not in str(wrong[KEY_REASON])
    assert not ledger.exists()  # refused before the ledger (or the data, which does not exist) is touched

    missing = _site_reply(cfg, coordinator, {**node, "model-path": str(tmp_path / "absent")})
    assert missing[KEY_STATUS] == STATUS_REFUSED and "does not load at this site" in str(missing[KEY_REASON])

    right = _site_reply(cfg, coordinator, {**node, "model-path": str(bert)})
    assert right[KEY_STATUS] == STATUS_DATA_ERROR  # the backbone matched: the site went on to its (absent) data


# ---------------------------------------------------------------------------------------- torch: backbones
BACKBONE_MODULE = """
import torch
from torch import nn


def small_cnn():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 4, 5, stride=3))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(4 * 8 * 8, 8))
    return net, 8


def wrong_size():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 5)), 8
"""


def test_an_image_backbone_function_from_a_site_folder(tmp_path):
    (tmp_path / "my_backbones.py").write_text(textwrap.dedent(BACKBONE_MODULE))
    name = relocate(run_model_name("torch:my_backbones:small_cnn"), tmp_path)
    spec = get_model_spec(name)
    assert spec.kind == "image" and spec.feature_dim == 8
    model = spec.build(10, 0)
    assert model.block_prefixes == ("backbone.conv.", "backbone.fc.")
    images = spec.encode(np.zeros((3, 28, 28), dtype=np.uint8))
    with torch.no_grad():
        assert tuple(model.eval()(*images).shape) == (3, 10)
    names = configure_trainable(model, FineTuning(mode="last-k", last_k=1))
    assert sorted(names) == ["backbone.fc.bias", "backbone.fc.weight", "head.bias", "head.weight"]

    with pytest.raises(BackboneImportError, match=r"returns \[2, 5\] for 2 images, not \[2, 8\]"):
        get_model_spec(relocate(run_model_name("torch:my_backbones:wrong_size"), tmp_path))
    with pytest.raises(BackboneImportError, match="has no function 'absent'"):
        get_model_spec(relocate(run_model_name("torch:my_backbones:absent"), tmp_path))
    with pytest.raises(BackboneImportError, match="cannot import module 'not_there'"):
        get_model_spec(run_model_name("torch:not_there:f"))


# ------------------------------------------------------------------------------------- a whole simulation
@pytest.mark.slow
def test_a_simulation_with_a_tiny_random_bert_the_test_saved(bert, tmp_path):
    from tests.test_sim_data import rows, write_csv

    data = write_csv(tmp_path / "reviews.csv", rows())
    out = tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("FLWR_HOME", None)
    env.pop("MPLCONFIGDIR", None)
    cmd = [sys.executable, "-m", "privatune.cli", "simulate", "--data", str(data), "--text-column", "review"]
    cmd += ["--label-column", "sentiment", "--clients", "2", "--rounds", "2", "--mode", "lora", "--out", str(out)]
    cmd += ["--run-config", f"model=hf:{bert} max-length=16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["dp"] and summary["rounds_completed"] == 2
    assert summary["model"] == f"hf:{bert}" and summary["mode"] == "lora"
    assert 0 < summary["max_client_epsilon"] <= summary["target_epsilon"] + 1e-6
    assert summary["test_accuracy"] is not None
