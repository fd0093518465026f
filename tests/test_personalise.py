"""Personalisation (issue 15): a site's DP fine-tuning of the final model, kept at the site; personal-head."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from privatune.client.app import evaluate_global, train
from privatune.client.personal_head import head_path, load_head
from privatune.client.personalise import (
    PersonaliseError,
    PersonaliseSettings,
    personal_model_path,
    personalise_at_site,
    personalise_config,
    personalise_run_id,
)
from privatune.client.round import Refusal, open_run
from privatune.client.site_config import SiteConfig
from privatune.common.config import ConfigError, RunConfig
from privatune.common.ledger import PURPOSE_PERSONALISE, PURPOSE_TRAIN, SiteLedger
from privatune.common.models import configure_trainable, get_model_spec, load_trainable_state, trainable_state
from privatune.common.models.trainable import shared_state
from privatune.simulations.personalise import build_report, plot_personalisation
from tests.helpers.messages import digits_config, initial_state

ROOT = Path(__file__).resolve().parents[1]
SITE = {"partition-id": 0, "num-partitions": 2}


def _ledger_rows(path: Path) -> list:
    return [r.entry for r in SiteLedger(path).entries()]


def _audit(paths: list[Path]) -> dict:
    from privatune.common.audit.auditor import audit_paths
    from privatune.common.audit.render import report_to_json

    return report_to_json(audit_paths(paths))


# -- pure pieces -----------------------------------------------------------------------------------------------


def test_shared_state_drops_only_the_head_under_personal_head():
    state = {"head.weight": np.zeros(2), "head.bias": np.zeros(1), "body.conv.weight": np.ones(3)}
    assert shared_state(state, personal_head=False) == state
    assert set(shared_state(state, personal_head=True)) == {"body.conv.weight"}


def test_loading_a_shared_state_keeps_the_models_head():
    model = get_model_spec("digits-cnn").build(10, 0)
    configure_trainable(model, "full")
    head = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("head.")}
    body = {k: v + 1.0 for k, v in shared_state(trainable_state(model), personal_head=True).items()}
    load_trainable_state(model, body, keep_head=True)
    for n, p in model.named_parameters():
        if n in head:
            assert torch.equal(p.detach(), head[n])
        else:
            np.testing.assert_allclose(p.detach().numpy(), body[n])
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(model, body)  # without keep_head the head is missing


def test_config_refuses_personal_head_in_head_mode_and_bad_personalise_keys():
    with pytest.raises(ConfigError, match="personal-head"):
        RunConfig.create(preset="digits", mode="head", personal_head=True)
    with pytest.raises(ConfigError, match="personalise-mode"):
        RunConfig.create(preset="digits", personalise_mode="lora")
    with pytest.raises(ConfigError, match="personalise-epsilon"):
        RunConfig.create(preset="digits", personalise_epsilon=0.0)
    assert RunConfig.create(preset="digits", mode="full", personal_head=True).personal_head


def test_settings_and_the_personalisation_config():
    with pytest.raises(PersonaliseError, match="--epochs"):
        PersonaliseSettings(epochs=0)
    with pytest.raises(PersonaliseError, match="--mode"):
        PersonaliseSettings(mode="lora")
    cfg = RunConfig.create(preset="digits", num_server_rounds=5, proximal_mu=0.1, noise_multiplier=0.0)
    p = personalise_config(cfg, PersonaliseSettings(epochs=4, epsilon=2.5))
    assert (p.local_epochs, p.num_server_rounds, p.target_epsilon, p.proximal_mu) == (4, 1, 2.5, 0.0)
    assert personalise_run_id("42") == "42/personalise"


def test_report_means_and_plot(tmp_path):
    from privatune.client.personalise import Personalised

    rows = [
        Personalised("client-0", 0.5, 0.75, 10, 4, 1.0, 3.0, 0.9, "a"),
        Personalised("client-1", 0.25, 0.5, 12, 4, 1.0, 3.5, 0.9, "b"),
        Personalised("client-2", None, None, 8, 0, 1.0, 2.0, 0.9, "c"),
    ]
    report = build_report("7", PersonaliseSettings(), rows, {"client-3": "budget exhausted"})
    assert report["mean_global_accuracy"] == pytest.approx(0.375)
    assert report["mean_personal_accuracy"] == pytest.approx(0.625)
    assert report["mean_gain"] == pytest.approx(0.25)
    png = plot_personalisation(rows, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_server_sends_and_scores_the_body_alone_under_personal_head(tmp_path):
    from privatune.common.model_card import KEY_PERSONAL_HEAD, ModelCard
    from privatune.common.model_eval import build_model
    from privatune.server.app import initial_weights
    from privatune.server.central_eval import CentralEvaluator

    cfg = digits_config(tmp_path, mode="full", max_records=200, personal_head=True)
    start = initial_weights(cfg, "run-7")
    full = initial_state(cfg)
    assert set(start.expected_shapes) == set(full) - {k for k in full if k.startswith("head.")}
    assert not any(k.startswith("head.") for k in start.arrays)
    body = {k: v.numpy() for k, v in start.arrays.items()}
    assert 0.0 <= CentralEvaluator(cfg, cache_dir=None)(body).accuracy <= 1.0  # the body on the initial head
    card = ModelCard.from_metadata(
        {**_card_of(cfg).to_metadata(), KEY_PERSONAL_HEAD: "true"}, source="global.safetensors"
    )
    assert card.extra[KEY_PERSONAL_HEAD] == "true"
    build_model(card, body)  # privatune evaluate loads the body with the initial head


def _card_of(cfg: RunConfig):
    from privatune.common.model_card import ModelCard, Privacy

    return ModelCard(
        model=cfg.model,
        kind="image",
        fine_tuning=cfg.fine_tuning,
        labels=cfg.label_names,
        privacy=Privacy(
            dp=True, target_epsilon=cfg.target_epsilon, max_client_epsilon=None, delta=None, accountant=cfg.accountant
        ),
    )


# -- at a site -------------------------------------------------------------------------------------------------


def _site_run(cfg: RunConfig, pid: int = 0, num: int = 2, state: dict | None = None):
    site = SiteConfig.from_node_config({"partition-id": pid, "num-partitions": num}, cfg)
    run = open_run(cfg, site, "run-7", cfg.num_server_rounds)
    load_trainable_state(run.model, state if state is not None else initial_state(cfg))
    return run


def test_personalisation_spends_in_the_site_ledger_keeps_the_model_at_the_site_and_audits_clean(tmp_path):
    cfg = digits_config(tmp_path, num_server_rounds=2, max_records=200)
    run = _site_run(cfg)
    out = personalise_at_site(run, PersonaliseSettings(epochs=1, epsilon=2.0))
    assert not isinstance(out, Refusal)
    (entry,) = _ledger_rows(run.site.ledger_path)
    assert entry.purpose == PURPOSE_PERSONALISE and entry.run_id == "run-7/personalise"
    assert entry.round == cfg.num_server_rounds + 1
    assert entry.epsilon_run == pytest.approx(out.epsilon) and 0 < out.epsilon <= 2.0 * 1.01
    assert out.num_val > 0 and out.global_accuracy is not None and out.personal_accuracy is not None
    path = Path(out.model_file)
    assert path == personal_model_path(run.site) and path.parent == Path(run.site.ledger_path).parent
    from safetensors.numpy import load_file

    saved = load_file(str(path))
    assert set(saved) == set(initial_state(cfg))
    assert any(not np.array_equal(saved[k], v) for k, v in initial_state(cfg).items()), "training changed nothing"
    assert _audit([run.site.ledger_path])["ok"]
    # The personalisation has its own target: a second one would pass it and is refused, spending nothing.
    again = personalise_at_site(_site_run(cfg), PersonaliseSettings(epochs=1, epsilon=2.0))
    assert isinstance(again, Refusal) and "target" in again.reason
    assert len(_ledger_rows(run.site.ledger_path)) == 1


def test_head_personalisation_of_a_full_run_changes_only_the_head(tmp_path):
    cfg = digits_config(tmp_path, mode="full", max_records=200)
    run = _site_run(cfg)
    before = trainable_state(run.model)
    out = personalise_at_site(run, PersonaliseSettings(epochs=1, epsilon=2.0, mode="head"))
    assert not isinstance(out, Refusal)
    from safetensors.numpy import load_file

    saved = load_file(out.model_file)
    assert set(saved) == set(before)  # the run mode's whole set, so it loads like the global model
    for k, v in before.items():
        assert np.array_equal(saved[k], v) != k.startswith("head."), k
    assert all(p.requires_grad for p in run.model.parameters())  # the run's trainable set is restored


def test_the_personal_head_never_travels_and_is_kept_between_rounds(tmp_path, message_factory, context_factory):
    cfg = digits_config(tmp_path, mode="full", max_records=200, personal_head=True, num_server_rounds=2)
    body = shared_state(initial_state(cfg), personal_head=True)
    ctx = context_factory(SITE)
    reply = train(message_factory(cfg, body, server_round=1), ctx)
    content = reply.content
    assert content["status"]["status"] == "trained"
    sent = set(content["arrays"].keys())
    assert sent == set(body) and not any(k.startswith("head.") for k in sent)
    assert list(content.array_records) == ["arrays"]  # the only arrays in the reply are the body's
    site = SiteConfig.from_node_config(SITE, cfg)
    kept = head_path(site)
    assert kept.is_file() and kept.parent == Path(site.ledger_path).parent
    trained_head = {k: v for k, v in _kept(kept).items()}
    init_head = {k: v for k, v in initial_state(cfg).items() if k.startswith("head.")}
    assert set(trained_head) == set(init_head)
    assert any(not np.array_equal(trained_head[k], init_head[k]) for k in init_head)
    for k, arr in content["arrays"].items():  # no array of the reply is the trained head under another name
        value = arr.numpy()
        assert not any(value.shape == h.shape and np.array_equal(value, h) for h in trained_head.values()), k
    # The next message of the run starts from the site's own head, not the initial one.
    model = get_model_spec(cfg.model).build(10, cfg.seed)
    configure_trainable(model, cfg.fine_tuning)
    assert load_head(model, site, str(ctx.run_id))
    for n, p in model.named_parameters():
        if n.startswith("head."):
            np.testing.assert_array_equal(p.detach().numpy(), trained_head[n])
    assert not load_head(model, site, "another-run")  # another run's head is not used


def _kept(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_the_final_personalisation_runs_after_the_last_evaluation_and_sends_nothing_of_it(
    tmp_path, message_factory, context_factory
):
    cfg = digits_config(tmp_path, num_server_rounds=1, max_records=200, personalise_epochs=1, personalise_epsilon=2.0)
    ctx = context_factory(SITE)
    state = initial_state(cfg)
    train(message_factory(cfg, state, server_round=1), ctx)
    reply = evaluate_global(message_factory(cfg, state, server_round=1, message_type="evaluate"), ctx)
    assert reply.content["status"]["status"] == "evaluated"
    assert set(reply.content.keys()) == {"status"}  # no metrics, no arrays: the personalisation stays at the site
    ledger = Path(cfg.out_dir) / "ledgers" / "site-client-0.ledger.sqlite"
    assert [e.purpose for e in _ledger_rows(ledger)] == [PURPOSE_TRAIN, PURPOSE_PERSONALISE]
    outcome = json.loads((Path(cfg.out_dir) / "personalisation" / "client-0.json").read_text())
    assert outcome["site_id"] == "client-0" and Path(outcome["model_file"]).is_file()


# -- whole runs ------------------------------------------------------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


SMALL = "max-records=300 local-epochs=1 noise-multiplier=1.0 batch-size=32 alpha=0.1"


@pytest.mark.slow
def test_privatune_personalise_on_a_finished_simulation(tmp_path):
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "privatune.cli"]
    sim = subprocess.run(
        [*cli, "simulate", "--preset", "digits", "--clients", "2", "--rounds", "1", "--epsilon", "50",
         "--run-config", SMALL, "--out", str(run)],
        capture_output=True, text=True, timeout=600, env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    done = subprocess.run(
        [*cli, "personalise", str(run), "--epochs", "2", "--epsilon", "2", "--json"],
        capture_output=True, text=True, timeout=600, env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    run_id = json.loads((run / "summary.json").read_text())["run_id"]
    assert report["run_id"] == run_id and len(report["clients"]) == 2 and not report["refused"]
    for c in report["clients"]:
        assert 0 <= c["global_accuracy"] <= 1 and 0 <= c["personal_accuracy"] <= 1
        rows = _ledger_rows(run / "ledgers" / f"site-{c['site_id']}.ledger.sqlite")
        assert [(e.run_id, e.purpose) for e in rows] == [(run_id, "train"), (f"{run_id}/personalise", "personalise")]
        assert Path(c["model_file"]).parent == run / "ledgers"
    folder = run / "personalisation"
    with open(folder / "personalisation.csv") as fh:
        assert [r["site_id"] for r in csv.DictReader(fh)] == ["client-0", "client-1"]
    assert (folder / "personalisation.png").stat().st_size > 0
    assert json.loads((folder / "personalisation.json").read_text())["mean_gain"] == pytest.approx(report["mean_gain"])
    assert _audit([run])["ok"]


@pytest.mark.slow
def test_a_personal_head_simulation_with_a_final_personalisation(tmp_path):
    run = tmp_path / "run"
    sim = subprocess.run(
        [sys.executable, "-m", "privatune.cli", "simulate", "--preset", "digits", "--clients", "2", "--rounds", "1",
         "--epsilon", "50", "--run-config",
         f'{SMALL} mode="full" personal-head=true personalise-epochs=1 personalise-epsilon=2', "--out", str(run)],
        capture_output=True, text=True, timeout=600, env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert any(w.startswith("personal-head:") for w in summary["warnings"])  # what central evaluation scores
    assert summary["personalisation"]["clients"] == 2
    from safetensors.numpy import load_file

    assert not any(k.startswith("head.") for k in load_file(str(run / "global.safetensors")))
    for i in range(2):
        assert (run / "ledgers" / f"head-client-{i}.safetensors").is_file()
        rows = _ledger_rows(run / "ledgers" / f"site-client-{i}.ledger.sqlite")
        assert [e.purpose for e in rows] == ["train", "personalise"]
    assert (run / "personalisation" / "personalisation.png").is_file()
    assert _audit([run])["ok"]
