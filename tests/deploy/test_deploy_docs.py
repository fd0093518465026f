"""The deployment guides and scripts/deploy_local.sh must say the same thing, and the script must work.

Every command block of docs/deploy-coordinator.md and docs/deploy-site.md marked
``<!-- deploy_local: NAME -->`` must appear, line for line, right after ``# doc: NAME`` in the
script (a script line may only add a prefix, e.g. ``start_bg superlink``, to start it in the
background). Running the script then proves the documented commands and flags work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import REPO_ROOT, marked_pids
from .tiny_app import write_tiny_app

SCRIPT = REPO_ROOT / "scripts" / "deploy_local.sh"
GUIDES = [REPO_ROOT / "docs" / "deploy-coordinator.md", REPO_ROOT / "docs" / "deploy-site.md"]
_BLOCK_RE = re.compile(r"<!-- deploy_local: ([\w-]+) -->\s*```bash\n(.*?)```", re.S)


def logical_lines(text: str) -> list[str]:
    """Join backslash continuations, collapse whitespace, drop blank lines (heredoc bodies kept)."""
    joined = re.sub(r"\\\n", " ", text)
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


def doc_blocks() -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    for guide in GUIDES:
        for name, body in _BLOCK_RE.findall(guide.read_text(encoding="utf-8")):
            assert name not in blocks, f"block {name!r} marked twice"
            blocks[name] = logical_lines(body)
    return blocks


def script_blocks() -> dict[str, list[str]]:
    """NAME -> the script's logical lines after ``# doc: NAME`` (up to the next marker)."""
    lines = logical_lines(SCRIPT.read_text(encoding="utf-8"))
    blocks: dict[str, list[str]] = {}
    for i, line in enumerate(lines):
        match = re.fullmatch(r"# doc: ([\w-]+)", line)
        if match:
            blocks[match.group(1)] = [line for line in lines[i + 1 :] if not line.startswith("# doc:")]
    return blocks


def test_every_documented_block_is_what_the_script_runs() -> None:
    docs, script = doc_blocks(), script_blocks()
    assert len(docs) >= 10, sorted(docs)
    assert set(docs) == set(script), sorted(set(docs) ^ set(script))
    for name, doc_lines in docs.items():
        following = script[name][: len(doc_lines)]
        for doc_line, script_line in zip(doc_lines, following, strict=True):
            assert script_line == doc_line or script_line.endswith(" " + doc_line), (
                f"block {name!r}: guide says\n  {doc_line}\nscript runs\n  {script_line}"
            )


def test_doc_flags_exist_in_installed_flower() -> None:
    """Every --flag the guides give to a Flower server executable is one its --help lists."""
    bin_dir = Path(sys.executable).parent
    lines = [line for block in doc_blocks().values() for line in block]
    for tool in ("flower-superlink", "flower-supernode"):
        calls = [line.split(tool, 1)[1] for line in lines if tool in line]
        flags = {tok for call in calls for tok in call.split() if tok.startswith("--")}
        assert flags, f"no {tool} command in the guides"
        help_text = subprocess.run([str(bin_dir / tool), "--help"], capture_output=True, text=True, timeout=60).stdout
        for flag in flags:
            assert re.search(rf"(^|[\s\[]){re.escape(flag)}[\s\]]", help_text), f"{tool} has no {flag}"


def _run_script(tmp_path: Path, env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(env_extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["KEEP"] = "1"
    marker = f"docs-{os.getpid()}-{tmp_path.name}"
    env["PRIVATUNE_DEPLOY_HARNESS"] = marker
    try:
        return subprocess.run(
            ["bash", str(SCRIPT), str(tmp_path / "work")],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
            start_new_session=True,
        )
    finally:
        leftovers = marked_pids(marker)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert leftovers == [], "deploy_local.sh left processes behind"


@pytest.mark.slow
def test_deploy_local_runs_the_documented_sequence_with_a_tiny_app(tmp_path: Path) -> None:
    app = write_tiny_app(tmp_path / "tiny")
    res = _run_script(tmp_path, {"APP_SRC": str(app), "RUN_CONFIG": 'preset="digits" num-server-rounds=2'}, timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "TINYAPP FINAL [2.0, 2.0, 2.0, 2.0]" in res.stdout
    assert "registered successfully" in res.stdout
    for site in ("site-a", "site-b"):
        key = tmp_path / "work" / site / "node-key"
        assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_deploy_local_trains_the_real_app(tmp_path: Path) -> None:
    res = _run_script(tmp_path, {"NUM_SITES": "2"}, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = tmp_path / "work" / "coordinator" / "runs" / "trial"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "digits" and summary["rounds_completed"] == 2
    assert set(summary["per_client_epsilon"]) == {"site-a", "site-b"}
    for site in ("site-a", "site-b"):
        assert (tmp_path / "work" / site / "ledger.sqlite").stat().st_size > 0
