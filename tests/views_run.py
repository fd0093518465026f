"""Shared by the augmentation tests: a tiny simulated federation with K views per record, through the CLI, and the
check that every site's ledger recorded K."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def simulate_with_views(
    tmp_path: Path, args: list[str], run_config: str, drop_env: tuple[str, ...] = ()
) -> tuple[Path, dict[str, Any]]:
    """``privatune simulate ARGS --run-config RUN_CONFIG`` in a HOME of its own (2 clients, 1 round); the run
    folder and its summary.json, after checking that it exited 0."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "privatune.cli", "simulate", "--clients", "2", "--rounds", "1", *args]
    cmd += ["--out", str(out), "--run-config", run_config]
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in drop_env} | {"HOME": str(tmp_path / "home")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


def assert_every_spend_records_views(out: Path, views: int, sites: int = 2) -> None:
    from privatune.common.ledger import SiteLedger

    ledgers = sorted((out / "ledgers").glob("site-*.ledger.sqlite"))
    assert len(ledgers) == sites
    for path in ledgers:
        rows = SiteLedger(path).entries()
        assert rows and all(r.entry.augment_views == views for r in rows)
