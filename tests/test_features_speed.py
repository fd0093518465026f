"""The default simulation's shortcuts change no figure: a copy of the pretrained backbone is fingerprinted as the
hash would, without hashing it every round; a changed one still misses."""

from __future__ import annotations

import copy

import pytest
import torch

from privatune.common import features as F
from privatune.common.cache import weights_fingerprint
from privatune.common.models import get_model_spec, load_pretrained_cached


@pytest.fixture(autouse=True)
def fresh_memory():
    F.clear_memory_cache()
    yield
    F.clear_memory_cache()


def test_a_copy_of_the_pretrained_backbone_has_the_hash_of_its_weights_without_hashing(monkeypatch):
    model = get_model_spec("digits-cnn").build(10, 0)
    expected = weights_fingerprint(model.backbone)
    assert F.backbone_weights_fingerprint(model.backbone, "digits-cnn") == expected  # hashes the template once
    calls = []
    monkeypatch.setattr(F, "weights_fingerprint", lambda m: calls.append(m) or "hashed")
    again = get_model_spec("digits-cnn").build(3, 7)  # another build: another copy, another head
    assert F.backbone_weights_fingerprint(again.backbone, "digits-cnn") == expected
    assert calls == []


def test_a_changed_backbone_is_hashed_and_misses():
    template = load_pretrained_cached("digits-cnn").backbone
    model = get_model_spec("digits-cnn").build(10, 0)
    base = F.backbone_weights_fingerprint(model.backbone, "digits-cnn")
    for change in (
        lambda b: b.fc_layers[0].bias.add_(1e-6),  # one weight, by a rounding's worth
        lambda b: b.fc_layers[0].weight.view(-1)[0].mul_(-1.0),  # one sign
    ):
        changed = copy.deepcopy(model.backbone)
        with torch.no_grad():
            change(changed)
        got = F.backbone_weights_fingerprint(changed, "digits-cnn")
        assert got == weights_fingerprint(changed) and got != base
    assert F.backbone_weights_fingerprint(model.backbone, "digits-cnn") == weights_fingerprint(template)


def test_negative_zero_is_another_weight():
    """The comparison is of bytes, like the hash: -0.0 == 0.0 as floats but hashes differently."""
    model = get_model_spec("digits-cnn").build(10, 0)
    changed = copy.deepcopy(model.backbone)
    with torch.no_grad():
        changed.fc_layers[0].bias[0] = 0.0
    zero = F.backbone_weights_fingerprint(changed, "digits-cnn")
    with torch.no_grad():
        changed.fc_layers[0].bias[0] = -0.0
    assert F.backbone_weights_fingerprint(changed, "digits-cnn") == weights_fingerprint(changed) != zero
