"""Resume and warm start (issue 15): the round checkpoint's format and atomicity, what may start a run, and
(slow) a simulation killed mid-round and resumed, and a finished one continued."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from privatune.common.config import ConfigError, RunConfig
from privatune.common.model_card import ModelCard, Privacy
from privatune.server import checkpoint as ckpt
from privatune.server.resume import check_matches, check_shapes, earlier_rounds, load_start
from privatune.server.run_record import RoundReport, RunRecorder
from privatune.simulations.resume import resume_config, write_simulation_record

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**over: object) -> RunConfig:
    return RunConfig.from_flower({"preset": "digits", **over})


def _card(cfg: RunConfig, **over: object) -> dict[str, str]:
    values: dict[str, object] = {
        "model": cfg.model,
        "kind": "image",
        "fine_tuning": cfg.fine_tuning,
        "labels": tuple(cfg.label_names),
        "privacy": Privacy(True, 8.0, 1.5, 1e-5, cfg.accountant),
        "run_id": "17",
        "rounds_completed": 2,
    }
    values.update(over)
    return ModelCard(**values).to_metadata()  # type: ignore[arg-type]


def _state(value: float) -> dict[str, np.ndarray]:
    return {"head.weight": np.full((10, 4), value, np.float32), "head.bias": np.full((10,), value, np.float32)}


def _save(directory: Path, rnd: int, value: float, optimizer: dict[str, np.ndarray] | None = None) -> None:
    cfg = _cfg()
    ckpt.save(directory, ckpt.ServerCheckpoint("17", rnd, _state(value), False, _card(cfg), optimizer or {}))


def test_a_checkpoint_round_trips_weights_round_run_card_and_optimizer_state(tmp_path):
    moments = {"m/head.weight": np.arange(40, dtype=np.float32).reshape(10, 4)}
    _save(tmp_path, 3, 0.5, moments)
    got = ckpt.load(tmp_path)
    assert (got.run_id, got.round, got.encrypted) == ("17", 3, False)
    np.testing.assert_array_equal(got.weights["head.weight"], _state(0.5)["head.weight"])
    np.testing.assert_array_equal(got.optimizer["m/head.weight"], moments["m/head.weight"])
    assert got.card["model"] == "digits-cnn"
    _save(tmp_path, 4, 0.25)  # the next round replaces it and removes the old folder
    assert ckpt.load(tmp_path).round == 4 and ckpt.load(tmp_path).optimizer == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "round-000004"]


def test_a_crash_between_the_temp_write_and_the_replace_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, 1.0)

    def crash(src: object, dst: object) -> None:
        raise KeyboardInterrupt("killed before os.replace")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, 2.0)
    monkeypatch.undo()
    old = ckpt.load(tmp_path)  # round 2's folder exists, uncommitted: the commit still names round 1
    assert old.round == 1 and float(old.weights["head.bias"][0]) == 1.0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temp commit file is gone
    _save(tmp_path, 2, 2.0)  # the round run again commits over the leftover folder
    assert ckpt.load(tmp_path).round == 2 and float(ckpt.load(tmp_path).weights["head.bias"][0]) == 2.0


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    _save(tmp_path, 1, 1.0)
    weights = tmp_path / "round-000001" / ckpt.PLAIN_NAME
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ckpt.CheckpointError, match="does not match its digest"):
        ckpt.load(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no round of this run completed"):
        ckpt.load(tmp_path / "elsewhere")


def test_a_checkpoint_of_another_model_mode_or_labels_is_refused_naming_both(tmp_path):
    cfg = _cfg()
    _save(tmp_path / "checkpoint", 2, 0.1)
    start = load_start(tmp_path)  # a run folder: its checkpoint/
    check_matches(start, cfg, "x")  # the same kind of run: accepted
    other = _cfg(labels="a,b")
    with pytest.raises(ckpt.CheckpointError, match=r"labels: the checkpoint's are 0,1,.*run config's are a,b"):
        check_matches(start, other, "initial-checkpoint")
    with pytest.raises(ckpt.CheckpointError, match=r"fine-tuning.*mode 'head' vs 'full'"):
        check_matches(start, _cfg(mode="full"), "initial-checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not this run's trainable set"):
        check_shapes(start, {"head.weight": (10, 4)}, "initial-checkpoint")
    # a saved model file (the final global.safetensors) starts a run too, its card checked the same way
    from safetensors.numpy import save_file

    model = tmp_path / "global.safetensors"
    save_file(_state(0.3), str(model), metadata=_card(cfg, model="minilm", kind="text", max_length=8, pooling="mean"))
    with pytest.raises(ckpt.CheckpointError, match="model: the checkpoint's is minilm, the run config's is digits-cnn"):
        check_matches(load_start(model), cfg, "initial-checkpoint")


def test_a_resumed_record_keeps_completed_rounds_and_drops_the_unfinished_one(tmp_path):
    rec = RunRecorder(tmp_path, summary_base={"run_id": "17"})
    for r in range(3):
        rec.finish_round(RoundReport(round=r, aggregated=r > 0, clients={"c": {"epsilon": 0.5 * r}} if r else {}))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "aggreg')  # a line cut short by the kill
    back = earlier_rounds(tmp_path, upto=1)
    assert [r.round for r in back] == [0, 1]
    assert [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    again = RunRecorder(tmp_path, summary_base={"run_id": "17"})
    again.restore(back)
    assert again.summary()["rounds_completed"] == 1 and again.summary()["per_client_epsilon"] == {"c": 0.5}


def _run_folder(tmp_path: Path, **over: object) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(_cfg(**{"num-server-rounds": 3, **over}).to_flower()))
    write_simulation_record(run, 2)
    _save(run / "checkpoint", 3, 0.1)
    return run


def test_resume_keeps_the_run_config_and_refuses_a_contradiction(tmp_path):
    run = _run_folder(tmp_path, **{"noise-multiplier": 1.0})
    cfg, clients = resume_config(run, {}, 5, None)
    assert (cfg.num_server_rounds, clients, cfg.out_dir, cfg.noise_multiplier) == (5, 2, str(run), 1.0)
    with pytest.raises(ConfigError, match=r"target-epsilon: the run in .* has 8\.0 .* asks for 4\.0"):
        resume_config(run, {"target-epsilon": 4.0}, 5, None)
    with pytest.raises(ConfigError, match="has 2 clients"):
        resume_config(run, {}, 5, 3)
    with pytest.raises(ConfigError, match=r"completed 3 round\(s\).*N > 3"):
        resume_config(run, {}, 3, None)


def test_the_command_refuses_a_contradictory_option_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from privatune.cli import app

    run = _run_folder(tmp_path, **{"noise-multiplier": 1.0})
    for args, says in (
        (["--seed", "7"], "seed: the run in"),
        (["--no-dp"], "dp: the run in"),
        (["--out", str(tmp_path / "x")], "drop --out"),
    ):
        result = CliRunner().invoke(app, ["simulate", "--resume", str(run), *args])
        assert result.exit_code == 2 and says in result.output, result.output
    assert json.loads((run / "config.json").read_text())["seed"] == 42  # nothing was written


def test_resume_refuses_more_rounds_than_calibrated_noise_was_planned_for(tmp_path):
    run = _run_folder(tmp_path)  # noise calibrated to target-epsilon over 3 rounds
    with pytest.raises(ConfigError, match=r"calibrated so that 3 rounds reach target-epsilon=8.*initial-checkpoint"):
        resume_config(run, {}, 5, None)


# -- slow: real simulations -----------------------------------------------------------------------------------

SMALL = "max-records=200 local-epochs=1 noise-multiplier=1.0 batch-size=32"


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _simulate(tmp_path: Path, *args: str, rounds: int) -> list[str]:
    cmd = [sys.executable, "-m", "privatune.cli", "simulate", "--preset", "digits", "--clients", "2"]
    return [*cmd, "--rounds", str(rounds), "--epsilon", "50", "--run-config", SMALL, *args]


def _spends(run: Path) -> dict[str, list[tuple[str, int]]]:
    """Site ledger file -> its spends (run id, round) in ledger order, read without writing."""
    found = {}
    for path in sorted((run / "ledgers").glob("site-*.ledger.sqlite")):
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as conn:
                rows = conn.execute("SELECT run_id, round FROM spend ORDER BY seq").fetchall()
        except sqlite3.Error:
            continue  # not created yet
        found[path.name] = [(str(r), int(n)) for r, n in rows]
    return found


def _committed_round(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoint" / "checkpoint.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def _audit(run: Path) -> dict:
    """``privatune audit RUN`` in this process (its JSON), to spare a loaded machine one more interpreter start."""
    from privatune.common.audit.auditor import audit_paths
    from privatune.common.audit.render import report_to_json

    return report_to_json(audit_paths([run]))


def _kill_all(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the simulate process group and every descendant it had (Ray's may start their own sessions)."""
    from privatune.simulations.stopping import descendants

    family = [proc.pid, *descendants(proc.pid)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    alive = family
    while alive and time.monotonic() < deadline:
        alive = [p for p in family if Path(f"/proc/{p}").exists() and "Z" not in _state_of(p)]
        time.sleep(0.2)
    assert not alive, f"processes left running after the kill: {alive}"


def _state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_to_its_rounds_with_every_spend_recorded_once(tmp_path):
    run = tmp_path / "run"
    cmd = _simulate(tmp_path, "--out", str(run), rounds=2)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(tmp_path), cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    killed_in = 0
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            done = _committed_round(run)
            spent = [rnd for rows in _spends(run).values() for _, rnd in rows]
            if done >= 1 and spent and max(spent) > done:  # a site spent in a round the server has not completed
                killed_in = max(spent)
                break
            time.sleep(0.1)
    finally:
        _kill_all(proc)
    assert killed_in, "the run ended before a round could be killed mid-way"
    done = _committed_round(run)
    before = _spends(run)
    run_id = json.loads((run / "checkpoint" / "checkpoint.json").read_text())["run_id"]
    orphans = {site: [r for rid, r in rows if rid == run_id and r > done] for site, rows in before.items()}
    assert any(orphans.values())

    resumed = subprocess.run(
        [sys.executable, "-m", "privatune.cli", "simulate", "--resume", str(run)],
        capture_output=True, text=True, timeout=600, env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "did not complete" in resumed.stdout  # the orphan spend is named, not hidden
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2 and summary["run_id"] == run_id
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
    after = _spends(run)
    for site, rows in after.items():
        old = before.get(site, [])
        assert rows[: len(old)] == old  # no spend forgotten
        assert [r for _, r in rows[len(old) :]] == list(range(done + 1, 3))  # each resumed round spent once
        assert all(rid == run_id for rid, _ in rows)  # the same run: epsilon composes over all its spends
    assert summary["participation"] == {f"client-{i}": [1, 2] for i in range(2)}
    audit = _audit(run)
    assert audit["ok"] and audit["violations"] == []
    retried = [n for n in audit["notes"] if "a retried round, each spend counted" in n]
    assert len(retried) == sum(len(v) for v in orphans.values())


@pytest.mark.slow
def test_resuming_a_finished_run_continues_its_round_numbers(tmp_path):
    run = tmp_path / "run"
    first = subprocess.run(
        _simulate(tmp_path, "--out", str(run), rounds=1), capture_output=True, text=True, timeout=600,
        env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_id = json.loads((run / "summary.json").read_text())["run_id"]
    second = subprocess.run(
        [sys.executable, "-m", "privatune.cli", "simulate", "--resume", str(run), "--rounds", "2"],
        capture_output=True, text=True, timeout=600, env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_id"] == run_id and summary["num_server_rounds"] == 2 and summary["rounds_completed"] == 2
    assert summary["participation"] == {f"client-{i}": [1, 2] for i in range(2)}
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert {s: [r for _, r in rows] for s, rows in _spends(run).items()} == {
        f"site-client-{i}.ledger.sqlite": [1, 2] for i in range(2)
    }
    assert ckpt.load(run / "checkpoint").round == 2
    assert _audit(run)["ok"]


def test_a_new_run_starts_from_a_saved_model_and_refuses_another_kind(tmp_path):
    from privatune.server.app import initial_weights

    cfg = _cfg()
    fresh = initial_weights(cfg, "new")
    saved = {k: v.numpy() + 0.5 for k, v in fresh.arrays.items()}
    ckpt.save(tmp_path, ckpt.ServerCheckpoint("old", 4, saved, False, _card(cfg), {}))
    warm = initial_weights(cfg, "new", load_start(tmp_path))
    for k, v in warm.arrays.items():
        np.testing.assert_array_equal(v.numpy(), saved[k])
    with pytest.raises(ckpt.CheckpointError, match="labels: the checkpoint's are 0,1,2"):
        initial_weights(_cfg(labels="0,1,2,3,4,5,6,7,9,8"), "new", load_start(tmp_path))


def test_a_fresh_run_into_a_folder_with_an_earlier_runs_checkpoint_is_refused_before_any_round(tmp_path):
    from privatune.server.app import initial_weights, run_federation

    cfg = _cfg(**{"out-dir": str(tmp_path)})
    weights = {k: v.numpy() for k, v in initial_weights(cfg, "old").arrays.items()}
    ckpt.save(tmp_path / "checkpoint", ckpt.ServerCheckpoint("old", 1, weights, False, _card(cfg), {}))
    with pytest.raises(ckpt.CheckpointError, match=r"holds the checkpoint of an earlier run.*--resume"):
        run_federation(None, cfg, "new")  # type: ignore[arg-type]  # refused before the grid is used
    assert not (tmp_path / "summary.json").exists()


def test_an_encrypted_checkpoint_round_trips_and_stays_under_its_key(tmp_path):
    from privatune.common import he
    from privatune.server.app import check_he_key

    keys = he.write_keys(tmp_path / "keys")
    public = he.load_context(keys.public, require_secret=False)
    secret = he.load_context(keys.secret, require_secret=True)
    enc = he.encrypt_state(public, _state(0.75))
    ckpt.save(tmp_path / "c", ckpt.ServerCheckpoint("9", 2, enc, True, _card(_cfg()), {}))
    got = ckpt.load(tmp_path / "c")
    assert got.encrypted and got.round == 2 and got.card["model"] == "digits-cnn"
    np.testing.assert_allclose(he.decrypt_state(secret, got.weights)["head.bias"], _state(0.75)["head.bias"], atol=1e-5)
    check_he_key(got, public)  # the run's own key: accepted
    other = he.load_context(he.write_keys(tmp_path / "other").public, require_secret=False)
    with pytest.raises(ckpt.CheckpointError, match="encrypted under HE key"):
        check_he_key(got, other)
    with pytest.raises(ckpt.CheckpointError, match="decrypt it first"):
        check_matches(got, _cfg(), "initial-checkpoint")
