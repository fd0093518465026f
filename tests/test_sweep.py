"""`privatune sweep`: the --epsilon/--mode lists, the points, what the sweep spent, and (slow) a tiny real sweep."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privatune.cli import app
from privatune.common.accountants import RDP
from privatune.common.accounting import epsilon_of
from privatune.common.ledger.totals import LedgerSpend
from privatune.simulations.sweep import (
    SWEEP_JSON,
    SWEEP_PLOT,
    SweepError,
    SweepPoint,
    build_points,
    check_same_sweep,
    is_finished,
    parse_epsilons,
    parse_modes,
    plot_positions,
    point_result,
    run_sweep,
    spend_statement,
)

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# -- the lists -----------------------------------------------------------------------------------------------------


def test_epsilons_parse_sorted_with_no_dp_last():
    assert parse_epsilons("8, 0.5,inf,2") == (0.5, 2.0, 8.0, math.inf)
    assert parse_epsilons("none") == (math.inf,)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "at least one"),
        (" , ", "at least one"),
        ("1,x", "'x' is not a number"),
        ("0", "must be a number > 0"),
        ("-1", "must be a number > 0"),
        ("nan", "must be a number > 0"),
        ("1,1.0", "twice"),
        ("inf,none", "twice"),
    ],
)
def test_bad_epsilon_lists_are_refused_naming_the_option(text, words):
    with pytest.raises(SweepError, match="--epsilon") as err:
        parse_epsilons(text)
    assert words in str(err.value)


def test_modes_parse_and_default_to_the_presets():
    assert parse_modes("head,lora", "full") == ("head", "lora")
    assert parse_modes("", "full") == ("full",)
    with pytest.raises(SweepError, match="--mode: unknown mode 'foo'; choose from head"):
        parse_modes("head,foo", "head")
    with pytest.raises(SweepError, match="twice"):
        parse_modes("lora,lora", "head")


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--epsilon", "1,abc"], "--epsilon: 'abc' is not a number"),
        (["--mode", "head,bogus"], "--mode: unknown mode 'bogus'"),
        (["--run-config", "mode=full"], "--run-config sets mode"),
        (["--run-config", "target-epsilon=3"], "--run-config sets target-epsilon"),
    ],
)
def test_the_cli_refuses_bad_lists_in_one_line_before_any_run(tmp_path, args, words):
    out = tmp_path / "sweep"
    line = _one_error_line(runner.invoke(app, ["sweep", "--preset", "digits", "--out", str(out), *args]))
    assert words in line
    assert not (out / SWEEP_JSON).exists()


def test_the_sweep_takes_simulates_options_but_not_the_swept_ones():
    result = runner.invoke(app, ["sweep", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--epsilon", "--mode", "--preset", "--clients", "--run-config", "--data", "--no-baseline"):
        assert option in result.output
    assert "--no-dp" not in result.output and "--overwrite" not in result.output


# -- the points and what they spent --------------------------------------------------------------------------------


def test_points_go_mode_by_mode_with_one_folder_each():
    points = build_points(("head", "lora"), (math.inf, 1.0, 4.0))
    assert [(p.mode, p.epsilon) for p in points] == [
        ("head", 1.0),
        ("head", 4.0),
        ("head", math.inf),
        ("lora", 1.0),
        ("lora", 4.0),
        ("lora", math.inf),
    ]
    assert [p.tag for p in points[:3]] == ["head-eps1", "head-eps4", "head-nodp"]
    assert len({p.tag for p in points}) == len(points)
    assert [p.private for p in points[:3]] == [True, True, False]


def _spend(noise: float, steps: int, delta: float = 1e-5) -> LedgerSpend:
    return LedgerSpend("fp", "run", (noise, 0.1, steps), "cohort", delta, RDP)  # RDP: fast


def _result(folder: str, eps: float, spent: float | None) -> dict:
    return {"run_folder": folder, "dp": math.isfinite(eps), "epsilon_spent": spent, "target_epsilon": eps}


def test_the_spend_statement_composes_every_dp_run_per_site():
    a = {"client-0": [_spend(1.0, 20)], "client-1": [_spend(1.2, 20)]}
    b = {"client-0": [_spend(2.0, 30), _spend(1.5, 5)], "client-1": [_spend(2.0, 30)]}
    results = [_result("/s/head-eps1", 1.0, 0.9), _result("/s/head-eps4", 4.0, 3.8)]
    got = spend_statement(results, {"/s/head-eps1": a, "/s/head-eps4": b}, "the digits data", baseline=False)
    for site in ("client-0", "client-1"):
        mechanisms = [s.mechanism for s in a[site] + b[site]]
        want = epsilon_of(mechanisms, 1e-5, RDP)
        assert got["dp_runs_composed_per_site"][site] == pytest.approx(want)
        alone = max(epsilon_of([s.mechanism for s in run[site]], 1e-5, RDP) for run in (a, b))
        assert want > alone  # composing is more than the worst single run
    assert got["dp_runs_composed_max"] == max(got["dp_runs_composed_per_site"].values())
    assert got["dp_runs"] == 2 and got["runs_without_ledgers"] == []
    assert got["per_run_epsilon_spent"] == {"head-eps1": 0.9, "head-eps4": 3.8}
    assert "composition of all its DP runs" in got["statement"] and "the digits data" in got["statement"]
    assert got["total_guarantee"] == "the DP composition above"
    assert "no DP guarantee" not in got["statement"]


def test_no_dp_points_the_baseline_and_missing_ledgers_are_said():
    results = [_result("/s/full-eps2", 2.0, 1.9), _result("/s/full-nodp", math.inf, math.inf)]
    got = spend_statement(results, {}, "my.csv", baseline=True)
    assert got["runs_without_ledgers"] == ["/s/full-eps2"]
    assert got["dp_runs_composed_per_site"] == {} and got["dp_runs_composed_max"] is None
    assert "have no site ledgers" in got["statement"] and "compose with the rest" in got["statement"]
    assert "no privacy guarantee" in got["statement"]
    assert "centralised baseline is non-private" in got["statement"]
    assert got["total_guarantee"].startswith("none")


def test_a_point_reports_the_largest_site_spend():
    summary = {
        "status": "completed",
        "test_accuracy": 0.8,
        "test_macro_f1": "0.7",
        "per_client_epsilon": {"client-0": 1.2, "client-1": 1.9},
        "rounds_completed": 3,
    }
    got = point_result(SweepPoint("head", 2.0), Path("/s/head-eps2"), summary, skipped=False)
    assert got["epsilon_spent"] == 1.9 and got["accuracy"] == 0.8 and got["macro_f1"] == 0.7
    no_dp = point_result(SweepPoint("head", math.inf), Path("/s/x"), {"status": "failed"}, skipped=True)
    assert no_dp["epsilon_spent"] == math.inf and no_dp["accuracy"] is None and no_dp["status"] == "failed"


def test_no_dp_is_plotted_right_of_every_epsilon():
    pos, no_dp = plot_positions([0.5, 8.0, math.inf])
    assert pos[0.5] == 0.5 and pos[8.0] == 8.0 and no_dp is not None and no_dp > 8.0 and pos[math.inf] == no_dp
    assert plot_positions([1.0, 2.0]) == ({1.0: 1.0, 2.0: 2.0}, None)


# -- the loop, with a stand-in for the simulation ------------------------------------------------------------------


def _fake_run(calls: list[str]):
    def run_point(point: SweepPoint, run_dir: Path, overwrite: bool) -> None:
        calls.append(point.tag)
        run_dir.mkdir(parents=True, exist_ok=True)
        status = "failed" if point.epsilon == 0.5 else "completed"
        summary = {
            "status": status,
            "test_accuracy": 0.5 + (0.1 if point.private else 0.3),
            "test_macro_f1": 0.4,
            "per_client_epsilon": {"client-0": point.epsilon * 0.9},
        }
        (run_dir / "summary.json").write_text(json.dumps(summary).replace("Infinity", '"inf"'))

    return run_point


def test_a_rerun_skips_finished_points_and_reruns_the_others(tmp_path):
    points = build_points(("head",), (0.5, 2.0, math.inf))
    calls: list[str] = []
    options = {"preset": "digits", "clients": 2}
    report = run_sweep(tmp_path, points, _fake_run(calls), options=options, data="d", baseline=False, say=calls.append)
    assert [c for c in calls if not c.startswith("point")] == ["head-eps0.5", "head-eps2", "head-nodp"]
    assert (tmp_path / SWEEP_PLOT).stat().st_size > 0
    saved = json.loads((tmp_path / SWEEP_JSON).read_text())
    assert [p["status"] for p in saved["points"]] == ["failed", "completed", "completed"]
    assert saved["points"][1]["epsilon_spent"] == pytest.approx(1.8) and saved["points"][2]["target_epsilon"] == "inf"
    assert saved["privacy"]["runs"] == 3 and report["points"][0]["skipped"] is False
    assert is_finished(tmp_path / "head-eps2") and not is_finished(tmp_path / "head-eps0.5")

    calls.clear()
    again = run_sweep(tmp_path, points, _fake_run(calls), options=options, data="d", baseline=False, say=calls.append)
    assert [c for c in calls if not c.startswith("point")] == ["head-eps0.5"]  # only the unfinished one runs
    assert [p["skipped"] for p in again["points"]] == [False, True, True]
    assert sum("skipped" in c for c in calls) == 2

    with pytest.raises(SweepError, match="other options \\(clients\\)"):
        check_same_sweep(tmp_path, {"preset": "digits", "clients": 3})


# -- a real, tiny sweep --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_sweep_writes_its_json_and_plot_and_skips_on_rerun(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "privatune.cli", "sweep", "--preset", "digits", "--clients", "2", "--rounds", "1"]
    cmd += ["--epsilon", "1,inf", "--mode", "head", "--out", str(out)]
    cmd += ["--run-config", "max-records=300 local-epochs=1"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "point 1/2: head, epsilon 1" in first.stdout and "point 2/2: head, no DP" in first.stdout
    report = json.loads((out / SWEEP_JSON).read_text())
    assert [(p["mode"], p["target_epsilon"]) for p in report["points"]] == [("head", 1.0), ("head", "inf")]
    dp, no_dp = report["points"]
    for p in (dp, no_dp):
        assert p["status"] == "completed" and 0.0 <= p["accuracy"] <= 1.0 and 0.0 <= p["macro_f1"] <= 1.0
        assert Path(p["run_folder"]).parent == out
    summary = json.loads((out / "head-eps1" / "summary.json").read_text())
    assert dp["epsilon_spent"] == pytest.approx(max(float(v) for v in summary["per_client_epsilon"].values()))
    assert 0 < dp["epsilon_spent"] <= 1.0 + 1e-6 and no_dp["epsilon_spent"] == "inf"
    privacy = report["privacy"]
    assert set(privacy["dp_runs_composed_per_site"]) == {"client-0", "client-1"}
    assert privacy["dp_runs_composed_max"] == pytest.approx(dp["epsilon_spent"], rel=1e-6)  # one DP run
    assert "non-private" in privacy["statement"] and "privacy:" in first.stdout
    base = report["baselines"]["head"]
    assert 0.0 <= base["accuracy"] <= 1.0 and base["private"] is False
    assert (out / SWEEP_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamps = {p["run_folder"]: Path(p["run_folder"], "summary.json").stat().st_mtime_ns for p in report["points"]}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skipped") >= 2
    rerun = json.loads((out / SWEEP_JSON).read_text())
    assert [p["skipped"] for p in rerun["points"]] == [True, True]
    assert [p["accuracy"] for p in rerun["points"]] == [p["accuracy"] for p in report["points"]]
    assert {f: Path(f, "summary.json").stat().st_mtime_ns for f in stamps} == stamps
