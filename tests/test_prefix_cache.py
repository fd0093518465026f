"""The frozen-prefix cache of ``last-k`` (common/models/prefix.py, common/prefix_cache.py): the trained blocks +
head on the cached prefix's outputs compute what the whole model computes (eval mode, and train mode since the
frozen blocks stay in eval mode), the entry is cached on disk keyed like the feature cache, and the one
transformers internal it needs still behaves as the split assumes."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from privatune.common.datasets import LabelledData
from privatune.common.models import FineTuning, build_digits_cnn, configure_trainable, get_model_spec
from privatune.common.models.names import run_model_name
from privatune.common.models.prefix import (
    SuffixModule,
    bert_layer_mask,
    frozen_prefix_modules,
    frozen_split,
    prefix_outputs,
)
from privatune.common.prefix_cache import cached_prefix_outputs, clear_prefix_cache, prefix_path
from tests.test_own_model import TEXTS, save_tiny_encoder

MORE_TEXTS = [*TEXTS, "a", "who is the film good or bad later", "moon"]  # lengths from 3 to 11 tokens


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("models") / "tiny-bert", seed=0)


def _bert_model(folder: Path, pooling: str = "mean", k: int = 1) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    spec = get_model_spec(run_model_name(f"hf:{folder}", pooling))
    model = spec.build(3, 0)
    configure_trainable(model, FineTuning(mode="last-k", last_k=k))
    return model, spec.encode(MORE_TEXTS, max_length=16)


def _split_logits(model: nn.Module, encoded: tuple[torch.Tensor, ...], train: bool) -> torch.Tensor:
    split = frozen_split(model)
    assert split is not None
    suffix = SuffixModule(split).train(train)
    return suffix(*prefix_outputs(split, encoded, batch_size=4))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_bert_split_gives_the_whole_models_logits(bert, pooling):
    model, encoded = _bert_model(bert, pooling)
    split = frozen_split(model)
    assert split is not None and split.start == 1  # 2 blocks, last-k=1: embeddings + block 0 are the prefix
    with torch.no_grad():
        whole = model.eval()(*encoded)
        cut = _split_logits(model, encoded, train=False)
    assert whole.shape == cut.shape == (len(MORE_TEXTS), 3)
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_digits_cnn_split_gives_the_whole_models_logits(k):
    model = build_digits_cnn(4, 0)
    configure_trainable(model, FineTuning(mode="last-k", last_k=k))
    images = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    split = frozen_split(model)
    assert split is not None and split.start == 4 - k
    with torch.no_grad():
        whole = model.eval()(images)
        cut = _split_logits(model, (images,), train=False)
        cut_train = _split_logits(model, (images,), train=True)  # no dropout in the CNN: train mode is the same
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cut_train, whole, rtol=1e-5, atol=1e-6)


def test_frozen_blocks_stay_in_eval_mode_while_the_model_trains(bert):
    """Dropout: the frozen prefix runs without it (as when it runs once per record), the trained blocks with it.

    With the trained block's dropout set to 0, the whole model in train mode must equal the split; calling
    nn.Module.train directly (frozen blocks in train mode, main's behaviour before the cache) must not."""
    model, encoded = _bert_model(bert)
    model.train()
    prefix = frozen_prefix_modules(model)
    assert prefix and all(not m.training for p in prefix for m in p.modules())
    trained = model.backbone.model.encoder.layer[1]
    assert all(m.training for m in trained.modules()) and model.head.training
    for m in trained.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        torch.manual_seed(0)
        whole = model(*encoded)
        torch.manual_seed(0)
        cut = _split_logits(model, encoded, train=True)
        nn.Module.train(model)  # every module in train mode: the frozen blocks' dropout (0.1) is on
        torch.manual_seed(0)
        dropped = model(*encoded)
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dropped, whole, atol=1e-4)


def test_no_split_where_the_stem_trains_or_lora_adapts_the_first_block(bert):
    model, _ = _bert_model(bert)
    configure_trainable(model, FineTuning(mode="full"))
    assert frozen_split(model) is None and frozen_prefix_modules(model) == []
    lora = get_model_spec(run_model_name(f"hf:{bert}", "mean")).build(3, 0)
    configure_trainable(lora, FineTuning(mode="lora", lora_rank=2, lora_targets=("query", "value")))
    assert frozen_split(lora) is None  # adapters in block 0: nothing below them to cache
    cnn = build_digits_cnn(2, 0)
    configure_trainable(cnn, FineTuning(mode="lora", lora_rank=2))  # the CNN's default target: fc_layers.0
    split = frozen_split(cnn)
    assert split is not None and split.start == 3  # its last block: the conv layers are the frozen prefix


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_lora_in_the_last_block_splits_and_gives_the_whole_models_logits(bert, pooling):
    model = get_model_spec(run_model_name(f"hf:{bert}", pooling)).build(3, 0)
    names = configure_trainable(model, FineTuning(mode="lora", lora_rank=2, lora_blocks=1, lora_targets=("query",)))
    adapted = sorted({n.split(".lora_")[0] for n in names if ".lora_" in n})
    assert adapted == ["backbone.model.encoder.layer.1.attention.self.query"]
    with torch.no_grad():  # B starts at zero: move it so the adapter changes the output
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    encoded = get_model_spec(run_model_name(f"hf:{bert}", pooling)).encode(MORE_TEXTS, max_length=16)
    split = frozen_split(model)
    assert split is not None and split.start == 1
    with torch.no_grad():
        whole = model.eval()(*encoded)
        cut = _split_logits(model, encoded, train=False)
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)


def test_lora_blocks_errors_name_the_key(bert):
    model = get_model_spec(run_model_name(f"hf:{bert}", "mean")).build(3, 0)
    with pytest.raises(ValueError, match=r"lora-blocks: this model has 2 blocks, got lora-blocks=3"):
        configure_trainable(model, FineTuning(mode="lora", lora_blocks=3))
    with pytest.raises(ValueError, match=r"lora-blocks: no module named nowhere in the last 1 block"):
        configure_trainable(model, FineTuning(mode="lora", lora_blocks=1, lora_targets=("nowhere",)))
    with pytest.raises(ValueError, match=r"lora-blocks must be >= 0"):
        FineTuning(mode="lora", lora_blocks=-1)


def test_the_attention_mask_builder_is_what_bert_model_uses(bert):
    """transformers internal (5.24): bert_layer_mask must equal BertModel's own mask for a padded batch. If this
    fails after a transformers upgrade, update bert_layer_mask (common/models/prefix.py) to the new API."""
    model, encoded = _bert_model(bert)
    hf = model.backbone.model
    ids, mask = encoded
    hidden = hf.embeddings(input_ids=ids)
    ours = bert_layer_mask(hf, hidden, mask)
    theirs = hf._create_attention_masks(
        attention_mask=mask,
        encoder_attention_mask=None,
        embedding_output=hidden,
        encoder_hidden_states=None,
        cache=None,
    )[0]
    assert ours is not None and theirs is not None and torch.equal(ours, theirs)


# -------------------------------------------------------------------------------------------- the cache
def _data() -> LabelledData:
    labels = np.array([i % 3 for i in range(len(MORE_TEXTS))])
    return LabelledData("tiny", "text", list(MORE_TEXTS), labels, ("a", "b", "c"))


def test_prefix_outputs_are_cached_on_disk_and_reused(bert, tmp_path, monkeypatch, caplog):
    model, _ = _bert_model(bert)
    split = frozen_split(model)
    assert split is not None
    name = run_model_name(f"hf:{bert}")
    clear_prefix_cache()
    hidden, mask = cached_prefix_outputs(split, name, _data(), 16, tmp_path / "cache")
    files = list((tmp_path / "cache").glob("prefix-*.npz"))
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert hidden.shape[:2] == mask.shape and hidden.shape[0] == len(MORE_TEXTS)
    assert mask.shape[1] == int(mask.sum(dim=1).max())  # stored trimmed to the longest record

    import privatune.common.prefix_cache as pc

    clear_prefix_cache()
    monkeypatch.setattr(pc, "prefix_outputs", lambda *a, **k: pytest.fail("recomputed despite the disk entry"))
    again = cached_prefix_outputs(split, name, _data(), 16, tmp_path / "cache")
    assert torch.equal(again[0], hidden) and torch.equal(again[1], mask)
    monkeypatch.undo()

    # A damaged file is recomputed, with a warning; a changed prefix is another entry.
    files[0].write_bytes(b"not a zip")
    clear_prefix_cache()
    with caplog.at_level(logging.WARNING, logger="privatune.cache"):
        fresh = cached_prefix_outputs(split, name, _data(), 16, tmp_path / "cache")
    assert "unreadable" in caplog.text and torch.equal(fresh[0], hidden)
    with torch.no_grad():
        model.backbone.model.encoder.layer[0].output.dense.bias.add_(1.0)
    changed = cached_prefix_outputs(split, name, _data(), 16, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("prefix-*.npz"))) == 2 and not torch.allclose(changed[0], hidden)
    assert prefix_path(tmp_path / "cache", "x").name == "prefix-x.npz"
    clear_prefix_cache()


def test_a_site_round_trains_the_suffix_unless_images_change_per_step(tmp_path):
    from types import SimpleNamespace

    from privatune.client.round import module_and_inputs

    model = build_digits_cnn(2, 0)
    configure_trainable(model, FineTuning(mode="last-k", last_k=1))
    images = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(2)).numpy()
    data = LabelledData("imgs", "image", images, np.array([0, 1, 0, 1, 0]), ("a", "b"))
    run = SimpleNamespace(
        cfg=SimpleNamespace(mode="last-k", model="digits-cnn", max_length=None),
        model=model,
        site=SimpleNamespace(cache_dir=tmp_path),
    )
    clear_prefix_cache()
    module, inputs = module_and_inputs(run, data)  # type: ignore[arg-type]
    assert isinstance(module, SuffixModule) and [tuple(t.shape) for t in inputs] == [(5, 128 * 3 * 3)]
    assert list(tmp_path.glob("prefix-*.npz"))
    module, inputs = module_and_inputs(run, data, per_step_inputs=True)  # type: ignore[arg-type]
    assert module is model and [tuple(t.shape) for t in inputs] == [(5, 1, 28, 28)]
    clear_prefix_cache()
