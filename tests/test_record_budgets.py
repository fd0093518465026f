"""Budgets that follow records: keyed ids, the site key, per-record exclusion, and each old bypass refused.

Each bypass test trains one run at a real site (an .npz of digits), then retries with the change the review found
restarted the budget at zero; the epsilon already spent on the old records must still count.
"""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import UTC

import numpy as np
import pytest
from sklearn.datasets import load_digits

from privatune.client.app import train
from privatune.client.privacy_guard import PrivacyGuard
from privatune.client.record_ids import dataset_fingerprint, key_check, record_ids, validation_split
from privatune.client.site_secret import SiteSecretError, default_key_path, load_site_key
from privatune.common.config import RunConfig
from privatune.common.datasets import LabelledData
from privatune.common.ledger import SiteLedger, read_rows
from privatune.common.mechanism import DPMechanism
from privatune.common.record_budget import record_epsilons
from tests.helpers.messages import initial_state, make_context, make_message

N = 120
MAX_EPS = 3.5  # one run at target-epsilon 3 fits; a second on the same records (3.86) does not


def _write(tmp_path, x, y, name="site.npz"):
    path = tmp_path / name
    np.savez(path, x=x, y=np.array([str(v) for v in y]))
    return path


def _digits(n=N, start=0):
    bunch = load_digits()
    return bunch.images[start : start + n], bunch.target[start : start + n]


def _node(tmp_path, data, **kw):
    return {
        "site-id": "h",
        "data-path": str(data),
        "ledger-path": str(tmp_path / "site-h.ledger.sqlite"),
        "max-epsilon": MAX_EPS,
        "on-exhausted": "refuse",
        **kw,
    }


def _cfg(tmp_path, **kw):
    values = dict(preset="digits", local_epochs=1, num_server_rounds=1, target_epsilon=3.0, out_dir=str(tmp_path))
    values.update(kw)
    return RunConfig.create(**values)


def _train(cfg, node, run_id):
    return train(make_message(cfg, initial_state(cfg)), make_context(node, run_id=run_id)).content


def _spends(tmp_path):
    return SiteLedger(tmp_path / "site-h.ledger.sqlite").entries()


@pytest.fixture
def trained_site(tmp_path):
    """A site that trained one run on N records: (data path, node config, reply)."""
    x, y = _digits()
    data = _write(tmp_path, x, y)
    node = _node(tmp_path, data)
    reply = _train(_cfg(tmp_path), node, run_id=1)
    assert reply["status"]["status"] == "trained", reply["status"]["reason"]
    assert 2.5 < reply["metrics"]["epsilon-dataset"] <= MAX_EPS
    return data, node, reply


def _assert_refused_for_budget(tmp_path, reply):
    assert reply["status"]["status"] == "budget-exhausted", reply["status"]["reason"]
    assert f"max-epsilon={MAX_EPS:g}" in reply["status"]["reason"]
    assert len(_spends(tmp_path)) == 1  # nothing new was spent


# ----------------------------------------------------------------------------------------- each bypass refused


def test_one_record_added_does_not_restart_the_budget(tmp_path, trained_site):
    _data, node, _ = trained_site
    x, y = _digits(N + 1)
    _write(tmp_path, x, y)  # the same file with one record appended
    _assert_refused_for_budget(tmp_path, _train(_cfg(tmp_path), node, run_id=2))


def test_shuffled_file_does_not_restart_the_budget(tmp_path, trained_site):
    _data, node, _ = trained_site
    x, y = _digits()
    order = np.random.default_rng(0).permutation(N)
    _write(tmp_path, x[order], y[order])
    _assert_refused_for_budget(tmp_path, _train(_cfg(tmp_path), {**node, "on-exhausted": "exclude"}, run_id=2))


def test_reordered_labels_do_not_restart_the_budget(tmp_path, trained_site):
    _, node, _ = trained_site
    cfg = _cfg(tmp_path, labels=",".join(str(d) for d in range(9, -1, -1)))
    _assert_refused_for_budget(tmp_path, _train(cfg, node, run_id=2))


def test_an_added_label_does_not_restart_the_budget(tmp_path, trained_site):
    _, node, _ = trained_site
    cfg = _cfg(tmp_path, labels=",".join([*(str(d) for d in range(10)), "unknown"]))
    _assert_refused_for_budget(tmp_path, _train(cfg, node, run_id=2))


def test_another_validation_split_does_not_restart_the_budget(tmp_path, trained_site):
    _, node, _ = trained_site
    _assert_refused_for_budget(tmp_path, _train(_cfg(tmp_path, val_fraction=0.3), node, run_id=2))


def test_a_looser_delta_is_refused(tmp_path, trained_site):
    _, node, first = trained_site
    assert first["metrics"]["delta"] == pytest.approx(1e-5)  # the site's default
    reply = _train(_cfg(tmp_path, delta=2.5e-3), node, run_id=2)
    assert reply["status"]["status"] == "refused" and "looser delta" in reply["status"]["reason"]
    assert len(_spends(tmp_path)) == 1


def test_a_site_delta_not_below_a_tenth_of_one_over_n_is_refused(tmp_path):
    x, y = _digits()
    node = _node(tmp_path, _write(tmp_path, x, y), delta=1e-3)  # 0.1/120 = 8.3e-4
    reply = _train(_cfg(tmp_path), node, run_id=1)
    assert reply["status"]["status"] == "refused" and "node-config delta" in reply["status"]["reason"]


# ----------------------------------------------------------------------------------------- new records


def test_new_records_train_on_their_own_budget_and_exhausted_ones_are_left_out(tmp_path, trained_site):
    _, node, _ = trained_site
    x, y = _digits(N + 60)
    _write(tmp_path, x, y)
    refused = _train(_cfg(tmp_path), node, run_id=2)  # on-exhausted=refuse: no partial round
    assert refused["status"]["status"] == "budget-exhausted" and "on-exhausted=refuse" in refused["status"]["reason"]

    reply = _train(_cfg(tmp_path), {**node, "on-exhausted": "exclude"}, run_id=3)
    assert reply["status"]["status"] == "trained", reply["status"]["reason"]
    assert "excluded" not in " ".join(reply["metrics"].keys())  # how many were left out stays at the site
    first, second = _spends(tmp_path)
    cohorts = SiteLedger(tmp_path / "site-h.ledger.sqlite").cohorts()
    old, new = cohorts[first.entry.cohort_id], cohorts[second.entry.cohort_id]
    assert not old & new  # no record of the first run trained again
    assert reply["metrics"]["num-examples"] == len(new) and 40 <= len(new) <= 60
    # Every record, old or new, stays within the site budget.
    key = load_site_key(default_key_path(tmp_path / "site-h.ledger.sqlite"))
    spends = PrivacyGuard(tmp_path / "site-h.ledger.sqlite", "h", MAX_EPS, key_check=key_check(key)).spends()
    eps = record_epsilons(sorted(old | new), cohorts, spends, 1e-5, first.entry.accountant)
    assert eps.worst <= MAX_EPS + 1e-9
    assert reply["metrics"]["epsilon-dataset"] == pytest.approx(
        max(e for rid, e in zip(sorted(old | new), eps.spent, strict=True) if rid in new)
    )


def test_exclusion_reaches_a_fixed_point(tmp_path):
    """Leaving records out raises the sample rate; the plan iterates until every kept record fits."""
    ids = [bytes([i]) * 16 for i in range(200)]
    guard = PrivacyGuard(tmp_path / "l.ledger.sqlite", "s", max_epsilon=4.0)
    cfg = _cfg(tmp_path, noise_multiplier=1.2, batch_size=16, local_epochs=2, target_epsilon=50.0, accountant="rdp")
    first = guard.plan(cfg, "r1", ids[:100])
    assert first.allowed and first.train == tuple(range(100))
    guard.record(first, cfg, "r1", 1, ids[:100], "fp", "pf", _now())
    plan = guard.plan(cfg, "r2", ids)
    assert plan.allowed and plan.excluded == 100 and plan.train == tuple(range(100, 200))
    assert plan.sample_rate == pytest.approx(1 / -(-len(plan.train) // 16))
    eps = guard.epsilons([ids[i] for i in plan.train], cfg.accountant, new=[plan.mechanism])
    assert eps.worst <= 4.0 + 1e-9 and eps.worst == pytest.approx(plan.epsilon_dataset)


def test_generic_spend_api_records_a_metrics_release_on_validation_records(tmp_path):
    ids = [bytes([i]) * 16 for i in range(30)]
    guard = PrivacyGuard(tmp_path / "l.ledger.sqlite", "s", max_epsilon=None)
    before = guard.epsilons(ids[:10], "rdp", new=[(5.0, 1.0, 1)])
    guard.record_spend(
        purpose="metrics",
        record_ids=ids[:10],
        mechanism=DPMechanism(5.0, 1.0, 1, max_grad_norm=1.0, delta=1e-5, accountant="rdp"),
        run_id="r",
        server_round=1,
        dataset_fingerprint="fp",
        params_fingerprint="pf",
        epsilon_run=before.worst_run,
        epsilon_dataset=before.worst,
        started_at=_now(),
    )
    after = guard.epsilons(ids, "rdp")
    assert after.spent[:10] == [pytest.approx(before.worst)] * 10 and after.spent[10:] == [0.0] * 20
    (row,) = guard.ledger.entries()
    assert row.entry.purpose == "metrics"


def _now():
    from datetime import datetime

    return datetime.now(UTC)


# ----------------------------------------------------------------------------------------- what leaves the site


def test_the_server_cannot_test_candidates_for_the_last_record(tmp_path, trained_site):
    data, _node, reply = trained_site
    sent = {str(v) for rec in ("status", "metrics") for v in reply[rec].values()}
    from privatune.client.site_data import SiteDataSpec, load_site_data

    known = load_site_data(SiteDataSpec(data, "npz"), tuple("0123456789"), kind="image")
    # The server knows records 0..N-2 and tries every candidate for the last one, including the true one.
    candidates = [known.subset(np.arange(N))]
    pool = load_site_data(
        SiteDataSpec(_write(tmp_path, *_digits(40, start=500), name="c.npz"), "npz"), tuple("0123456789"), kind="image"
    )
    for j in range(len(pool)):
        cand = np.concatenate([known.inputs[: N - 1], pool.inputs[j : j + 1]])
        labels = np.concatenate([known.labels[: N - 1], pool.labels[j : j + 1]])
        candidates.append(LabelledData("c", "image", cand, labels, known.label_names))
    unkeyed = {c.fingerprint() for c in candidates}
    unkeyed |= {hashlib.sha256(c.inputs.tobytes()).hexdigest() for c in candidates}
    assert not unkeyed & sent
    assert reply["status"]["dataset-fingerprint"] in sent  # what links the audit rows is keyed
    assert all(r["dataset_fingerprint"] not in unkeyed for r in read_rows(tmp_path / "site-h.ledger.sqlite", "spend"))


def test_two_sites_with_identical_data_send_different_fingerprints(tmp_path):
    x, y = _digits()
    fps = []
    for site in ("a", "b"):
        folder = tmp_path / site
        folder.mkdir()
        node = {**_node(folder, _write(folder, x, y)), "site-id": site}
        reply = _train(_cfg(folder), node, run_id=1)
        assert reply["status"]["status"] == "trained"
        fps.append(reply["status"]["dataset-fingerprint"])
    assert fps[0] != fps[1]


def test_key_file_is_owner_only_reused_and_a_readable_one_refused(tmp_path, trained_site):
    _, node, first = trained_site
    key_path = default_key_path(tmp_path / "site-h.ledger.sqlite")
    assert key_path.name == "site-h.ledger.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = key_path.read_bytes()
    second = _train(_cfg(tmp_path, num_server_rounds=2), {**node, "max-epsilon": 100.0}, run_id=2)
    assert second["status"]["status"] == "trained"
    assert key_path.read_bytes() == key  # reused, not replaced
    assert second["status"]["dataset-fingerprint"] == first["status"]["dataset-fingerprint"]
    os.chmod(key_path, 0o644)
    refused = _train(_cfg(tmp_path), node, run_id=3)
    assert refused["status"]["status"] == "refused" and "chmod 600" in refused["status"]["reason"]
    os.chmod(key_path, 0o600)
    key_path.unlink()  # a lost key next to a ledger of keyed spends is not silently replaced
    lost = _train(_cfg(tmp_path), node, run_id=4)
    assert lost["status"]["status"] == "refused" and "restore the key" in lost["status"]["reason"]
    assert not key_path.exists()
    other = os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600)  # another key put in its place
    os.write(other, os.urandom(32))
    os.close(other)
    swapped = _train(_cfg(tmp_path), node, run_id=5)
    assert swapped["status"]["status"] == "refused" and "does not match" in swapped["status"]["reason"]
    assert len(_spends(tmp_path)) == 2


def test_a_key_created_by_two_processes_at_once_is_one_key(tmp_path):
    path = tmp_path / "k.key"
    keys = {load_site_key(path) for _ in range(3)}
    assert len(keys) == 1 and len(next(iter(keys))) == 32
    (tmp_path / "bad.key").write_bytes(b"short")
    os.chmod(tmp_path / "bad.key", 0o600)
    with pytest.raises(SiteSecretError, match="restore it"):
        load_site_key(tmp_path / "bad.key")


# ----------------------------------------------------------------------------------------- ids and the split


def _toy(texts, labels=None, names=("a", "b")):
    labels = np.array(labels if labels is not None else [0] * len(texts), dtype=np.int64)
    return LabelledData("t", "text", list(texts), labels, names)


def test_record_ids_are_stable_under_appends_shuffles_and_relabelling():
    key = os.urandom(32)
    texts = [f"note {i}" for i in range(50)] + ["same", "same"]
    ids = record_ids(key, _toy(texts))
    assert len(set(ids)) == len(ids)  # identical inputs get distinct ids by occurrence
    assert record_ids(key, _toy([*texts, "new"]))[:-1] == ids
    perm = np.random.default_rng(1).permutation(len(texts))
    assert sorted(record_ids(key, _toy([texts[i] for i in perm]))) == sorted(ids)
    assert record_ids(key, _toy(texts, [1] * len(texts), ("x", "y"))) == ids  # labels are not part of the id
    assert set(record_ids(os.urandom(32), _toy(texts))).isdisjoint(ids)
    assert dataset_fingerprint(key, ids) == dataset_fingerprint(key, ids[::-1])


def test_validation_split_is_keyed_stable_and_grows_with_the_fraction():
    key = os.urandom(32)
    ids = record_ids(key, _toy([f"r{i}" for i in range(400)]))
    tr1, va1 = validation_split(key, ids, 0.1)
    _, va2 = validation_split(key, ids, 0.2)
    assert set(va1) <= set(va2) and 15 <= len(va1) <= 70
    assert np.array_equal(validation_split(key, ids, 0.1)[1], va1)
    assert sorted(np.concatenate([tr1, va1]).tolist()) == list(range(400))
    # A record's side depends on its id alone, not on the other records.
    va_sub = validation_split(key, ids[:200], 0.1)[1]
    assert set(va_sub) == {i for i in va1 if i < 200}
    assert len(validation_split(key, ids[:1], 0.4)[0]) == 1  # training is never emptied


# ----------------------------------------------------------------------------------------- the audit


def test_the_audit_links_site_and_server_rows_by_the_keyed_fingerprint(tmp_path, trained_site):
    from privatune.common.audit import audit_paths
    from privatune.common.ledger import SERVER_LEDGER_NAME, ServerLedger

    _, _, reply = trained_site
    m, st = reply["metrics"], reply["status"]
    srv = ServerLedger(tmp_path / SERVER_LEDGER_NAME)
    srv.record_run("1", {"num-server-rounds": 1}, "plain")
    srv.record_report(
        "1",
        1,
        st["client-id"],
        1,
        status="trained",
        noise_multiplier=m["noise-multiplier"],
        sample_rate=m["sample-rate"],
        steps=m["steps"],
        max_grad_norm=m["max-grad-norm"],
        delta=m["delta"],
        accountant=st["accountant"],
        epsilon_reported=m["epsilon"],
        epsilon_dataset_reported=m["epsilon-dataset"],
        dataset_fingerprint=st["dataset-fingerprint"],
    )
    report = audit_paths([tmp_path])
    assert report.ok, [v.message for v in report.violations]
    site_rows = [e for e in report.entries if e.source == "site"]
    assert [e.dataset_fingerprint for e in site_rows] == [st["dataset-fingerprint"]]
    assert site_rows[0].epsilon_dataset == pytest.approx(m["epsilon-dataset"], abs=1e-6)
    # A server record with another fingerprint no longer matches the site's row.
    srv.record_report(
        "1",
        1,
        st["client-id"],
        1,
        status="trained",
        noise_multiplier=m["noise-multiplier"],
        sample_rate=m["sample-rate"],
        steps=m["steps"],
        max_grad_norm=m["max-grad-norm"],
        delta=m["delta"],
        accountant=st["accountant"],
        epsilon_reported=m["epsilon"],
        dataset_fingerprint=hashlib.sha256(b"guess").hexdigest(),
    )
    assert any(v.kind == "report-mismatch" for v in audit_paths([tmp_path]).violations)
