"""Image augmentation and augmentation multiplicity under DP (issue 16, docs/augmentation.md).

The ops keep shape and value range and are functions of their generator; the spec is refused before training
with the key, the op and the range; K views of a record are averaged before clipping, so one record moves the
update by at most the clip bound, and the mechanism (n, q, sigma, steps, epsilon) is that of K = 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from privatune.client.randomness import SeededRandomness
from privatune.client.training import TrainHooks, train_local
from privatune.common.accounting import epsilon_of
from privatune.common.augment.image import BACKGROUND, IMAGE_OPS, augment_images, image_batch_augment
from privatune.common.augment.spec import AugmentSpecError, parse_augment
from privatune.common.config import ConfigError, RunConfig
from privatune.common.imaging import MNIST_MEAN, MNIST_STD
from privatune.common.mechanism import DPMechanism
from tests.views_run import assert_every_spend_records_views, simulate_with_views

WHITE = (1.0 - MNIST_MEAN) / MNIST_STD
STRENGTHS = {"shift": 3, "rotate": 20, "crop": 4, "erase": 0.4, "affine": 0.2, "elastic": 2.0}


def _images(n: int = 6, side: int = 28, seed: int = 0) -> torch.Tensor:
    """Normalised images as the project makes them: pixels in [0, 1], then MNIST's mean and std."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 1, side, side, generator=g) * (torch.rand(n, 1, side, side, generator=g) > 0.6)
    return (pixels - MNIST_MEAN) / MNIST_STD


def _run(spec: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    return augment_images(x, parse_augment(spec, "image"), torch.Generator().manual_seed(seed))


def test_the_table_covers_every_op():
    assert set(STRENGTHS) == set(IMAGE_OPS)


@pytest.mark.parametrize("name", sorted(STRENGTHS))
def test_every_op_keeps_shape_and_value_range_and_follows_its_seed(name):
    x = _images()
    spec = f"{name}={STRENGTHS[name]}"
    y = _run(spec, x, 1)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= BACKGROUND - 1e-5 and float(y.max()) <= WHITE + 1e-5
    assert torch.equal(y, _run(spec, x, 1))  # same seed, same views
    assert not torch.equal(y, _run(spec, x, 2))  # another seed, other views
    assert not torch.equal(y, x)  # it did something


def test_ops_leave_torchs_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _run("shift=2,rotate=10,erase=0.3", _images(), 1)
    assert torch.equal(torch.rand(3), expected)


def test_a_blank_image_stays_blank():
    # Padding and erasing fill with the normalised background (-mean/std), not 0.
    x = torch.full((4, 1, 28, 28), BACKGROUND)
    y = _run(",".join(f"{k}={v}" for k, v in STRENGTHS.items()), x, 3)
    assert torch.allclose(y, x, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("blur=2", ["augment", "unknown operation 'blur'", "shift"]),
        ("rotate=90", ["augment", "rotate=90", "(0, 45] degrees"]),
        ("shift=0", ["augment", "shift=0", "(0, 8] pixels"]),
        ("crop=1.5", ["augment", "crop=1.5", "whole number"]),
        ("erase=big", ["augment", "erase", "not a number"]),
        ("shift", ["augment", "name=strength"]),
        ("shift=1,shift=2", ["augment", "'shift'", "twice"]),
    ],
)
def test_a_bad_spec_is_refused_by_the_run_config(spec, words):
    with pytest.raises(ConfigError) as err:
        RunConfig.create(preset="fashion-mnist", augment=spec)
    for word in words:
        assert word in str(err.value)


def test_refusals_before_training_name_the_keys():
    with pytest.raises(ConfigError, match="augment-views"):
        RunConfig.create(preset="fashion-mnist", augment_views=0)
    with pytest.raises(ConfigError, match=r"mode=head.*augment"):
        RunConfig.create(preset="digits", augment="shift=2")  # digits trains the head on cached features
    with pytest.raises(ConfigError, match="ghost-clipping=false"):
        RunConfig.create(preset="fashion-mnist", augment_views=2, ghost_clipping=True)
    with pytest.raises(ConfigError, match="'shift' is an operation for image models"):
        RunConfig.create(preset="trec6", mode="last-k", augment="shift=2")
    cfg = RunConfig.create(preset="digits", mode="last-k", augment=" shift=2, rotate=10 ", augment_views=4)
    assert [(s.op.name, s.strength) for s in parse_augment(cfg.augment, "image")] == [("shift", 2), ("rotate", 10)]
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    with pytest.raises(AugmentSpecError, match="unknown operation"):
        parse_augment("rotate=5", "text")


# -- multiplicity under DP -------------------------------------------------------------------------------------

SIDE, CLASSES = 8, 3


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, CLASSES))


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return _images(n, SIDE, seed=4) * 3.0, torch.randint(0, CLASSES, (n,), generator=g)


def _view_offsets(inputs: list[torch.Tensor], generator: torch.Generator, views: int) -> list[torch.Tensor]:
    """A deterministic 'augmentation': view j of every record is x (1 + j/5) + j/10."""
    j = (torch.arange(inputs[0].shape[0]) % views).float().view(-1, 1, 1, 1)
    return [inputs[0] * (1 + j / 5) + j / 10]


def _train(model: nn.Module, x, y, *, sigma: float, clip: float, views: int, augment, seed: int = 3, lr: float = 0.5):
    return train_local(
        model,
        (x,),
        y,
        epochs=1,
        batch_size=len(y),  # q = 1: the one step samples every record
        lr=lr,
        backbone_lr_scale=1.0,  # the Linear is named "1.": one learning rate for all
        dp=True,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        randomness=SeededRandomness(seed),
        augment=augment,
        augment_views=views,
    )


@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_a_dp_step_with_four_views_is_the_mean_of_views_clipped_summed_and_noised(sigma):
    n, views, clip, lr, seed = 5, 4, 0.3, 0.5, 3
    x, y = _data(n)
    model = _model()
    ref = _model()
    res = _train(
        model,
        x,
        y,
        sigma=sigma,
        clip=clip,
        views=views,
        seed=seed,
        lr=lr,
        augment=lambda xs, g: _view_offsets(xs, g, views),
    )
    # By hand: each record's per-view gradients, their mean, clipped (Opacus' factor), summed, noised, / (n q).
    weight, bias = ref[1].weight, ref[1].bias
    per_record = []
    for i in range(n):
        grads = []
        for j in range(views):
            v = x[i : i + 1] * (1 + j / 5) + j / 10
            loss = nn.functional.cross_entropy(ref(v), y[i : i + 1])
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [weight, bias])]))
        per_record.append(torch.stack(grads).mean(0))
    g = torch.stack(per_record)
    factor = (clip / (g.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert float(factor.max()) < 1.0  # the clipping is exercised
    summed = (g * factor[:, None]).sum(0)
    rng = SeededRandomness(seed)
    rng.uniform(1)  # the views' seed (unused by this augmentation), then the Poisson draws of the one step
    rng.uniform(n)
    noise = torch.cat(
        [
            (
                rng.gaussian(tuple(p.shape), sigma * clip, device="cpu", dtype=p.dtype)
                if sigma
                else torch.zeros_like(p)
            ).flatten()
            for p in (weight, bias)
        ]
    )
    step = (summed + noise) / n
    expected = torch.cat([weight.detach().flatten(), bias.detach().flatten()]) - lr * step
    got = torch.cat([model[1].weight.detach().flatten(), model[1].bias.detach().flatten()])
    assert torch.allclose(got, expected, atol=1e-5)
    assert res.mechanism.augment_views == views


def test_one_records_update_stays_within_the_clip_norm_whatever_k():
    x, y = _data(1)
    clip, lr = 0.05, 1.0
    seen: list[int] = []

    def rows(step, module, optimizer):  # per-sample gradients after averaging: one row per sampled record
        seen.extend(int(p.grad_sample.shape[0]) for p in module.parameters())

    moves = {}
    for views in (1, 8):
        model, before = _model(), _model()
        train_local(
            model,
            (x * 40,),
            y,
            epochs=1,
            batch_size=1,
            lr=lr,
            backbone_lr_scale=1.0,
            dp=True,
            noise_multiplier=0.0,
            max_grad_norm=clip,
            randomness=SeededRandomness(1),
            augment=image_batch_augment(parse_augment("shift=2,rotate=15", "image")),
            augment_views=views,
            hooks=TrainHooks(before_step=rows),
        )
        moves[views] = math.sqrt(
            sum(
                float((p - q).detach().pow(2).sum())
                for p, q in zip(model.parameters(), before.parameters(), strict=True)
            )
        )
    # q = 1, n q = 1: the update is lr x the clipped per-record gradient; K views do not multiply it.
    for views, move in moves.items():
        assert move <= lr * clip * (1 + 1e-4), views
        assert move >= lr * clip * 0.99, views  # the gradient was large: clipped to the bound exactly
    assert seen == [1, 1, 1, 1]


def test_n_q_and_the_mechanism_are_those_of_no_augmentation():
    x, y = _data(40)
    kw = dict(epochs=2, batch_size=8, lr=0.1, dp=True, noise_multiplier=1.1, max_grad_norm=1.0)
    plain = train_local(_model(), (x,), y, randomness=SeededRandomness(2), **kw)
    aug = train_local(
        _model(),
        (x,),
        y,
        randomness=SeededRandomness(2),
        augment=image_batch_augment(parse_augment("crop=2,erase=0.3", "image")),
        augment_views=4,
        **kw,
    )
    assert aug.num_examples == plain.num_examples == 40
    assert (aug.noise_multiplier, aug.sample_rate, aug.steps) == (
        plain.noise_multiplier,
        plain.sample_rate,
        plain.steps,
    )
    assert (aug.mechanism.max_grad_norm, aug.mechanism.delta, aug.mechanism.accountant) == (
        plain.mechanism.max_grad_norm,
        plain.mechanism.delta,
        plain.mechanism.accountant,
    )
    assert aug.mechanism.augment_views == 4 and plain.mechanism.augment_views == 1
    eps = [epsilon_of([r.mechanism.gaussian], r.mechanism.delta, r.mechanism.accountant) for r in (plain, aug)]
    assert eps[0] == eps[1] > 0


def test_without_dp_k_views_train_on_the_mean_loss():
    x, y = _data(6)
    model = _model()
    res = train_local(
        model,
        (x,),
        y,
        epochs=1,
        batch_size=6,
        lr=0.1,
        dp=False,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        randomness=SeededRandomness(0),
        augment=lambda xs, g: _view_offsets(xs, g, 3),
        augment_views=3,
    )
    assert res.num_examples == 6 and res.mechanism.augment_views == 3
    assert math.isfinite(res.loss)


def test_k_is_recorded_with_the_mechanism_in_the_site_ledger(tmp_path):
    from datetime import UTC, datetime

    from privatune.common.ledger import SiteLedger
    from privatune.common.ledger.records import SpendEntry

    mech = DPMechanism(1.1, 0.05, 40, 1.0, 1e-5, "rdp", augment_views=4)
    now = datetime.now(UTC).isoformat()
    ledger = SiteLedger(tmp_path / "site.ledger.sqlite")
    for views in (4, 1):
        ledger.append(
            SpendEntry.from_mechanism(
                DPMechanism(*mech.gaussian, 1.0, 1e-5, "rdp", augment_views=views),
                run_id="r",
                round=1 + (views == 1),
                site_id="s",
                dataset_fingerprint="d",
                params_fingerprint="p",
                epsilon_run=1.0,
                epsilon_dataset=1.0,
                max_epsilon=None,
                started_at=now,
                recorded_at=now,
            )
        )
    rows = SiteLedger(tmp_path / "site.ledger.sqlite").entries()
    assert [r.entry.augment_views for r in rows] == [4, 1]
    assert rows[0].entry.dp_mechanism == mech
    assert rows[0].entry.mechanism == rows[1].entry.mechanism  # the accountants' history: K changes nothing
    assert (
        DPMechanism.from_columns({k: v for k, v in mech.columns().items() if k != "augment_views"}).augment_views == 1
    )


@pytest.mark.slow
def test_a_site_round_with_views_records_k_and_spends_what_k_1_spends(tmp_path, message_factory, context_factory):
    from privatune.client.app import train
    from privatune.common.ledger import SiteLedger
    from tests.helpers.messages import digits_config, initial_state

    node = {"partition-id": 0, "num-partitions": 3}
    eps = {}
    for views, spec in ((1, ""), (2, "shift=2,rotate=10")):
        out = tmp_path / f"k{views}"
        cfg = digits_config(out, mode="last-k", augment=spec, augment_views=views, target_epsilon=4.0)
        reply = train(message_factory(cfg, initial_state(cfg), server_round=1), context_factory(node, run_id=7))
        assert reply.content["status"]["status"] == "trained"
        (row,) = SiteLedger(out / "ledgers" / "site-client-0.ledger.sqlite").entries()
        assert row.entry.augment_views == views
        eps[views] = (row.entry.mechanism, row.entry.epsilon_run, reply.content["metrics"]["epsilon"])
    assert eps[1] == eps[2]  # n, q, sigma, steps and epsilon: K changes none


@pytest.mark.parametrize("dp", [True, False])
def test_views_in_physical_batches_give_the_unsplit_step(dp):
    x, y = _data(20)
    models = []
    for chunk in (0, 3):
        model = _model()
        train_local(
            model,
            (x,),
            y,
            epochs=1,
            batch_size=8,
            lr=0.3,
            dp=dp,
            noise_multiplier=1.0,
            max_grad_norm=0.5,
            randomness=SeededRandomness(4),
            augment=lambda xs, g: _view_offsets(xs, g, 3),
            augment_views=3,
            max_physical_batch_size=chunk,
        )
        models.append(model)
    a, b = models
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.slow
def test_a_digits_federation_with_two_views_under_dp_records_k(tmp_path):
    out, summary = simulate_with_views(
        tmp_path,
        ["--preset", "digits", "--epsilon", "4", "--mode", "last-k"],
        "max-records=300 local-epochs=1 augment=shift=2,rotate=10 augment-views=2",
    )
    assert summary["status"] == "completed"
    assert all(0 < e <= 4.0 * 1.01 for e in summary["per_client_epsilon"].values())
    assert_every_spend_records_views(out, 2)
