"""A whole simulated federation through Flower's simulation engine (Ray), the real apps, DP on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "digits"
    home = tmp_path_factory.mktemp("home")
    # Reproducible noise (simulation only), so the HE run below draws the very same noise and can be compared.
    cmd = [
        sys.executable,
        "-m",
        "privatune.cli",
        "simulate",
        "--preset",
        "digits",
        "--clients",
        "3",
        "--rounds",
        "2",
        "--epsilon",
        "4",
        "--run-config",
        "reproducible-noise=true",
        "--out",
        str(out),
    ]
    env = {**os.environ, "HOME": str(home)}
    env.pop("FLWR_HOME", None)
    env.pop("MPLCONFIGDIR", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc.home = home
    return out, proc


def test_dp_federation_beats_the_untrained_model(digits_run):
    out, _ = digits_run
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    untrained = rounds[0]["central"]["accuracy"]
    assert rounds[0]["round"] == 0
    assert summary["rounds_completed"] == 2 and summary["status"] == "completed"
    assert summary["test_accuracy"] > untrained + 0.3
    assert summary["test_accuracy"] > 0.85  # the MNIST CNN's own 10-way head scores about 0.82 here


def test_every_client_stays_within_its_target_epsilon(digits_run):
    out, _ = digits_run
    summary = json.loads((out / "summary.json").read_text())
    eps = summary["per_client_epsilon"]
    assert sorted(eps) == ["client-0", "client-1", "client-2"]
    assert all(0 < e <= 4.0 * 1.01 for e in eps.values())
    for key in ("test_accuracy", "test_macro_f1", "delta", "target_epsilon", "mode", "secure_aggregation"):
        assert key in summary
    assert summary["secure_aggregation"] == "none" and summary["mode"] == "head"
    # The seeded run says so: in summary.json, in what every site reported, and on the terminal.
    assert summary["noise_source"] == "seeded" and summary["noise_sources_reported"] == ["seeded"]
    assert "warning: reproducible-noise=true" in digits_run[1].stderr


def test_outputs_are_written(digits_run):
    out, proc = digits_run
    weights = load_file(str(out / "global.safetensors"))
    assert set(weights) == {"head.weight", "head.bias"}  # only the trainable set
    assert (out / "rounds.png").stat().st_size > 10_000
    assert json.loads((out / "config.json").read_text())["preset"] == "digits"
    assert len(list((out / "ledgers").glob("site-*.ledger.sqlite"))) == 3
    assert (out / "server.ledger.sqlite").exists()
    assert "client-2" in proc.stdout and "epsilon" in proc.stdout
    # No metric released and no --verbose: the federated evaluation would reach no one, so it did not run.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["federated_evaluation"].startswith("off: no site releases metrics")
    config = json.loads((out / "config.json").read_text())
    assert config.get("fraction_evaluate", config.get("fraction-evaluate")) == 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(not r["federated"] for r in rounds) and rounds[-1]["central"]["accuracy"] > 0


def test_no_process_is_left_behind(digits_run):
    out, _ = digits_run
    summary = json.loads((out / "summary.json").read_text())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    # Other federations may run on this machine; none may belong to this run (its Ray session dir).
    assert summary["ray_temp_dir"] not in ps
    assert str(out) not in ps
    assert not (tmp_dir := __import__("pathlib").Path(summary["ray_temp_dir"])).exists(), tmp_dir
    # Nothing written outside --out (Flower's and matplotlib's per-user folders are redirected into it).
    assert list(digits_run[1].home.iterdir()) == []


@pytest.fixture(scope="module")
def digits_he_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim-he") / "digits-he"
    cmd = [
        sys.executable,
        "-m",
        "privatune.cli",
        "simulate",
        "--preset",
        "digits",
        "--clients",
        "3",
        "--rounds",
        "2",
        "--epsilon",
        "4",
        "--secure-aggregation",
        "he",
        "--run-config",
        "reproducible-noise=true",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_he_run_matches_the_plaintext_run(digits_run, digits_he_run):
    plain = json.loads((digits_run[0] / "summary.json").read_text())
    enc = json.loads((digits_he_run / "summary.json").read_text())
    assert enc["secure_aggregation"] == "he" and enc["rounds_completed"] == 2
    # Same seeded noise, but each simulated run makes its own site keys, so the keyed validation split (and hence
    # the training records) differs between the two runs: the accuracies agree closely, not to the record. That
    # HE aggregation itself equals FedAvg is checked exactly in tests/test_he_aggregation.py.
    assert abs(enc["test_accuracy"] - plain["test_accuracy"]) <= 0.02
    assert enc["central_eval"]["on"] and "decrypted final model" in enc["central_eval"]["test_data"]
    assert plain["central_eval"] == {"on": True, "test_data": "dataset 'digits''s held-out test split"}
    # The server never evaluated centrally (it cannot decrypt): no per-round central metrics.
    rounds = [json.loads(line) for line in (digits_he_run / "metrics.jsonl").read_text().splitlines()]
    assert all(not r["central"] for r in rounds)
    assert not (digits_he_run / "global.safetensors").exists()


def test_decrypt_command_recovers_the_final_model(digits_he_run, tmp_path):
    out = tmp_path / "final.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "privatune.cli",
            "decrypt",
            "--secret-context",
            str(digits_he_run / "keys" / "secret.ctx"),
            "--checkpoint",
            str(digits_he_run / "global.he-checkpoint"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    got, ref = load_file(str(out)), load_file(str(digits_he_run / "global.decrypted.safetensors"))
    assert set(got) == {"head.weight", "head.bias"}
    for k in got:
        assert (got[k] == ref[k]).all()
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "privatune.cli",
            "decrypt",
            "--secret-context",
            str(digits_he_run / "keys" / "public.ctx"),
            "--checkpoint",
            str(digits_he_run / "global.he-checkpoint"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "public context" in refused.stdout + refused.stderr


def test_simulation_ledgers_pass_the_audit(digits_run, digits_he_run):
    for out in (digits_run[0], digits_he_run):
        proc = subprocess.run(
            [sys.executable, "-m", "privatune.cli", "audit", str(out)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        assert "seeded noise" in proc.stdout  # flagged, not a violation
