"""Text augmentation wired into training (issue 16, docs/augmentation.md "Text augmentation").

The run config validates the text operations by name and range only (the coordinator needs no WordNet); a site
checks its WordNet before the spend. In training a text model's loop runs on record numbers and each step
draws and tokenises its sampled records' K views, through the same multiplicity code as images: a DP step with
K = 2 on a tiny random BERT is the mean of the per-view per-sample gradients, clipped, summed and noised, as
computed here by hand with the views and the noise replayed from the seed.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from privatune.client.randomness import SeededRandomness
from privatune.client.training import TrainHooks, _views, train_local
from privatune.common.accounting import epsilon_of
from privatune.common.augment import wordnet as W
from privatune.common.augment.spec import AugmentSpecError, parse_augment
from privatune.common.augment.text import TEXT_AUGMENT_OPS, TEXT_OPS, text_views
from privatune.common.augment.text_batch import TextAugmentSiteError, text_batch_augment
from privatune.common.config import ConfigError, RunConfig
from privatune.common.models import FineTuning, configure_trainable, get_model_spec
from privatune.common.models.names import run_model_name
from tests.test_augment_text import write_wordnet
from tests.test_own_model import WORDS  # its tiny BERT's word-level vocabulary
from tests.views_run import assert_every_spend_records_views, simulate_with_views

TEXTS = ["win a prize now", "lunch tomorrow ok", "how far is the moon", "who wrote it later", "cash reward now"]
LABELS = torch.tensor([1, 0, 0, 0, 1])
LENGTH = 8
NO_WORDNET_OPS = "swap=0.3,delete=0.2,dropout=0.2"  # changes the token rows with a word-level vocabulary


def save_tiny_bert(folder: Path) -> Path:
    """A 2-block, 16-wide random BERT with a word-level tokenizer and no dropout (so a step is deterministic)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return run_model_name(f"hf:{save_tiny_bert(tmp_path_factory.mktemp('models') / 'tiny-bert')}")


def _encoder(name: str):
    spec = get_model_spec(name)
    return lambda texts: spec.encode(texts, max_length=LENGTH)


def _model(name: str) -> nn.Module:
    model = get_model_spec(name).build(2, 0)
    configure_trainable(model, FineTuning(mode="last-k", last_k=1))
    return model


def _rows(n: int) -> tuple[torch.Tensor]:
    return (torch.arange(n, dtype=torch.long),)


# -- the run config: names and ranges, no WordNet at the coordinator -------------------------------------------


def test_the_text_ops_validate_for_text_models_with_no_wordnet_at_the_coordinator(bert, tmp_path, monkeypatch):
    monkeypatch.setenv(W.WORDNET_ENV, str(tmp_path / "no-wordnet-here"))
    spec = "swap=0.1,delete=0.1,insert=0.1,synonym=0.1,dropout=0.1"
    for cfg in (
        RunConfig.create(preset="trec6", mode="last-k", augment=spec, augment_views=2),
        RunConfig.create(preset="sms-spam", model=bert, mode="lora", augment=spec),
    ):
        steps = parse_augment(cfg.augment, "text")
        assert [(s.op.name, s.strength) for s in steps] == [(n, 0.1) for n in TEXT_AUGMENT_OPS]
        assert RunConfig.from_flower(cfg.to_flower()) == cfg
    assert set(TEXT_AUGMENT_OPS) == set(TEXT_OPS)


@pytest.mark.parametrize(
    ("preset", "kw", "words"),
    [
        ("trec6", {"augment": "blur=0.1"}, ["augment", "unknown operation 'blur' for text models", "dropout, insert"]),
        ("trec6", {"augment": "swap=1.5"}, ["augment", "swap=1.5", "(0, 1] of the words"]),
        ("trec6", {"augment": "dropout=0"}, ["augment", "dropout=0", "(0, 1] per word"]),
        ("trec6", {"augment": "delete=nan"}, ["augment", "delete=nan", "(0, 1]"]),
        ("trec6", {"augment": "synonym=much"}, ["augment", "synonym", "not a number"]),
        ("trec6", {"augment": "shift=2"}, ["'shift' is an operation for image models"]),
        ("fashion-mnist", {"augment": "swap=0.1"}, ["unknown operation 'swap' for image models", "for text models"]),
        ("trec6", {"mode": "head", "augment": "swap=0.1"}, ["mode=head", "cached", "mode=last-k"]),
        ("trec6", {"mode": "head", "augment_views": 2}, ["mode=head"]),
    ],
)
def test_a_bad_text_spec_is_refused_before_training(preset, kw, words):
    kw = {"mode": "last-k", **kw}
    with pytest.raises(ConfigError) as err:
        RunConfig.create(preset=preset, **kw)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_site_without_wordnet_is_refused_naming_the_op_the_folder_and_the_fix(bert, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(W.WORDNET_ENV, str(missing))
    for spec, op in (("swap=0.1,synonym=0.2", "synonym"), ("insert=0.1", "insert")):
        with pytest.raises(TextAugmentSiteError) as err:
            text_batch_augment(TEXTS, parse_augment(spec, "text"), _encoder(bert))
        message = str(err.value)
        assert "\n" not in message and err.value.op == op
        for part in (f"augment: {op} needs WordNet", str(missing), "apt-get install wordnet-base", f"drop {op}"):
            assert part in message
        assert str(missing) not in err.value.for_server() and op in err.value.for_server()
    text_batch_augment(TEXTS, parse_augment(NO_WORDNET_OPS, "text"), _encoder(bert))  # these need none
    with pytest.raises(AugmentSpecError):
        parse_augment("synonym=0.1", "image")


# -- the loop: rows to tokenised views, labels untouched --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEXT_AUGMENT_OPS))
def test_every_op_gives_k_token_views_per_record_and_keeps_the_labels(name, bert, tmp_path, monkeypatch):
    monkeypatch.setenv(W.WORDNET_ENV, str(write_wordnet(tmp_path / "wordnet")))
    augment = text_batch_augment(TEXTS, parse_augment(f"{name}=0.5", "text"), _encoder(bert))
    rows = torch.tensor([3, 0, 4])
    xs, y = _views([rows], LABELS[rows], 3, augment, torch.Generator().manual_seed(1))
    assert torch.equal(y, LABELS[rows].repeat_interleave(3))  # every view keeps its record's label
    ids, mask = xs
    assert ids.shape == mask.shape == (9, LENGTH) and ids.dtype == torch.long
    again, _ = _views([rows], LABELS[rows], 3, augment, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(xs, again, strict=True))  # a function of the generator
    empty, y0 = _views([rows[:0]], LABELS[:0], 3, augment, torch.Generator().manual_seed(1))
    assert [tuple(t.shape) for t in empty] == [(0, LENGTH), (0, LENGTH)] and y0.numel() == 0


# -- multiplicity under DP on a tiny BERT -----------------------------------------------------------------------


def _dp(name: str, model: nn.Module, *, views: int, sigma: float, clip: float, seed: int, **kw):
    augment = text_batch_augment(TEXTS, parse_augment(NO_WORDNET_OPS, "text"), _encoder(name))
    defaults = dict(epochs=1, batch_size=len(TEXTS), lr=0.5, backbone_lr_scale=1.0)
    return train_local(
        model,
        _rows(len(TEXTS)),
        LABELS,
        dp=True,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        randomness=SeededRandomness(seed),
        augment=augment,
        augment_views=views,
        **{**defaults, **kw},
    )


@pytest.mark.parametrize("sigma", [0.0, 1.1])
def test_a_dp_step_with_two_text_views_is_the_mean_of_views_clipped_summed_and_noised(bert, sigma):
    n, views, clip, lr, seed = len(TEXTS), 2, 0.05, 0.5, 5
    model = _model(bert)
    ref = copy.deepcopy(model)
    res = _dp(bert, model, views=views, sigma=sigma, clip=clip, seed=seed, lr=lr)
    assert (res.steps, res.sample_rate, res.mechanism.augment_views) == (1, 1.0, views)
    # Replay the round's randomness: the views' seed, the Poisson draws of the one step, then the noise.
    rng = SeededRandomness(seed)
    views_gen = torch.Generator().manual_seed(int(rng.uniform(1)[0] * 2**62))
    text_rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=views_gen).item()))
    drawn = text_views(TEXTS, [(s.op.name, s.strength) for s in parse_augment(NO_WORDNET_OPS, "text")], views, text_rng)
    assert any(v != t for t, vs in zip(TEXTS, drawn, strict=True) for v in vs)  # the views differ from the texts
    rng.uniform(n)  # q = 1: every record sampled
    ids, mask = _encoder(bert)([v for vs in drawn for v in vs])
    params = [p for p in ref.parameters() if p.requires_grad]
    per_record = []
    for i in range(n):
        grads = []
        for j in range(views):
            row = slice(i * views + j, i * views + j + 1)
            loss = nn.functional.cross_entropy(ref(ids[row], mask[row]), LABELS[i : i + 1])
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        per_record.append(torch.stack(grads).mean(0))
    g = torch.stack(per_record)
    factor = (clip / (g.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert float(factor.max()) < 1.0  # the clipping is exercised
    summed = (g * factor[:, None]).sum(0)
    noise = torch.cat(
        [
            (
                rng.gaussian(tuple(p.shape), sigma * clip, device="cpu", dtype=p.dtype)
                if sigma
                else torch.zeros_like(p)
            ).flatten()
            for p in params
        ]
    )
    expected = torch.cat([p.detach().flatten() for p in params]) - lr * (summed + noise) / n
    got = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_one_records_update_stays_within_the_clip_norm_for_one_and_four_views(bert):
    clip, lr = 1e-3, 1.0
    rows_seen: list[int] = []

    def rows(step, module, optimizer):  # after averaging: one per-sample gradient row per sampled record
        rows_seen.extend(int(p.grad_sample.shape[0]) for p in module.parameters() if p.requires_grad)

    for views in (1, 4):
        model = _model(bert)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        train_local(
            model,
            _rows(1),
            LABELS[:1],
            epochs=1,
            batch_size=1,
            lr=lr,
            backbone_lr_scale=1.0,
            dp=True,
            noise_multiplier=0.0,
            max_grad_norm=clip,
            randomness=SeededRandomness(2),
            augment=text_batch_augment(TEXTS[:1], parse_augment(NO_WORDNET_OPS, "text"), _encoder(bert)),
            augment_views=views,
            hooks=TrainHooks(before_step=rows),
        )
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        move = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(after, before, strict=True)))
        assert lr * clip * 0.99 <= move <= lr * clip * (1 + 1e-4), views  # clipped to the bound, not K times it
    assert rows_seen and set(rows_seen) == {1}


def test_n_q_sigma_steps_and_the_mechanism_are_those_without_text_augmentation(bert):
    kw = dict(epochs=2, batch_size=2, lr=0.1, dp=True, noise_multiplier=1.1, max_grad_norm=1.0)
    spec = get_model_spec(bert)
    # Seed 3 draws no empty Poisson batch here: transformers' BERT cannot run a forward pass on 0 rows (with or
    # without augmentation), a limit of tiny data sets only ((1 - q)^n is negligible for a real site's n).
    plain = train_local(
        _model(bert), spec.encode(TEXTS, max_length=LENGTH), LABELS, randomness=SeededRandomness(3), **kw
    )
    aug = _dp(bert, _model(bert), views=4, sigma=1.1, clip=1.0, seed=3, epochs=2, batch_size=2, lr=0.1)
    assert aug.num_examples == plain.num_examples == len(TEXTS)
    assert (aug.noise_multiplier, aug.sample_rate, aug.steps) == (
        plain.noise_multiplier,
        plain.sample_rate,
        plain.steps,
    )
    assert aug.mechanism.gaussian == plain.mechanism.gaussian
    assert (aug.mechanism.max_grad_norm, aug.mechanism.delta, aug.mechanism.accountant) == (
        plain.mechanism.max_grad_norm,
        plain.mechanism.delta,
        plain.mechanism.accountant,
    )
    assert aug.mechanism.augment_views == 4 and plain.mechanism.augment_views == 1
    eps = [epsilon_of([r.mechanism.gaussian], r.mechanism.delta, r.mechanism.accountant) for r in (plain, aug)]
    assert eps[0] == eps[1] > 0


def test_without_dp_text_views_are_plain_augmentation(bert):
    model = _model(bert)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    res = train_local(
        model,
        _rows(len(TEXTS)),
        LABELS,
        epochs=1,
        batch_size=2,
        lr=0.5,
        dp=False,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        randomness=SeededRandomness(0),
        augment=text_batch_augment(TEXTS, parse_augment(NO_WORDNET_OPS, "text"), _encoder(bert)),
        augment_views=3,
    )
    assert res.num_examples == len(TEXTS) and res.mechanism.augment_views == 3 and res.noise_multiplier == 0.0
    assert math.isfinite(res.loss)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


# -- a site round and a federation -------------------------------------------------------------------------------


def _site_round(cfg: RunConfig, message_factory, context_factory):
    from privatune.client.app import train
    from tests.helpers.messages import initial_state

    node = {"partition-id": 0, "num-partitions": 2}
    return train(message_factory(cfg, initial_state(cfg), server_round=1), context_factory(node, run_id=7))


def _text_config(out: Path, bert: str, **kw) -> RunConfig:
    from tests.helpers.messages import digits_config

    values = dict(preset="sms-spam", model=bert, mode="last-k", max_records=80, max_length=LENGTH, target_epsilon=8.0)
    return digits_config(out, **{**values, **kw})


def test_a_site_round_without_wordnet_is_refused_before_the_spend(
    bert, tmp_path, monkeypatch, message_factory, context_factory
):
    from privatune.common.ledger import SiteLedger

    missing = tmp_path / "nowhere"
    monkeypatch.setenv(W.WORDNET_ENV, str(missing))
    cfg = _text_config(tmp_path / "run", bert, augment="swap=0.1,synonym=0.2", augment_views=2)  # valid centrally
    status = _site_round(cfg, message_factory, context_factory).content["status"]
    assert status["status"] == "refused"
    assert "synonym needs WordNet" in status["reason"] and str(missing) not in status["reason"]
    ledgers = sorted((tmp_path / "run" / "ledgers").glob("*.ledger.sqlite"))
    assert ledgers and all(SiteLedger(p).entries() == [] for p in ledgers)  # refused before the write-ahead spend


def test_a_site_round_with_text_views_records_k_and_spends_what_k_1_spends(
    bert, tmp_path, monkeypatch, message_factory, context_factory
):
    from privatune.common.ledger import SiteLedger

    monkeypatch.setenv(W.WORDNET_ENV, str(write_wordnet(tmp_path / "wordnet")))
    spent = {}
    for views, spec in ((1, ""), (2, "swap=0.1,synonym=0.2,dropout=0.1")):
        out = tmp_path / f"k{views}"
        reply = _site_round(
            _text_config(out, bert, augment=spec, augment_views=views), message_factory, context_factory
        )
        assert reply.content["status"]["status"] == "trained", reply.content["status"]
        (row,) = SiteLedger(out / "ledgers" / "site-client-0.ledger.sqlite").entries()
        assert row.entry.augment_views == views
        spent[views] = (row.entry.mechanism, row.entry.epsilon_run, reply.content["metrics"]["epsilon"])
    assert spent[1] == spent[2]  # n, q, sigma, steps and epsilon: K and the text operations change none


@pytest.mark.slow
@pytest.mark.skipif(
    W.wordnet_problem(Path(W.DEFAULT_WORDNET_DIR)) is not None,
    reason=f"WordNet is not in {W.DEFAULT_WORDNET_DIR} (apt-get install wordnet-base)",
)
def test_a_trec6_federation_with_two_text_views_under_dp_records_k(tmp_path):
    out, summary = simulate_with_views(
        tmp_path,
        ["--preset", "trec6", "--epsilon", "8", "--mode", "lora"],
        "max-records=200 max-length=24 local-epochs=1 augment=swap=0.1,synonym=0.1 augment-views=2",
        drop_env=(W.WORDNET_ENV,),  # the sites read Debian's wordnet-base
    )
    assert summary["status"] == "completed" and summary["dp"]
    assert all(0 < e <= 8.0 * 1.01 for e in summary["per_client_epsilon"].values())
    assert_every_spend_records_views(out, 2)


def test_site_check_names_a_missing_wordnet_for_the_announced_run(bert, tmp_path, monkeypatch):
    from privatune.client.site_check import check_site

    # A label the run does not know stops the check at the data, after the augment line and before the (slow)
    # budget projection: this test reads the augment line only.
    data = tmp_path / "sms.csv"
    data.write_text("text,label\nwin a prize now,maybe\n")
    node = {"site-id": "bank-a", "data-path": str(data), "ledger-path": str(tmp_path / "l.sqlite")}
    run = {"preset": "sms-spam", "model": bert, "mode": "last-k", "augment": "swap=0.1,insert=0.1"}
    monkeypatch.setenv(W.WORDNET_ENV, str(tmp_path / "nowhere"))
    (check,) = [c for c in check_site(node, run).checks if c.name == "augment"]
    assert not check.ok and "insert needs WordNet" in check.detail and "apt-get install wordnet-base" in check.detail
    monkeypatch.setenv(W.WORDNET_ENV, str(write_wordnet(tmp_path / "wordnet")))
    (check,) = [c for c in check_site(node, run).checks if c.name == "augment"]
    assert check.ok and "swap=0.1,insert=0.1" in check.detail
    assert [c.name for c in check_site(node, {**run, "augment": ""}).checks if c.name == "augment"] == []
