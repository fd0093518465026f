"""The documented custom-task path, end to end (issue 12): docs/custom-task.md's blocks, run as written.

Two sites over TLS with node authentication: one CSV with its own column names, one JSONL with others, labels
named in the run config, no preset; then `privatune evaluate` on a test file, which must score what the sites'
own validation said (their logs, the site operators' view), and the server must not have scored the model on
some other dataset.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest

from .harness import REPO_ROOT, stage_app, start_federation

GUIDE = REPO_ROOT / "docs" / "custom-task.md"
VALIDATION = re.compile(
    r"\[(?P<site>[\w-]+)\] round (?P<round>\d+): validation on (?P<n>\d+) records: .*?accuracy (?P<acc>[\d.]+)"
)
_BLOCK = re.compile(r"<!-- custom-task: ([\w-]+) -->\s*```(\w+)\n(.*?)```", re.S)

GOOD = ["wonderful", "delightful", "excellent", "lovely", "great", "superb", "charming", "brilliant"]
BAD = ["terrible", "awful", "boring", "dreadful", "poor", "horrible", "dull", "disappointing"]
THINGS = ["film", "service", "visit", "meal", "stay", "book", "course", "treatment"]


def guide_blocks() -> dict[str, tuple[str, str]]:
    """NAME -> (language, body) of every marked block of the guide."""
    blocks = {name: (lang, body) for name, lang, body in _BLOCK.findall(GUIDE.read_text(encoding="utf-8"))}
    assert set(blocks) == {"site-a", "site-b", "run-config", "evaluate"}, sorted(blocks)
    return blocks


def reviews(n: int, seed: int) -> list[tuple[str, str]]:
    """Separable review texts with labels pos/neg (balanced), drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        thing = THINGS[rng.integers(len(THINGS))]
        if i % 2 == 0:
            a, b = rng.choice(GOOD, 2, replace=False)
            out.append((f"The {thing} was {a} and {b}, I would go again", "pos"))
        else:
            a, b = rng.choice(BAD, 2, replace=False)
            out.append((f"The {thing} was {a} and {b}, never again", "neg"))
    return out


def write_csv(path: Path, rows: list[tuple[str, str]], text: str, label: str) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", text, label])
        for i, (t, lab) in enumerate(rows):
            writer.writerow([i, t, lab])
    return path


def test_the_guide_names_each_site_its_own_columns_and_the_run_no_preset() -> None:
    blocks = guide_blocks()
    a, b = tomllib.loads(blocks["site-a"][1]), tomllib.loads(blocks["site-b"][1])
    assert (a["text-column"], a["label-column"]) != (b["text-column"], b["label-column"])
    assert a["data-path"].endswith(".csv") and b["data-format"] == "jsonl"
    run = tomllib.loads(blocks["run-config"][1])
    assert run["preset"] == "" and run["labels"] and run["model"]


@pytest.mark.slow
def test_the_documented_custom_task_trains_and_evaluates(tmp_path: Path) -> None:
    blocks = guide_blocks()
    sites = []
    for index, name in enumerate(("site-a", "site-b")):
        node = tomllib.loads(blocks[name][1])
        folder = tmp_path / name
        folder.mkdir()
        rows = reviews(240, seed=index)
        text, label = node["text-column"], node["label-column"]
        if node.get("data-format") == "jsonl":
            data = folder / Path(node["data-path"]).name
            data.write_text(
                "".join(json.dumps({"id": i, text: t, label: lab}) + "\n" for i, (t, lab) in enumerate(rows))
            )
        else:
            data = write_csv(folder / Path(node["data-path"]).name, rows, text, label)
        # The guide's node config as written, with this machine's paths.
        node.update({"data-path": str(data), "ledger-path": str(folder / "ledger.sqlite"), "device": "cpu"})
        node["cache-dir"] = str(folder / "cache")
        sites.append(node)
    run_config = tomllib.loads(blocks["run-config"][1])
    out = tmp_path / "run"
    run_config["out-dir"] = str(out)

    with start_federation(tmp_path / "fed", sites) as fed:
        app = stage_app(REPO_ROOT, tmp_path / "app")
        result = fed.run_app(app, run_config, timeout=1200)
        assert result.ok, result.output[-4000:]
        logs = "".join(fed.supernodes[i].log_text() for i in range(len(sites)))

    summary = json.loads((out / "summary.json").read_text())
    rounds = int(run_config["num-server-rounds"])
    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    assert summary["test_accuracy"] is None  # no test data of this task at the server: no central score
    assert summary["central_eval"]["on"] is False and summary["central_eval"]["reason"]
    assert summary["federated_accuracy"] is None  # nothing about validation left the sites
    rounds_seen = [m for m in VALIDATION.finditer(logs) if int(m["round"]) == rounds]
    assert sorted(m["site"] for m in rounds_seen) == sorted(n["site-id"] for n in sites), logs[-3000:]
    count = sum(int(m["n"]) for m in rounds_seen)
    site_accuracy = sum(int(m["n"]) * float(m["acc"]) for m in rounds_seen) / count
    for node in sites:
        assert 0 < summary["per_client_epsilon"][node["site-id"]] <= float(run_config["target-epsilon"]) + 1e-6

    lang, command = blocks["evaluate"]
    assert lang == "bash"
    a = tomllib.loads(blocks["site-a"][1])
    write_csv(tmp_path / "test.csv", reviews(200, seed=99), a["text-column"], a["label-column"])
    env = {**os.environ, "RUN": str(out), "PYTHONPATH": str(REPO_ROOT)}
    shown = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert shown.returncode == 0, shown.stdout[-3000:] + shown.stderr[-3000:]
    assert "accuracy" in shown.stdout.lower() and "neg" in shown.stdout and "pos" in shown.stdout
    as_json = subprocess.run(
        ["bash", "-c", command.strip() + " --json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    figures = json.loads(as_json.stdout)
    assert figures["accuracy"] >= 0.8, figures
    # The sites' own validation of the last round (their logs) saw the same model do as well, within the
    # sampling noise of a few dozen validation records and a 200-record test file.
    assert abs(figures["accuracy"] - site_accuracy) <= 0.1, (figures["accuracy"], site_accuracy, count)
