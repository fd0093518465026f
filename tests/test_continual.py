"""Continual federations (issue 15, "data that arrives over time"): the stage split, the figures, the stage run
configs, and (slow) three-stage runs whose records' budgets carry over in the shared site ledgers."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from privatune.common.config import ConfigError, RunConfig
from privatune.common.stages import (
    average_accuracy,
    backward_transfer,
    forgetting,
    label_groups,
    rehearsed,
    stage_chunks,
    stage_test_indices,
    stage_train_indices,
)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**over: object) -> RunConfig:
    return RunConfig.from_flower({"preset": "digits", "max-records": 300, "partition": "iid", **over})


# -- the split ----------------------------------------------------------------------------------------------------


def _check_partition_of(chunks: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(chunks)
    assert len(joined) == n and len(np.unique(joined)) == n  # disjoint, and together every record
    assert set(joined.tolist()) == set(range(n))


@pytest.mark.parametrize("stages", [1, 3, 4])
def test_iid_chunks_are_disjoint_cover_everything_and_are_near_equal(stages):
    labels = np.random.default_rng(0).integers(0, 10, size=101)
    chunks = stage_chunks(labels, stages, "iid", seed=7, num_labels=10)
    assert len(chunks) == stages
    _check_partition_of(chunks, 101)
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1
    again = stage_chunks(labels, stages, "iid", seed=7, num_labels=10)
    assert all(np.array_equal(a, b) for a, b in zip(chunks, again, strict=True))  # a function of the seed
    if stages > 1:
        other = stage_chunks(labels, stages, "iid", seed=8, num_labels=10)
        assert not all(np.array_equal(a, b) for a, b in zip(chunks, other, strict=True))


def test_class_incremental_chunks_bring_the_labels_in_label_order():
    labels = np.random.default_rng(1).integers(0, 10, size=400)
    chunks = stage_chunks(labels, 3, "class", seed=0, num_labels=10)
    _check_partition_of(chunks, 400)
    groups = label_groups(10, 3)
    assert [g.tolist() for g in groups] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for chunk, group in zip(chunks, groups, strict=True):
        assert set(labels[chunk].tolist()) == set(group.tolist())
    # every label of a later stage is above every label of an earlier one
    for a, b in itertools.pairwise(chunks):
        assert labels[a].max() < labels[b].min()
    with pytest.raises(ValueError, match="cannot split 10 labels into 11 stages"):
        stage_chunks(labels, 11, "class", seed=0, num_labels=10)


def test_without_rehearsal_a_stage_trains_only_its_new_records():
    labels = np.arange(90) % 10
    chunks = stage_chunks(labels, 3, "iid", seed=3, num_labels=10)
    for s in (1, 2, 3):
        got = stage_train_indices(labels, 3, s, "iid", 0.0, seed=3, num_labels=10)
        assert np.array_equal(got, chunks[s - 1])
    # rehearsal never changes what stage 1 trains: nothing came before it
    assert np.array_equal(stage_train_indices(labels, 3, 1, "iid", 0.5, seed=3, num_labels=10), chunks[0])


def test_rehearsal_mixes_a_fixed_fraction_of_every_earlier_chunk_into_later_stages():
    labels = np.arange(90) % 10
    chunks = stage_chunks(labels, 3, "iid", seed=3, num_labels=10)
    third = stage_train_indices(labels, 3, 3, "iid", 0.25, seed=3, num_labels=10)
    second = stage_train_indices(labels, 3, 2, "iid", 0.25, seed=3, num_labels=10)
    for j in (0, 1):
        kept = np.intersect1d(third, chunks[j])
        assert len(kept) == math.ceil(0.25 * len(chunks[j]))
        assert np.array_equal(kept, rehearsed(chunks[j], 0.25, 3, j + 1))
    assert set(chunks[2].tolist()) <= set(third.tolist())
    # the buffer is the same in every later stage: stage 3 rehearses the chunk-1 records stage 2 did
    assert np.array_equal(np.intersect1d(second, chunks[0]), np.intersect1d(third, chunks[0]))
    everything = stage_train_indices(labels, 3, 3, "iid", 1.0, seed=3, num_labels=10)
    assert np.array_equal(everything, np.arange(90))


def test_each_stage_scores_on_its_own_test_records():
    test = np.arange(60) % 10
    iid = stage_test_indices(test, 3, "iid", seed=42, num_labels=10)
    _check_partition_of(iid, 60)
    cls = stage_test_indices(test, 3, "class", seed=42, num_labels=10)
    assert [sorted(set(test[c].tolist())) for c in cls] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_a_clients_stage_records_are_its_partitions_chunks():
    from privatune.common.federation_data import client_records, client_stage_seed

    whole = client_records(_cfg(), 0, 2)
    seen = []
    for s in (1, 2, 3):
        part = client_records(_cfg(**{"sim-stages": 3, "sim-stage": s}), 0, 2)
        chunk = stage_chunks(whole.labels, 3, "iid", client_stage_seed(42, 0), 10)[s - 1]
        assert np.array_equal(part.inputs, whole.inputs[chunk]) and np.array_equal(part.labels, whole.labels[chunk])
        seen.append(len(part))
    assert sum(seen) == len(whole)
    cls = client_records(_cfg(**{"sim-stages": 2, "sim-stage": 2, "sim-stage-split": "class"}), 1, 2)
    assert set(cls.labels.tolist()) <= {5, 6, 7, 8, 9}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"sim-stage": 1}, "sim-stage: needs sim-stages > 0"),
        ({"sim-rehearsal": 0.5}, "sim-rehearsal: needs sim-stages > 0"),
        ({"sim-stages": 3, "sim-stage": 4}, r"sim-stage: must be in 1\.\.3"),
        ({"sim-stages": 3, "sim-stage": 1, "sim-rehearsal": 1.5}, "sim-rehearsal: must be a fraction"),
        ({"sim-stages": 3, "sim-stage": 1, "sim-stage-split": "x"}, "sim-stage-split: must be one of iid, class"),
        ({"sim-stages": 11, "sim-stage": 1, "sim-stage-split": "class"}, "needs at least that many labels"),
    ],
)
def test_bad_stage_keys_are_refused_by_name(over, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**over)


# -- the figures --------------------------------------------------------------------------------------------------

# acc[i][j]: accuracy on stage j+1's test set after training stage i+1
ACC = [[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]]


def test_average_accuracy_forgetting_and_backward_transfer_by_hand():
    assert average_accuracy(ACC, 1) == pytest.approx(0.9)
    assert average_accuracy(ACC, 2) == pytest.approx(0.7)
    assert average_accuracy(ACC, 3) == pytest.approx(0.7)
    assert forgetting(ACC, 1) is None and backward_transfer(ACC, 1) is None
    assert forgetting(ACC, 2) == pytest.approx(0.3)  # 0.9 - 0.6
    assert backward_transfer(ACC, 2) == pytest.approx(-0.3)
    # stage 1: best before 0.9, now 0.5 -> 0.4; stage 2: best 0.8, now 0.7 -> 0.1
    assert forgetting(ACC, 3) == pytest.approx(0.25)
    # ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert backward_transfer(ACC, 3) == pytest.approx(-0.25)


def test_forgetting_uses_the_best_earlier_accuracy_and_bwt_the_one_right_after_training():
    acc = [[0.5], [0.8, 0.6], [0.7, 0.6, 0.9]]  # stage 1 improved after stage 2, then dropped
    assert forgetting(acc, 3) == pytest.approx(((0.8 - 0.7) + (0.6 - 0.6)) / 2)
    assert backward_transfer(acc, 3) == pytest.approx(((0.7 - 0.5) + (0.6 - 0.6)) / 2)


def test_results_json_plot_and_table(tmp_path):
    from privatune.cli.continual import continual_table
    from privatune.simulations.continual import CONTINUAL_JSON, CONTINUAL_PLOT, write_results

    rows = [{"stage": s, "folder": f"stage-{s}", "max_client_epsilon": e} for s, e in ((1, 1.0), (2, 1.5), (3, 1.2))]
    summary = write_results(tmp_path, _cfg(), 3, "iid", 0.2, [list(r) for r in ACC], rows, "completed")
    assert summary["stages_completed"] == 3 and summary["max_stage_epsilon"] == 1.5
    assert summary["forgetting"] == pytest.approx(0.25) and summary["backward_transfer"] == pytest.approx(-0.25)
    result = json.loads((tmp_path / CONTINUAL_JSON).read_text())
    assert [r["accuracy"] for r in result["per_stage"]] == ACC
    assert (tmp_path / CONTINUAL_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    assert continual_table(result).row_count == 3


def test_stage_configs_chain_the_stages_and_share_the_ledgers(tmp_path):
    from privatune.simulations.continual import stage_configs

    cfgs = stage_configs(_cfg(), tmp_path, 3, "class", 0.3)
    assert [c.sim_stage for c in cfgs] == [1, 2, 3]
    assert {c.sim_ledger_dir for c in cfgs} == {str((tmp_path / "ledgers").resolve())}
    assert [c.out_dir for c in cfgs] == [str((tmp_path / f"stage-{s}").resolve()) for s in (1, 2, 3)]
    assert [c.initial_checkpoint for c in cfgs] == ["", cfgs[0].out_dir, cfgs[1].out_dir]
    assert all(c.sim_stage_split == "class" and c.sim_rehearsal == 0.3 for c in cfgs)
    with pytest.raises(ConfigError, match="--stages: a continual run scores"):
        stage_configs(_cfg(**{"secure-aggregation": "he"}), tmp_path, 3, "iid", 0.0)


def test_stage_options_are_checked_on_the_command_line():
    from privatune.cli.inputs import UsageError
    from privatune.cli.simulation import check_stage_options

    with pytest.raises(UsageError, match="go with --stages S"):
        check_stage_options(0, False, 0.5, False)
    with pytest.raises(UsageError, match="go with --stages S"):
        check_stage_options(0, True, 0.0, False)
    with pytest.raises(UsageError, match="cannot be resumed"):
        check_stage_options(3, False, 0.0, True)
    with pytest.raises(UsageError, match=r"--rehearsal is a fraction"):
        check_stage_options(3, False, 2.0, False)
    with pytest.raises(UsageError, match=r"--run-config sim-stage, sim-stages: set per stage by --stages S"):
        check_stage_options(0, False, 0.0, False, {"sim-stages", "sim-stage", "lr"})
    check_stage_options(3, True, 0.5, False, {"lr"})


# -- slow: three-stage runs ---------------------------------------------------------------------------------------

SMALL = "max-records=300 local-epochs=1 noise-multiplier=1.0 batch-size=32 partition=iid"


def _record_stages(run: Path, client: int, split: str, rehearsal: float) -> dict[bytes, tuple[int, set[int]]]:
    """Record id -> (the stage its record arrived in, the stages whose training spends hold it), from the
    shared site ledger, the site key and the stage split."""
    from privatune.client.record_ids import record_ids
    from privatune.client.site_secret import default_key_path, load_site_key
    from privatune.common.federation_data import client_records, client_stage_seed
    from privatune.common.ledger import SiteLedger

    cfg = _cfg(**{"max-records": 300})
    whole = client_records(cfg, client, 2)
    ledger = run / "ledgers" / f"site-client-{client}.ledger.sqlite"
    ids = record_ids(load_site_key(default_key_path(ledger), may_create=False), whole)
    chunks = stage_chunks(whole.labels, 3, split, client_stage_seed(42, client), 10)
    arrived = {ids[i]: s for s, chunk in enumerate(chunks, start=1) for i in chunk.tolist()}
    run_stage = {json.loads((run / f"stage-{s}" / "summary.json").read_text())["run_id"]: s for s in (1, 2, 3)}
    site = SiteLedger(ledger)
    cohorts = site.cohorts()
    held: dict[bytes, set[int]] = {i: set() for i in ids}
    for rec in site.entries():
        if rec.entry.purpose != "train":
            continue
        for rid in cohorts[rec.entry.cohort_id]:
            held[rid].add(run_stage[rec.entry.run_id])
    return {i: (arrived[i], held[i]) for i in ids}


def _continual(tmp_path: Path, run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "privatune.cli", "simulate", "--preset", "digits", "--clients", "2", "--rounds", "1"]
    cmd += ["--epsilon", "50", "--run-config", SMALL, "--stages", "3", "--out", str(run), *extra]
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)


def _audits_clean(run: Path) -> None:
    from privatune.common.audit import audit_paths

    report = audit_paths([run])
    assert report.ok, report


@pytest.mark.slow
def test_three_stages_with_rehearsal_compose_a_rehearsed_records_spends(tmp_path):
    run = tmp_path / "run"
    proc = _continual(tmp_path, run, "--rehearsal", "0.5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run / "continual.json").read_text())
    assert [r["stage"] for r in result["per_stage"]] == [1, 2, 3]
    assert [len(r["accuracy"]) for r in result["per_stage"]] == [1, 2, 3]
    assert result["per_stage"][2]["backward_transfer"] == pytest.approx(
        np.mean([result["accuracy_matrix"][2][j] - result["accuracy_matrix"][j][j] for j in (0, 1)])
    )
    assert (run / "continual.png").exists() and "forgetting" in proc.stdout
    for client in (0, 1):
        records = _record_stages(run, client, "iid", 0.5)
        trained = {i: (a, h) for i, (a, h) in records.items() if h}  # validation records never train
        assert len(trained) > 0.8 * len(records)
        for arrived, held in trained.values():
            assert min(held) == arrived  # nothing trains before it arrives
            assert held in ({arrived}, set(range(arrived, 4)))  # only its stage, or rehearsed in every later one
        rehearsed_from_1 = [h for a, h in trained.values() if a == 1 and h == {1, 2, 3}]
        assert rehearsed_from_1  # a stage-1 record trained again in stages 2 and 3: its spends compose
    # the cost is in the ledger: a later stage's worst record has spent more than that stage's run alone
    from privatune.common.ledger import SiteLedger

    rows = [r.entry for r in SiteLedger(run / "ledgers" / "site-client-0.ledger.sqlite").entries()]
    later = [e for e in rows if e.purpose == "train" and e.run_id != rows[0].run_id]
    assert later and all(e.epsilon_dataset > e.epsilon_run + 1e-6 for e in later)
    _audits_clean(run)


@pytest.mark.slow
def test_three_class_incremental_stages_without_rehearsal_spend_each_record_in_its_stage_only(tmp_path):
    run = tmp_path / "run"
    proc = _continual(tmp_path, run, "--class-incremental")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run / "continual.json").read_text())
    assert len(result["per_stage"]) == 3 and result["split"] == "class"
    assert json.loads((run / "summary.json").read_text())["stages_completed"] == 3
    for client in (0, 1):
        records = _record_stages(run, client, "class", 0.0)
        assert all(held in (set(), {arrived}) for arrived, held in records.values())
        assert {a for a, h in records.values() if h} == {1, 2, 3}
    from privatune.common.ledger import SiteLedger

    for e in (r.entry for r in SiteLedger(run / "ledgers" / "site-client-1.ledger.sqlite").entries()):
        if e.purpose == "train":  # new records start fresh: a stage's spend is its records' whole history
            assert e.epsilon_dataset == pytest.approx(e.epsilon_run)
    _audits_clean(run)
