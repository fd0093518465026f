"""The ClientApp end to end on one message: what travels, what is recorded, what stays frozen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privatune.client.app import train
from privatune.client.randomness import SiteRandomness
from privatune.client.training import train_local
from privatune.common.ledger import SiteLedger
from privatune.common.models import configure_trainable, frozen_state_fingerprint, get_model_spec
from tests.helpers.messages import digits_config, initial_state


def _digits_cfg(tmp_path, **kw):
    return digits_config(tmp_path, **{"num_server_rounds": 2, **kw})


@pytest.mark.parametrize("mode", ["head", "partial"])
def test_only_trainable_weights_travel_and_spend_is_recorded(tmp_path, message_factory, context_factory, mode):
    cfg = _digits_cfg(tmp_path, mode=mode)
    state = initial_state(cfg)
    reply = train(message_factory(cfg, state), context_factory({"partition-id": 0, "num-partitions": 3}))
    content = reply.content
    assert content["status"]["status"] == "trained"
    sent = {k: v.numpy() for k, v in content["arrays"].items()}
    # Exactly the trainable set travels back: no frozen backbone weight is in the message.
    assert set(sent) == set(state)
    if mode == "head":
        assert all(k.startswith("head.") for k in sent)
    assert any(not np.array_equal(sent[k], state[k]) for k in state), "training changed nothing"
    metrics = content["metrics"]
    assert 0 < metrics["epsilon"] <= cfg.target_epsilon
    # Write-ahead: the spend is in the site's ledger with the mechanism the reply reports.
    ledger = SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite")
    (record,) = ledger.entries()
    entry = record.entry
    assert entry.noise_multiplier == pytest.approx(metrics["noise-multiplier"])
    assert entry.steps == metrics["steps"]
    assert entry.epsilon_run == pytest.approx(metrics["epsilon"])


def test_frozen_weights_are_bit_identical_after_dp_training():
    spec = get_model_spec("digits-cnn")
    model = spec.build(10, 0)
    configure_trainable(model, "partial")
    before = frozen_state_fingerprint(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    res = train_local(
        model,
        (x,),
        y,
        epochs=2,
        batch_size=16,
        lr=0.1,
        dp=True,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        randomness=SiteRandomness(),
    )
    assert res.steps == 2 * 4
    assert frozen_state_fingerprint(model) == before
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), n


def test_second_round_composes_with_the_first(tmp_path, message_factory, context_factory):
    cfg = _digits_cfg(tmp_path)
    state = initial_state(cfg)
    ctx = context_factory({"partition-id": 1, "num-partitions": 3})
    r1 = train(message_factory(cfg, state, server_round=1), ctx).content["metrics"]
    r2 = train(message_factory(cfg, state, server_round=2), ctx).content["metrics"]
    assert r2["epsilon"] > r1["epsilon"]
    # Calibrated over the whole run: the last planned round lands on the target, not above it.
    assert r2["epsilon"] == pytest.approx(cfg.target_epsilon, rel=0.02)
    assert r2["epsilon"] <= cfg.target_epsilon * 1.01


def test_budget_exhausted_site_does_not_train(tmp_path, message_factory, context_factory):
    cfg = _digits_cfg(tmp_path)
    state = initial_state(cfg)
    data = tmp_path / "site.csv"
    ctx = context_factory({"partition-id": 2, "num-partitions": 3, "max-epsilon": 2.0})
    reply = train(message_factory(cfg, state), ctx).content
    assert reply["status"]["status"] == "budget-exhausted"
    assert "max-epsilon" in reply["status"]["reason"]
    assert "arrays" not in reply
    assert not data.exists()
    ledger = SiteLedger(tmp_path / "ledgers" / "site-client-2.ledger.sqlite")
    assert ledger.entries() == []


def test_non_private_round_is_recorded_as_an_infinite_spend(tmp_path, message_factory, context_factory):
    import math

    from privatune.common.ledger import ServerLedger

    cfg = _digits_cfg(tmp_path, dp=False, batch_size=500)  # a batch larger than the client's data
    reply = train(message_factory(cfg, initial_state(cfg)), context_factory({"partition-id": 0, "num-partitions": 3}))
    m = reply.content["metrics"]
    assert reply.content["status"]["status"] == "trained"
    assert math.isinf(m["epsilon"]) and m["noise-multiplier"] == 0.0 and m["sample-rate"] == 1.0
    (record,) = SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite").entries()
    assert math.isinf(record.entry.epsilon_run)
    # The server can record what this client reported.
    ServerLedger(tmp_path / "server.ledger.sqlite").record_report(
        "r",
        1,
        "client-0",
        1,
        status="trained",
        noise_multiplier=m["noise-multiplier"],
        sample_rate=m["sample-rate"],
        steps=int(m["steps"]),
        max_grad_norm=m["max-grad-norm"],
        delta=1e-5,
        accountant="rdp",
        epsilon_reported=m["epsilon"],
    )


# ---------------------------------------------------------------------------------------------------------------
# Where the noise comes from, and when the spend is written


def _twice(tmp_path, message_factory, context_factory, **kw):
    """The same train message, twice, to the same simulated site: (update 1, update 2, replies, ledger rows)."""
    cfg = _digits_cfg(tmp_path, **kw)
    state = initial_state(cfg)
    ctx = context_factory({"partition-id": 0, "num-partitions": 3})
    replies = [train(message_factory(cfg, state, server_round=1), ctx).content for _ in range(2)]
    updates = [{k: v.numpy() for k, v in r["arrays"].items()} for r in replies]
    rows = SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite").entries()
    return updates, replies, rows


def test_identical_messages_get_different_noise_by_default(tmp_path, message_factory, context_factory):
    (u1, u2), replies, rows = _twice(tmp_path, message_factory, context_factory)
    assert all(not np.array_equal(u1[k], u2[k]) for k in u1), "the site's noise repeated: it is predictable"
    assert [r["status"]["noise-source"] for r in replies] == ["site-csprng"] * 2
    assert [rec.entry.noise_source for rec in rows] == ["site-csprng"] * 2


def test_identical_messages_repeat_only_with_reproducible_noise(tmp_path, message_factory, context_factory):
    (u1, u2), replies, rows = _twice(tmp_path, message_factory, context_factory, reproducible_noise=True)
    assert all(np.array_equal(u1[k], u2[k]) for k in u1)
    assert [r["status"]["noise-source"] for r in replies] == ["seeded"] * 2
    assert [rec.entry.noise_source for rec in rows] == ["seeded"] * 2


def _real_site(tmp_path, **extra):
    rng = np.random.default_rng(0)
    data = tmp_path / "site.npz"
    np.savez(data, x=rng.integers(0, 17, (120, 8, 8)).astype(np.float32), y=np.arange(120) % 10)
    return {
        "site-id": "hospital-a",
        "data-path": str(data),
        "ledger-path": str(tmp_path / "site.ledger.sqlite"),
        **extra,
    }


def test_real_site_refuses_reproducible_noise_unless_allowed(tmp_path, message_factory, context_factory):
    cfg = _digits_cfg(tmp_path, reproducible_noise=True)
    state = initial_state(cfg)
    refused = train(message_factory(cfg, state), context_factory(_real_site(tmp_path))).content
    assert refused["status"]["status"] == "refused"
    reason = refused["status"]["reason"]
    assert "reproducible-noise" in reason and "allow-reproducible-noise" in reason
    assert "arrays" not in refused
    assert not (tmp_path / "site.ledger.sqlite").exists() or SiteLedger(tmp_path / "site.ledger.sqlite").entries() == []
    for flag in ("false", False):
        node = _real_site(tmp_path, **{"allow-reproducible-noise": flag})
        assert train(message_factory(cfg, state), context_factory(node)).content["status"]["status"] == "refused"
    # The same site, allowing it (test data), trains with seeded noise and records so.
    node = _real_site(tmp_path, **{"allow-reproducible-noise": "true"})
    allowed = train(message_factory(cfg, state), context_factory(node)).content
    assert allowed["status"]["status"] == "trained" and allowed["status"]["noise-source"] == "seeded"
    (row,) = SiteLedger(tmp_path / "site.ledger.sqlite").entries()
    assert row.entry.noise_source == "seeded"
    # Without reproducible-noise the site trains with its own CSPRNG whatever it allows.
    plain = _digits_cfg(tmp_path)
    ok = train(message_factory(plain, state), context_factory(_real_site(tmp_path))).content
    assert ok["status"]["status"] == "trained" and ok["status"]["noise-source"] == "site-csprng"


def test_round_failing_before_training_writes_no_spend(tmp_path, message_factory, context_factory, monkeypatch):
    import privatune.client.round as client_round

    def cache_fails(*a, **k):
        raise OSError("No space left on device: the feature cache")

    monkeypatch.setattr(client_round, "cached_features", cache_fails)
    cfg = _digits_cfg(tmp_path)
    reply = train(message_factory(cfg, initial_state(cfg)), context_factory({"partition-id": 0, "num-partitions": 3}))
    assert reply.content["status"]["status"] == "refused"
    assert "No space left" in reply.content["status"]["reason"]
    assert SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite").entries() == []


def test_round_refusing_to_release_after_training_still_counts(tmp_path, message_factory, context_factory, monkeypatch):
    import privatune.client.app as client_app
    import privatune.client.round as client_round
    from privatune.common.he import HEError

    trained = []
    real_train_round = client_round.train_round

    def spy(*a, **k):
        trained.append(True)
        return real_train_round(*a, **k)

    def refuse(*a, **k):
        raise HEError("update has a non-finite weight")

    monkeypatch.setattr(client_round, "train_round", spy)
    monkeypatch.setattr(client_app, "encode_update", refuse)
    cfg = _digits_cfg(tmp_path)
    reply = train(message_factory(cfg, initial_state(cfg)), context_factory({"partition-id": 0, "num-partitions": 3}))
    assert trained and reply.content["status"]["status"] == "refused" and "arrays" not in reply.content
    (row,) = SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite").entries()
    assert row.entry.steps > 0 and row.entry.noise_source == "site-csprng"


def test_spend_is_on_disk_before_the_first_gradient(tmp_path, message_factory, context_factory, monkeypatch):
    import privatune.client.round as client_round

    seen = []
    real_train_local = client_round.train_local

    def check_ledger_first(*a, **k):
        seen.append(len(SiteLedger(tmp_path / "ledgers" / "site-client-0.ledger.sqlite").entries()))
        return real_train_local(*a, **k)

    monkeypatch.setattr(client_round, "train_local", check_ledger_first)
    cfg = _digits_cfg(tmp_path)
    train(message_factory(cfg, initial_state(cfg)), context_factory({"partition-id": 0, "num-partitions": 3}))
    assert seen == [1]
