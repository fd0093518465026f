"""Layer-wise learning-rate decay and a mode's recommended hyperparameters as its defaults (torch-light)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from privatune.client.training import layer_lr_scales, param_groups
from privatune.common.config import MODEL_KINDS, PRESETS, RunConfig
from privatune.common.models import get_model_spec, recommended_hyperparameters

BLOCKS = ("backbone.layer.0.", "backbone.layer.1.", "backbone.layer.2.")
NAMES = [
    "backbone.emb.weight",
    "backbone.layer.0.w",
    "backbone.layer.1.w",
    "backbone.layer.2.w",
    "backbone.layer.2.b",
    "head.weight",
    "head.bias",
]


def test_without_decay_every_backbone_parameter_gets_the_backbone_scale():
    scales = layer_lr_scales(NAMES, BLOCKS, 0.1, 1.0)
    assert scales == {n: (1.0 if n.startswith("head.") else 0.1) for n in NAMES}


def test_decay_counts_depth_from_the_topmost_trainable_block():
    scales = layer_lr_scales(NAMES, BLOCKS, 0.1, 0.5)
    assert scales["head.weight"] == scales["head.bias"] == 1.0
    assert scales["backbone.layer.2.w"] == scales["backbone.layer.2.b"] == pytest.approx(0.1)
    assert scales["backbone.layer.1.w"] == pytest.approx(0.05)
    assert scales["backbone.layer.0.w"] == pytest.approx(0.025)
    assert scales["backbone.emb.weight"] == pytest.approx(0.0125)  # outside any block: below the first


def test_decay_starts_at_the_top_block_that_trains_and_sees_through_opacus_names():
    # last-k with k=2 on a 3-block model: block 1 is the top of what trains; names as Opacus' wrapper has them
    names = ["_module.backbone.layer.1.w", "_module.backbone.layer.2.w", "_module.head.weight"]
    scales = layer_lr_scales(names[:1] + names[2:], BLOCKS, 0.2, 0.5)
    assert scales == {"_module.backbone.layer.1.w": pytest.approx(0.2), "_module.head.weight": 1.0}
    scales = layer_lr_scales(names, BLOCKS, 0.2, 0.5)
    assert scales["_module.backbone.layer.2.w"] == pytest.approx(0.2)
    assert scales["_module.backbone.layer.1.w"] == pytest.approx(0.1)


def test_a_bare_head_is_the_head():
    assert layer_lr_scales(["weight", "bias"], BLOCKS, 0.1, 0.5) == {"weight": 1.0, "bias": 1.0}


def test_decay_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="layer-lr-decay"):
        layer_lr_scales(NAMES, BLOCKS, 0.1, 0.0)


def test_param_groups_give_each_parameter_its_rate_on_the_digits_cnn():
    model = get_model_spec("digits-cnn").build(10, 0)
    groups = param_groups(model, 1.0, 0.5, layer_lr_decay=0.5, block_prefixes=model.block_prefixes)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    by_name = {n: rate[id(p)] for n, p in model.named_parameters()}
    assert groups[0]["lr"] == 1.0 and by_name["head.weight"] == 1.0
    # blocks first to last: conv 0, 3, 6, fc 0; the top block at lr x 0.5, each below a further x 0.5
    for depth, prefix in enumerate(reversed(model.block_prefixes)):
        assert by_name[prefix + "weight"] == pytest.approx(0.5 * 0.5**depth), prefix
    optimizer = torch.optim.SGD(groups, lr=1.0)  # the groups are a valid optimiser setup, each parameter once
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_param_groups_without_decay_keep_the_two_groups():
    module = nn.Sequential()
    module.add_module("head", nn.Linear(2, 2))
    module.add_module("backbone", nn.Linear(2, 2))
    groups = param_groups(module, 2.0, 0.1)
    assert [g["lr"] for g in groups] == [2.0, pytest.approx(0.2)] and [len(g["params"]) for g in groups] == [2, 2]


# --- a mode's recommended hyperparameters ---------------------------------------------------------


def test_model_kinds_agree_with_the_registry():
    assert {name: get_model_spec(name).kind for name in MODEL_KINDS} == MODEL_KINDS
    assert {p.model for p in PRESETS.values()} <= set(MODEL_KINDS)


@pytest.mark.parametrize(("preset", "kind"), [("trec6", "text"), ("digits", "image")])
@pytest.mark.parametrize("mode", ["last-k", "lora", "full"])
def test_another_mode_takes_its_recommended_values(preset, kind, mode):
    cfg = RunConfig.create(preset=preset, mode=mode)
    want = recommended_hyperparameters(mode, kind)
    assert (cfg.lr, cfg.batch_size, cfg.local_epochs) == (want.lr, want.batch_size, want.local_epochs)
    assert RunConfig.from_flower(cfg.to_flower()) == cfg  # resolving again changes nothing


def test_values_the_run_gives_win_and_the_presets_mode_keeps_the_preset_values():
    cfg = RunConfig.create(preset="trec6", mode="lora", lr=0.3)
    want = recommended_hyperparameters("lora", "text")
    assert (cfg.lr, cfg.batch_size, cfg.local_epochs) == (0.3, want.batch_size, want.local_epochs)
    p = PRESETS["trec6"]
    cfg = RunConfig.create(preset="trec6", mode=p.mode)
    assert (cfg.lr, cfg.batch_size, cfg.local_epochs) == (p.lr, p.batch_size, p.local_epochs)


def test_partial_takes_last_k_defaults_and_own_models_their_kind():
    assert RunConfig.create(preset="trec6", mode="partial").lr == recommended_hyperparameters("last-k", "text").lr
    cfg = RunConfig.create(preset="trec6", model="torch:pkg.mod:fn", mode="lora")
    assert cfg.batch_size == recommended_hyperparameters("lora", "image").batch_size


def test_a_saved_model_says_its_fine_tuning_settings():
    from privatune.server.app import fine_tuning_metadata

    meta = fine_tuning_metadata(RunConfig.create(preset="trec6", mode="lora", lora_rank=4, lora_freeze_a=True))
    assert meta["lora-rank"] == "4" and meta["lora-freeze-a"] == "true" and meta["seed"] == "42"
    assert meta["lora-blocks"] == "every block"
    assert fine_tuning_metadata(RunConfig.create(preset="trec6", mode="lora", lora_blocks=2))["lora-blocks"] == "2"
    assert fine_tuning_metadata(RunConfig.create(preset="trec6", mode="last-k", last_k=2, layer_lr_decay=0.8)) == {
        "last-k": "2",
        "layer-lr-decay": "0.8",
    }
    assert fine_tuning_metadata(RunConfig.create(preset="trec6")) == {}


@pytest.mark.parametrize("name, dataset, max_length", [("trec6-lora", "trec6", 32), ("sms-spam-lora", "sms-spam", 48)])
def test_the_tuned_lora_presets_resolve_to_their_settings(name, dataset, max_length):
    cfg = RunConfig.create(preset=name)
    assert (cfg.mode, cfg.dataset, cfg.model, cfg.max_length) == ("lora", dataset, "minilm", max_length)
    assert (cfg.lr, cfg.batch_size, cfg.local_epochs, cfg.num_server_rounds) == (6.0, 128, 1, 10)
    assert cfg.private and cfg.label_names == RunConfig.create(preset=dataset).label_names
    assert RunConfig.create(preset=name, lr=1.0, batch_size=32).lr == 1.0  # every value stays overridable
    # lr 6 is for the clipped DP-SGD step; without DP the preset takes its no-DP rate (lr 6 diverged there) ...
    assert RunConfig.create(preset=name, dp=False).lr == PRESETS[name].lr_without_dp == 1.0
    # ... and a run that names its lr keeps it either way.
    assert RunConfig.create(preset=name, dp=False, lr=6.0).lr == 6.0
    assert RunConfig.create(preset="trec6", dp=False).lr == PRESETS["trec6"].lr  # presets tuned without this: lr
