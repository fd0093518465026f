"""Model registry, fine-tuning modes, trainable-state round trips and Opacus compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privatune.common import models as M

TEXTS = [
    "Free entry in a weekly prize draw, text WIN now",
    "Are we still meeting for lunch tomorrow?",
    "How far is the moon from the earth?",
    "Who wrote the novel War and Peace?",
    "URGENT! Your account has been selected for a cash reward",
    "ok see you later",
]


def mnist_like_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn 8x8 digits -> 28x28 MNIST-style: bilinear to 20x20, pad 4, [0, 1], MNIST normalisation."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(images, (4, 4, 4, 4)).clamp(0.0, 1.0)
    images = (images - M.MNIST_MEAN) / M.MNIST_STD
    return images.squeeze(1).numpy(), data.target.astype(np.int64)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return mnist_like_digits()


@pytest.fixture(scope="module")
def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return M.get_model_spec("minilm").encode(TEXTS, max_length=16)


# --- registry --------------------------------------------------------------------------------------


def test_registry_lists_both_models_with_their_specs():
    assert {"minilm", "digits-cnn"} <= set(M.MODELS)
    text, image = M.get_model_spec("minilm"), M.get_model_spec("digits-cnn")
    assert (text.kind, text.feature_dim, text.default_max_length) == ("text", 384, 64)
    assert (image.kind, image.feature_dim) == ("image", 256)


def test_unknown_model_error_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown model 'bert-huge'.*digits-cnn.*minilm"):
        M.get_model_spec("bert-huge")
    with pytest.raises(ValueError, match="no pretrained loader"):
        M.load_pretrained_cached("bert-huge")


def test_a_third_model_is_one_registration():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    def build(num_classes: int, seed: int) -> M.Classifier:
        torch.manual_seed(0)
        return M.Classifier(Tiny(), M.new_head(3, num_classes, seed), partial_prefixes=("backbone.block.",))

    spec = M.ModelSpec("tiny", "image", 3, "test model", build, lambda x, *, max_length=None: (torch.as_tensor(x),))
    M.register_model(spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            M.register_model(spec)
        model = M.get_model_spec("tiny").build(5, 1)
        assert model(torch.zeros(2, 4)).shape == (2, 5)
        assert M.configure_trainable(model, "partial") == [
            "backbone.block.weight",
            "backbone.block.bias",
            "head.weight",
            "head.bias",
        ]
    finally:
        M.MODELS.pop("tiny")


def test_partial_prefix_must_match_a_backbone_parameter():
    with pytest.raises(ValueError, match="matches no backbone parameter"):
        M.Classifier(nn.Linear(2, 2), nn.Linear(2, 2), partial_prefixes=("backbone.nope.",))


# --- building and modes -----------------------------------------------------------------------------


def test_builds_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = M.build_digits_cnn(4, seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = M.build_digits_cnn(4, seed=7)
    c = M.build_digits_cnn(4, seed=8)
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    assert not torch.equal(a.head.weight, c.head.weight)
    # every build gets its own backbone copy, and the cached template stays frozen
    assert a.backbone is not b.backbone
    assert all(not p.requires_grad for p in M.load_pretrained_cached("digits-cnn").backbone.parameters())
    assert a.training and all(p.requires_grad for p in a.parameters())


def test_digits_modes_give_the_right_trainable_sets():
    model = M.build_digits_cnn(3, seed=0)
    assert M.configure_trainable(model, "head") == ["head.weight", "head.bias"]
    assert M.configure_trainable(model, "partial") == [
        "backbone.fc_layers.0.weight",
        "backbone.fc_layers.0.bias",
        "head.weight",
        "head.bias",
    ]
    full = M.configure_trainable(model, "full")
    assert full == [n for n, _ in model.named_parameters()] and full[0] == "backbone.conv_layers.0.weight"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == full


def test_minilm_modes_give_the_right_trainable_sets():
    model = M.get_model_spec("minilm").build(2, 0)
    all_names = [n for n, _ in model.named_parameters()]
    assert M.configure_trainable(model, "head") == ["head.weight", "head.bias"]
    partial = M.configure_trainable(model, "partial")
    assert partial[-2:] == ["head.weight", "head.bias"]
    assert all(n.startswith("backbone.bert.encoder.layer.5.") for n in partial[:-2]) and len(partial) == 18
    assert partial == [n for n in all_names if n in set(partial)]  # named_parameters order
    assert M.configure_trainable(model, "full") == all_names
    assert not any("pooler" in n for n in all_names)  # unused pooler would break Opacus in full mode


def test_unknown_mode_is_rejected():
    model = M.build_digits_cnn(2, seed=0)
    for call in (lambda: M.configure_trainable(model, "adapter"), lambda: M.backbone_is_frozen("adapter")):
        with pytest.raises(ValueError, match=r"unknown fine-tuning mode 'adapter'.*head, last-k, lora, full"):
            call()
    assert M.backbone_is_frozen("head") and not M.backbone_is_frozen("partial") and not M.backbone_is_frozen("full")
    assert M.module_to_train(model, "head") is model.head and M.module_to_train(model, "full") is model


def test_init_head_from_pretrained_needs_ten_classes():
    with pytest.raises(ValueError, match="num_classes=10"):
        M.build_digits_cnn(3, seed=0, init_head_from_pretrained=True)
    with pytest.raises(ValueError, match="at least 2"):
        M.build_digits_cnn(1, seed=0)


# --- pretrained quality ------------------------------------------------------------------------------


def test_digits_cnn_keeps_its_mnist_skill(digits):
    images, labels = digits
    model = M.build_digits_cnn(10, seed=0, init_head_from_pretrained=True).eval()
    (x,) = M.get_model_spec("digits-cnn").encode(images)
    with torch.no_grad():
        accuracy = (model(x).argmax(1).numpy() == labels).mean()
    assert 0.75 <= accuracy <= 0.9, accuracy  # ~82 % measured: the transfer gap to sklearn digits
    # the same prediction through the feature path used in head mode
    feats = M.compute_features(model, (x[:64],), batch_size=16)
    with torch.no_grad():
        assert torch.allclose(model.head(feats), model(x[:64]), atol=1e-5)


def test_minilm_features_are_mean_pooled_and_deterministic(text_batch):
    model = M.get_model_spec("minilm").build(2, 0)
    ids, mask = text_batch
    assert ids.shape == mask.shape == (len(TEXTS), 16) and ids.dtype == torch.long
    assert model.training
    a = M.compute_features(model, text_batch, batch_size=4)
    b = M.compute_features(model, text_batch, batch_size=64)
    assert a.shape == (len(TEXTS), 384) and a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-5)  # eval mode: no dropout, batching does not matter
    assert model.training  # mode restored
    # padding must not change a sentence's feature: mean pooling honours the mask
    longer = M.encode_texts(TEXTS[:1], max_length=40)
    assert torch.allclose(M.compute_features(model, longer)[0], a[0], atol=1e-4)
    # similar meaning -> closer features
    sim = F.cosine_similarity(a[:, None], a[None], dim=-1)
    assert sim[0, 4] > sim[0, 3]  # two prize messages vs a prize message and a literature question


def test_encode_rejects_bad_inputs():
    with pytest.raises(TypeError, match="one string"):
        M.encode_texts("just one")
    with pytest.raises(TypeError, match="text record 1"):
        M.encode_texts(["ok", 3])
    with pytest.raises(ValueError, match="max_length"):
        M.encode_texts(["ok"], max_length=1000)
    ids, _mask = M.encode_texts([], max_length=8)
    assert ids.shape == (0, 8)
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        M.encode_images(np.zeros((3, 8, 8)))
    (x,) = M.encode_images(np.zeros((3, 1, 28, 28), dtype=np.float64))
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32


# --- trainable state ---------------------------------------------------------------------------------


def test_trainable_state_round_trip():
    src = M.build_digits_cnn(3, seed=1)
    dst = M.build_digits_cnn(3, seed=2)
    for mode in M.FINE_TUNING_MODES:
        names = M.configure_trainable(src, mode)
        assert M.configure_trainable(dst, mode) == names
        state = M.trainable_state(src)
        assert list(state) == names and all(v.dtype == np.float32 for v in state.values())
        M.load_trainable_state(dst, state)
        assert all(np.array_equal(v, M.trainable_state(dst)[k]) for k, v in state.items())
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(src.eval()(x), dst.eval()(x))
    # the export is a copy, not a view of the live weights
    state = M.trainable_state(src)
    state["head.bias"][:] = 99.0
    assert not torch.any(src.head.bias == 99.0)


def test_load_trainable_state_is_strict():
    model = M.build_digits_cnn(3, seed=0)
    M.configure_trainable(model, "partial")
    good = M.trainable_state(model)
    before = M.trainable_state(model)
    bad_shape = dict(good, **{"head.weight": np.zeros((4, 256), np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatch for head\.weight: got \[4, 256\].*\[3, 256\]"):
        M.load_trainable_state(model, bad_shape)
    missing = {k: v for k, v in good.items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"missing \['head\.bias'\]"):
        M.load_trainable_state(model, missing)
    extra = dict(good, **{"backbone.conv_layers.0.weight": np.zeros((32, 1, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected \['backbone\.conv_layers\.0\.weight'\]"):
        M.load_trainable_state(model, extra)
    nan = dict(good, **{"head.bias": np.full(3, np.nan, np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        M.load_trainable_state(model, nan)
    # a failed load changes nothing, not even the parameters checked before the bad one
    bad_late = dict(
        good,
        **{
            "backbone.fc_layers.0.weight": good["backbone.fc_layers.0.weight"] + 1,
            "head.bias": np.zeros(7, np.float32),
        },
    )
    with pytest.raises(ValueError, match=r"head.bias"):
        M.load_trainable_state(model, bad_late)
    assert all(np.array_equal(before[k], v) for k, v in M.trainable_state(model).items())


def test_trainable_fingerprint_tracks_names_and_shapes():
    model = M.build_digits_cnn(3, seed=0)
    M.configure_trainable(model, "partial")
    listed = M.trainable_fingerprint(M.trainable_names_and_shapes(model))
    assert listed == M.trainable_fingerprint(M.trainable_state(model))
    assert len(listed) == 64
    M.configure_trainable(model, "head")
    assert M.trainable_fingerprint(M.trainable_names_and_shapes(model)) != listed
    other = M.build_digits_cnn(4, seed=0)
    M.configure_trainable(other, "partial")
    assert M.trainable_fingerprint(M.trainable_names_and_shapes(other)) != listed  # head shape differs


@pytest.mark.parametrize("name", ["digits-cnn", "minilm"])
@pytest.mark.parametrize("mode", ["head", "partial"])
def test_frozen_weights_never_change_in_a_training_step(name, mode, digits, text_batch):
    spec = M.get_model_spec(name)
    model = spec.build(3, 0)
    M.configure_trainable(model, mode)
    frozen = M.frozen_state_fingerprint(model)
    trained = M.trainable_state(model)
    inputs = text_batch if name == "minilm" else spec.encode(digits[0][:6])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(*inputs), labels).backward()
        opt.step()
    assert M.frozen_state_fingerprint(model) == frozen
    after = M.trainable_state(model)
    assert all(not np.array_equal(trained[k], after[k]) for k in ("head.weight", "head.bias"))
    if mode == "partial":
        assert any(not np.array_equal(trained[k], after[k]) for k in trained if k.startswith("backbone."))
    M.configure_trainable(model, "full")
    assert M.frozen_state_fingerprint(model) != frozen  # nothing frozen any more: a different fingerprint


# --- Opacus ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits-cnn", "minilm"])
@pytest.mark.parametrize("mode", M.FINE_TUNING_MODES)
def test_every_mode_passes_the_opacus_validator(name, mode):
    model = M.get_model_spec(name).build(3, 0)
    M.configure_trainable(model, mode)
    assert ModuleValidator.validate(M.module_to_train(model, mode), strict=False) == []


_OPACUS_NOISE = (
    "ignore:Secure RNG turned off:UserWarning",
    # token ids do not require grad; Opacus' hooks still get the grads they need from module outputs
    "ignore:Full backward hook is firing:UserWarning",
)


def _dp_step(model: M.Classifier, mode: str, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> None:
    """One real Opacus DP-SGD step; asserts trainable weights moved and frozen ones did not."""
    M.configure_trainable(model, mode)
    if M.backbone_is_frozen(mode):
        inputs = (M.compute_features(model, inputs),)
    frozen = M.frozen_state_fingerprint(model)
    before = M.trainable_state(model)
    module = M.module_to_train(model, mode)
    loader = DataLoader(TensorDataset(*inputs, labels), batch_size=len(labels))
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    private.train()
    for *batch, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(private(*batch), y).backward()
        optimizer.step()
    assert engine.get_epsilon(delta=1e-5) > 0
    if not M.backbone_is_frozen(mode):  # the helpers see through Opacus' wrapper
        assert list(M.trainable_state(private)) == list(before)
    assert M.frozen_state_fingerprint(model) == frozen
    after = M.trainable_state(model)
    assert list(after) == list(before)
    assert all(not np.array_equal(before[k], after[k]) for k in after)  # noise moves every trainable tensor


@pytest.mark.filterwarnings(*_OPACUS_NOISE)
@pytest.mark.parametrize("mode", M.FINE_TUNING_MODES)
def test_dp_step_runs_for_digits_cnn(mode, digits):
    images, labels = digits
    _dp_step(M.build_digits_cnn(10, 0), mode, M.encode_images(images[:8]), torch.from_numpy(labels[:8]))


@pytest.mark.filterwarnings(*_OPACUS_NOISE)
@pytest.mark.parametrize(
    "mode",
    # full mode: per-sample gradients of the 30522x384 embedding table, ~47 MB per example (2-10 s here)
    ["head", "partial", pytest.param("full", marks=pytest.mark.slow)],
)
def test_dp_step_runs_for_minilm(mode, text_batch):
    _dp_step(M.get_model_spec("minilm").build(2, 0), mode, text_batch, torch.tensor([1, 0, 0, 0, 1, 0]))


@pytest.mark.filterwarnings(*_OPACUS_NOISE)
def test_opacus_per_sample_gradients_are_exact_for_minilm_full():
    """Per-sample grads (embeddings with per-example position ids included) equal one-example backprops."""

    def without_dropout(model: M.Classifier) -> M.Classifier:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model.train()  # Opacus records activations only in train mode

    texts, labels = ["hello there friend", "what is the capital of France and why"], torch.tensor([0, 1])
    ids, mask = M.encode_texts(texts, max_length=8)
    model = without_dropout(M.build_minilm(2, 0))
    M.configure_trainable(model, "full")
    F.cross_entropy(GradSampleModule(model, loss_reduction="sum")(ids, mask), labels, reduction="sum").backward()
    per_sample = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
    single = without_dropout(M.build_minilm(2, 0))
    single.load_state_dict(model.state_dict())
    for i in range(len(texts)):
        single.zero_grad(set_to_none=True)
        F.cross_entropy(single(ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1], reduction="sum").backward()
        for name, param in single.named_parameters():
            # atol: attention key biases have a zero true gradient (softmax shift invariance), ~1e-9 noise
            assert torch.allclose(per_sample[name][i], param.grad, rtol=1e-3, atol=1e-6), name
