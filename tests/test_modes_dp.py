"""Every fine-tuning mode is correct under DP-SGD (Opacus issue 820: LoRA weights that never moved while the loss
fell and an epsilon was reported): each trainable weight gets a per-sample gradient and moves, each frozen one
stays bit-identical, FFA-LoRA's A never trains, and what travels is exactly the trainable set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privatune.client.randomness import SeededRandomness
from privatune.client.training import TrainHooks, train_local
from privatune.common.models import (
    FineTuning,
    build_digits_cnn,
    build_minilm,
    configure_trainable,
    encode_texts,
    frozen_state_fingerprint,
    trainable_fingerprint,
    trainable_names_and_shapes,
    trainable_state,
)
from privatune.common.models.lora import is_lora_a
from privatune.common.models.prefix import SuffixModule, frozen_split, prefix_outputs

TEXTS = ["win a prize now", "lunch tomorrow?", "how far is the moon", "who wrote it", "cash reward", "ok later"]
LABELS = torch.tensor([1, 0, 0, 0, 1, 0])

MODES = {
    "last-k-1": FineTuning(mode="last-k", last_k=1),
    "last-k-2": FineTuning(mode="last-k", last_k=2),
    "lora": FineTuning(mode="lora", lora_rank=2),
    "lora-ffa": FineTuning(mode="lora", lora_rank=2, lora_freeze_a=True),
    "lora-blocks-1": FineTuning(mode="lora", lora_rank=2, lora_blocks=1),
    "lora-blocks-2-ffa": FineTuning(mode="lora", lora_rank=2, lora_blocks=2, lora_freeze_a=True),
    "full": FineTuning(mode="full"),
}


def _inputs(name: str) -> tuple[torch.Tensor, ...]:
    if name == "minilm":
        return encode_texts(TEXTS, max_length=8)
    return (torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)),)


def _train(name: str, settings: FineTuning, dp: bool, prefix: bool = False, ghost: bool = False) -> None:
    """``prefix``: train as a site does in last-k, the trained blocks + head (SuffixModule) on the frozen
    prefix's outputs (common/models/prefix.py), not the whole model. ``ghost``: Opacus' ghost clipping (no
    ``p.grad_sample`` to inspect: the moved and bit-identical checks remain)."""
    model = build_minilm(2, 0) if name == "minilm" else build_digits_cnn(2, 0)
    names = configure_trainable(model, settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names) and "head.weight" in trainable
    frozen = frozen_state_fingerprint(model)
    module: torch.nn.Module = model
    inputs = _inputs(name)
    if prefix:
        split = frozen_split(model)
        trained_blocks = settings.lora_blocks if settings.mode == "lora" else settings.last_k
        assert split is not None and split.start == len(model.block_prefixes) - trained_blocks
        module, inputs = SuffixModule(split), prefix_outputs(split, inputs)
        assert {n for n, p in module.named_parameters() if p.requires_grad} == trainable
    before = trainable_state(model)
    seen: list[set[str]] = []

    def before_step(step: int, module: torch.nn.Module, optimizer: object) -> None:
        got = set()
        for n, p in module.named_parameters():
            bare = n.removeprefix("_module.")
            sample = getattr(p, "grad_sample", None)
            if bare in trainable:
                assert sample is not None, f"{bare}: no per-sample gradient"
                assert tuple(sample.shape[1:]) == tuple(p.shape) and sample.shape[0] >= 0, bare
                got.add(bare)
            else:
                assert sample is None and p.grad is None, f"frozen {bare} got a gradient"
        seen.append(got)

    result = train_local(
        module,
        inputs,
        LABELS,
        epochs=1,
        batch_size=2,
        lr=0.5,
        dp=dp,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        randomness=SeededRandomness(7),
        backbone_lr_scale=1.0,
        hooks=TrainHooks(before_step=before_step) if dp and not ghost else None,
        ghost_clipping=ghost,
        closed_form_linear=not ghost,  # ghost: Opacus' ghost clipping, not the CNN's default book-keeping path
    )
    assert result.steps == 3
    # DP: the CNN's Linear/Conv2d stack by book-keeping (client/bookkeeping_dp.py), MiniLM through Opacus' hooks
    default = "bookkeeping" if name == "digits-cnn" else "hooks"
    assert result.grad_sample_mode == ("ghost" if ghost else default if dp else "")
    if dp and not ghost:
        assert seen and all(got == trainable for got in seen)
        assert result.mechanism.noise_multiplier == 1.0
    after = trainable_state(model)
    assert list(after) == names  # what travels is exactly the trainable set, in order
    assert frozen_state_fingerprint(model) == frozen  # frozen weights bit-identical
    unmoved = [n for n in names if np.array_equal(before[n], after[n])]
    if not dp and settings.mode == "lora" and not settings.lora_freeze_a:
        # without noise A can move only once B has: B starts at zero, so A's first gradients are zero
        unmoved = [n for n in unmoved if not is_lora_a(n)]
    assert unmoved == [], f"trainable weights that never moved: {unmoved[:5]}"
    if settings.lora_freeze_a:
        assert not any(is_lora_a(n) for n in names)
        assert any(is_lora_a(n) for n, _ in model.named_parameters())


FAST_TEXT = ["last-k-1", "last-k-2", "lora", "lora-ffa", "lora-blocks-1"]


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
@pytest.mark.parametrize("mode", [*FAST_TEXT, pytest.param("full", marks=pytest.mark.slow)])
def test_minilm_modes_train_what_they_should(mode, dp):
    _train("minilm", MODES[mode], dp)


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
@pytest.mark.parametrize("mode", list(MODES))
def test_digits_cnn_modes_train_what_they_should(mode, dp):
    _train("digits-cnn", MODES[mode], dp)


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
@pytest.mark.parametrize("mode", ["last-k-1", "last-k-2"])
@pytest.mark.parametrize("name", ["minilm", "digits-cnn"])
def test_last_k_on_the_cached_prefix_trains_what_it_should(name, mode, dp):
    _train(name, MODES[mode], dp, prefix=True)


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
@pytest.mark.parametrize("name", ["minilm", "digits-cnn"])
def test_lora_in_the_last_blocks_on_the_cached_prefix_trains_what_it_should(name, dp):
    """lora-blocks: the adapters sit in the last blocks only, so a site trains them on the cached prefix."""
    _train(name, MODES["lora-blocks-1"], dp, prefix=True)
    if name == "minilm":
        _train(name, MODES["lora-blocks-2-ffa"], dp, prefix=True)


@pytest.mark.parametrize("name", ["minilm", "digits-cnn"])
def test_last_k_on_the_cached_prefix_under_ghost_clipping(name):
    _train(name, MODES["last-k-2"], dp=True, prefix=True, ghost=True)


@pytest.mark.parametrize("freeze_a", [False, True])
def test_server_and_site_build_identical_lora_adapters(freeze_a):
    def build(seed: int) -> torch.nn.Module:
        model = build_digits_cnn(2, 0)
        configure_trainable(model, FineTuning(mode="lora", lora_rank=4, lora_freeze_a=freeze_a, seed=seed))
        return model

    def a_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if is_lora_a(n)}

    server, site, other = build(3), build(3), build(4)
    assert trainable_fingerprint(trainable_names_and_shapes(server)) == trainable_fingerprint(
        trainable_names_and_shapes(site)
    )
    same, diff = a_values(server), a_values(other)
    assert same and all(torch.equal(same[n], v) for n, v in a_values(site).items())
    assert all(not torch.equal(same[n], v) for n, v in diff.items())
    assert frozen_state_fingerprint(server) == frozen_state_fingerprint(site)
    if freeze_a:  # the frozen A never travels, so both sides must derive it: the fingerprints say they do
        assert frozen_state_fingerprint(server) != frozen_state_fingerprint(other)
