"""Budget pre-flight: `privatune site check` projects the whole announced run against the site's budget, and
`privatune budget` shows what each dataset of the ledger has spent, composed as the guard composes it.

Every expected epsilon here comes from the accountants' pure functions (common/accounting.py), and every refusal
from the real privacy guard planning and recording round after round on a copy of the ledger."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from privatune.cli import app
from privatune.client.privacy_guard import PrivacyGuard
from privatune.client.round import load_local_data
from privatune.client.site_check import check_site
from privatune.client.site_config import SiteConfig
from privatune.client.site_secret import default_key_path
from privatune.common.accounting import calibrate_noise, epsilon_of, sample_rate, steps_per_epoch
from privatune.common.config import RunConfig
from privatune.common.ledger import read_rows
from privatune.common.mechanism import DPMechanism

ROUNDS, EPOCHS, BATCH, TARGET, DELTA, ACC = 3, 2, 32, 8.0, 1e-5, "rdp"
RUN = {
    "preset": "digits",
    "num-server-rounds": str(ROUNDS),
    "local-epochs": str(EPOCHS),
    "batch-size": str(BATCH),
    "target-epsilon": str(TARGET),
    "accountant": ACC,
}
DATASET_ACC = "pld"  # composing several distinct mechanisms: PLD is the fastest accountant for that
RUN_TEXT = " ".join(f"{k}={v}" for k, v in RUN.items())


def _node(tmp_path: Path, max_epsilon: float | None = None, n: int = 200) -> dict[str, str]:
    """A digits site: n synthetic 28x28 images (dark background) in an npz the test writes."""
    data = tmp_path / "digits.npz"
    if not data.exists():
        rng = np.random.default_rng(0)
        x = (rng.random((n, 28, 28)) * 0.3).astype(np.float32)
        np.savez(data, x=x, y=np.arange(n) % 10)
    node = {"site-id": "a", "data-path": str(data), "ledger-path": str(tmp_path / "site-a.ledger.sqlite")}
    if max_epsilon is not None:
        node["max-epsilon"] = f"{max_epsilon!r}"
    return node


def _kv(node: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in node.items())


def _local(node: dict[str, str]):
    """The site's training records exactly as a round opens them (client/round.py)."""
    cfg = RunConfig.from_flower(RUN)
    site = SiteConfig.from_node_config(node, cfg)
    return cfg, site, load_local_data(cfg, site)


def _independent_run_mechanism(n_train: int) -> tuple[float, float, int]:
    """What one round of the run costs, from the accounting functions alone: sigma calibrated so that all
    ROUNDS rounds reach TARGET, sample rate 1/ceil(n/B), EPOCHS local epochs of ceil(n/B) steps each."""
    q, steps = sample_rate(n_train, BATCH), EPOCHS * steps_per_epoch(n_train, BATCH)
    sigma = calibrate_noise(TARGET, DELTA, q, ROUNDS * steps, ACC)
    return sigma, q, steps


def _ledger_state(path: Path) -> tuple[str, int, str]:
    """The ledger's bytes (sha256), its spend row count and its chain head."""
    rows = read_rows(path, "spend")
    return hashlib.sha256(path.read_bytes()).hexdigest(), len(rows), rows[-1]["hash"] if rows else ""


def _guard(node: dict[str, str], key_check: str) -> PrivacyGuard:
    return PrivacyGuard(
        node["ledger-path"],
        "a",
        SiteConfig.from_node_config(node, RunConfig.from_flower(RUN)).max_epsilon,
        DELTA,
        "exclude",
        key_check,
    )


def _spend(guard: PrivacyGuard, ids, mech: tuple[float, float, int], run: str, fp: str = "fp", rnd: int = 1) -> None:
    guard.record_spend(
        purpose="train",
        record_ids=list(ids),
        mechanism=DPMechanism(*mech, max_grad_norm=1.0, delta=DELTA, accountant=ACC),
        run_id=run,
        server_round=rnd,
        dataset_fingerprint=fp,
        params_fingerprint="pf",
        epsilon_run=0.0,
        epsilon_dataset=0.0,
        started_at=datetime.now(UTC),
    )


def _replay(node: dict[str, str], folder: Path) -> list[int | None]:
    """Run the real guard (plan, then the write-ahead record) for rounds 1..ROUNDS on a copy of the site's ledger
    and key: the records each round trains on, None for a refused round (and it stops there)."""
    folder.mkdir()
    copy = dict(node, **{"ledger-path": str(folder / "site-a.ledger.sqlite")})
    src, dst = Path(node["ledger-path"]), Path(copy["ledger-path"])
    shutil.copy2(src, dst)
    shutil.copy2(default_key_path(src), default_key_path(dst))
    cfg, site, local = _local(copy)
    guard = PrivacyGuard(
        site.ledger_path, site.site_id, site.max_epsilon, site.delta, site.on_exhausted, local.key_check
    )
    trained: list[int | None] = []
    for rnd in range(1, ROUNDS + 1):
        plan = guard.plan(cfg, "run-1", local.train_ids)
        if not plan.allowed:
            return [*trained, None]
        guard.record(plan, cfg, "run-1", rnd, local.train_ids, local.fingerprint, "pf", datetime.now(UTC))
        trained.append(len(plan.train))
    return trained


def _first_refused_round(node: dict[str, str], folder: Path) -> int | None:
    """The first round the real guard refuses (None: every round trains)."""
    rounds = _replay(node, folder)
    return len(rounds) if rounds[-1] is None else None


def test_site_check_refuses_a_run_whose_first_round_fits_and_says_how_many_rounds_fit(tmp_path):
    """The issue's case: before any spend the budget looks fine, round 1 fits, round 2 would be refused."""
    node = _node(tmp_path)
    _, _, local = _local(node)  # creates the site key; the ledger is created by the first check below
    sigma, q, steps = _independent_run_mechanism(len(local.train_ids))
    e1, e2 = (epsilon_of([(sigma, q, r * steps)], DELTA, ACC) for r in (1, 2))
    assert e1 < e2 < TARGET * 1.01
    node = _node(tmp_path, max_epsilon=(e1 + e2) / 2)

    rep = check_site(node, RUN)
    (spent,) = [c for c in rep.checks if c.name == "budget"]
    assert spent.ok  # what the check said before: nothing spent, so "ok"
    (run,) = [c for c in rep.checks if c.name == "run budget"]
    assert not run.ok and not rep.ok
    assert rep.projection is not None and rep.projection.rounds_fit == 1 and not rep.projection.fits
    assert f"only 1 of {ROUNDS} rounds fit: round 2 would be refused" in run.detail
    assert rep.projection.epsilon_after == pytest.approx(e1, rel=1e-9)
    assert rep.projection.remaining_after == pytest.approx((e2 - e1) / 2, rel=1e-9)

    before = _ledger_state(Path(node["ledger-path"]))
    again = check_site(node, RUN)
    assert _ledger_state(Path(node["ledger-path"])) == before  # the check spends nothing, writes nothing
    assert again.projection is not None and again.projection.rounds_fit == 1

    # The real guard agrees: it trains round 1 and refuses round 2.
    assert _first_refused_round(node, tmp_path / "replay") == rep.projection.rounds_fit + 1

    cli = CliRunner(env={"COLUMNS": "250"}).invoke(
        app, ["site", "check", "--node-config", _kv(node), "--run-config", RUN_TEXT]
    )
    assert cli.exit_code == 1 and "only 1 of 3 rounds fit" in cli.output
    assert _ledger_state(Path(node["ledger-path"])) == before


def test_projection_composes_with_earlier_runs_like_the_accountant(tmp_path):
    """After an earlier run's spend the projection's epsilons are the accountant's composition of it with
    ROUNDS rounds of the calibrated mechanism; the whole run fits when max-epsilon allows, and the guard agrees."""
    node = _node(tmp_path, max_epsilon=50.0)
    _, _, local = _local(node)
    old = (1.5, 0.1, 20)
    _spend(_guard(node, local.key_check), local.train_ids, old, "old-run", fp=local.fingerprint)
    sigma, q, steps = _independent_run_mechanism(len(local.train_ids))
    run = (sigma, q, ROUNDS * steps)
    before = _ledger_state(Path(node["ledger-path"]))

    rep = check_site(node, RUN)
    proj = rep.projection
    assert proj is not None and proj.fits and proj.rounds_fit == ROUNDS, [c.detail for c in rep.checks]
    assert proj.epsilon_before == pytest.approx(epsilon_of([old], DELTA, ACC), rel=1e-9)
    assert proj.epsilon_run == pytest.approx(epsilon_of([run], DELTA, ACC), rel=1e-9)
    assert proj.epsilon_after == pytest.approx(epsilon_of([old, run], DELTA, ACC), rel=1e-9)
    assert proj.epsilon_after < proj.epsilon_before + proj.epsilon_run  # composition, not a sum
    assert proj.remaining_after == pytest.approx(50.0 - proj.epsilon_after, rel=1e-9)
    assert _ledger_state(Path(node["ledger-path"])) == before

    out = CliRunner().invoke(app, ["budget", "--node-config", _kv(node), "--run-config", RUN_TEXT, "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["projection"]["rounds_fit"] == ROUNDS and res["projection"]["fits"] is True
    assert res["projection"]["epsilon_after"] == pytest.approx(proj.epsilon_after, rel=1e-12)
    (data,) = res["datasets"]
    assert data["current"] is True and data["spent"] == pytest.approx(proj.epsilon_before, rel=1e-9)
    assert _ledger_state(Path(node["ledger-path"])) == before
    assert _first_refused_round(node, tmp_path / "replay") is None


def test_projection_excludes_the_records_the_guard_excludes(tmp_path):
    """Half the training records spent in an earlier run: under on-exhausted=exclude they sit out once their
    budget is spent, the rest train on. The projection's rounds, cohort sizes and refusal are the guard's."""
    node = _node(tmp_path, max_epsilon=TARGET + 1.0)
    _, _, local = _local(node)
    half = local.train_ids[: len(local.train_ids) // 2]
    _spend(_guard(node, local.key_check), half, (1.2, 0.2, 40), "old-run", fp=local.fingerprint)
    rep = check_site(node, RUN)
    proj = rep.projection
    assert proj is not None
    projected = [r.trained if r.allowed else None for r in proj.per_round]
    assert projected == _replay(node, tmp_path / "replay")
    assert any(r.excluded for r in proj.per_round)  # the case this test is about
    # Independently: the records spent before sit out exactly when excluded; each round's mechanism is calibrated
    # for the records it trains on; the worst training record after the run is the worse of the two halves.
    n, old = len(local.train_ids), (1.2, 0.2, 40)
    rounds = [r for r in proj.per_round if r.allowed]
    assert all(r.trained == (n - len(half) if r.excluded else n) and r.excluded in (0, len(half)) for r in rounds)

    def mech(k: int) -> tuple[float, float, int]:
        q, steps = sample_rate(k, BATCH), EPOCHS * steps_per_epoch(k, BATCH)
        return calibrate_noise(TARGET, DELTA, q, ROUNDS * steps, ACC), q, steps

    fresh = [mech(r.trained) for r in rounds]
    spent_before = [old] + [mech(r.trained) for r in rounds if not r.excluded]
    worst = max(epsilon_of(fresh, DELTA, ACC), epsilon_of(spent_before, DELTA, ACC))
    assert proj.epsilon_after == pytest.approx(worst, rel=1e-9)
    (line,) = [c for c in rep.checks if c.name == "run budget"]
    assert line.ok == proj.fits and "records are left out for their budget" in line.detail


def test_budget_per_dataset_is_the_composition_of_that_datasets_rows(tmp_path):
    """Three datasets in one ledger, one with two runs, one sharing records with it: each dataset's own value is the
    accountant's epsilon of its rows composed (less than the sum of its runs), and its records' spent value adds
    exactly the spends of the records it shares (budgets follow records), nothing else."""
    node = _node(tmp_path, max_epsilon=30.0)
    rng = np.random.default_rng(1)
    ids_a, ids_b, ids_c = ([bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(k)] for k in (40, 30, 20))
    guard = _guard(node, "unkeyed")
    m1, m2, m3, m4 = (1.1, 0.2, 30), (0.9, 0.25, 24), (1.3, 0.1, 50), (1.6, 0.2, 40)
    _spend(guard, ids_a, m1, "run-1", fp="dataset-a")
    _spend(guard, ids_a, m2, "run-2", fp="dataset-a")
    _spend(guard, ids_b, m3, "run-3", fp="dataset-b")
    _spend(guard, ids_a[:10] + ids_c, m4, "run-4", fp="dataset-c")  # an edited copy of dataset a
    before = _ledger_state(Path(node["ledger-path"]))

    out = CliRunner().invoke(app, ["budget", "--node-config", _kv(node), "--accountant", DATASET_ACC, "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    got = {d["dataset_fingerprint"]: d for d in res["datasets"]}
    assert list(got) == ["dataset-a", "dataset-b", "dataset-c"]
    a, b, c = got["dataset-a"], got["dataset-b"], got["dataset-c"]

    def eps(*history):
        return pytest.approx(epsilon_of(list(history), DELTA, DATASET_ACC), rel=1e-9)

    assert a["own"] == eps(m1, m2) and a["runs"] == {"run-1": eps(m1), "run-2": eps(m2)}
    assert a["own"] < a["sum_of_runs"] == pytest.approx(sum(a["runs"].values()))
    assert b["own"] == b["spent"] == eps(m3) and b["remaining"] == pytest.approx(30.0 - b["spent"])
    assert c["own"] == eps(m4)
    assert a["spent"] == c["spent"] == eps(m1, m2, m4)  # the ten shared records carry both datasets' spends
    assert a["remaining"] == pytest.approx(30.0 - a["spent"])
    assert [(d["rows"], d["records"]) for d in (a, b, c)] == [(2, 40), (1, 30), (1, 30)]

    text = CliRunner(env={"COLUMNS": "250"}).invoke(
        app, ["site", "budget", "--node-config", _kv(node), "--accountant", DATASET_ACC]
    )
    assert text.exit_code == 0, text.output
    assert all(name in text.output for name in got)
    assert "compose, they do not add" in text.output and f"{a['own']:.3f}" in text.output
    assert _ledger_state(Path(node["ledger-path"])) == before


def test_budget_without_a_ledger_creates_none(tmp_path):
    node = _node(tmp_path, max_epsilon=5.0)
    out = CliRunner().invoke(app, ["budget", "--node-config", _kv(node), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["datasets"] == []
    assert not Path(node["ledger-path"]).exists()


def test_budget_names_what_is_missing_in_one_line(tmp_path):
    out = CliRunner().invoke(app, ["budget", "--node-config", f"site-id=a ledger-path={tmp_path}/l.sqlite"])
    assert out.exit_code == 2 and "data-path" in out.output and len(out.output.strip().splitlines()) == 1
