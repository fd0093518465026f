"""`flwr run .` as a local simulation (scripts/flwr_run_local.sh): the real ServerApp and ClientApp
behind a SuperLink the script starts with --simulation and no runtime dependency install, and
nothing left running afterwards, whether the run completes or is interrupted.

Every process the script starts inherits the deploy harness's marker variable (set here), so
``marked_pids`` finds any that outlive it, wherever they sit in the process tree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.deploy.harness import MARKER_ENV, REPO_ROOT, marked_pids

SCRIPT = REPO_ROOT / "scripts" / "flwr_run_local.sh"
CLIENTS = 3
TARGET_EPSILON = 4.0


def _env(home: Path, marker: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for inherited in ("FLWR_HOME", "MPLCONFIGDIR", "RAY_TMPDIR", "APP_DIR", "KEEP_WORK"):
        env.pop(inherited, None)
    return {**env, "HOME": str(home), MARKER_ENV: marker, "NUM_SUPERNODES": str(CLIENTS), **extra}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(out: Path, run_config: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            [str(SCRIPT), str(out), run_config],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,  # a timeout below can stop the script and its children as a group
            # A shell that starts with SIGINT ignored can never trap it, and an earlier in-process test can leave
            # this process ignoring SIGINT: start the script as a terminal would, with the default disposition.
            preexec_fn=_default_sigint,
        )


def _describe(pids: list[int]) -> list[str]:
    """What the leftover processes are, for the failure message."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            cmd = "(gone)"
        out.append(f"{pid}: {cmd}")
    return out


def _gone(marker: str, grace: float = 30.0) -> bool:
    """No process of this run is left (within a grace for Ray workers that notice their raylet died)."""
    deadline = time.monotonic() + grace
    while marked_pids(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _finish(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> int:
    """Wait for the script; on timeout kill it and everything it started, then fail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for pid in marked_pids(marker):
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"flwr_run_local.sh did not finish within {timeout:.0f} s")


def _port_is_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _started(output: str) -> tuple[int, Path]:
    """SuperLink port and private work folder, as the script announces them."""
    match = re.search(r"SuperLink \(simulation\) on 127\.0\.0\.1:(\d+), FLWR_HOME=(\S+)/flwr-home", output)
    assert match, output[-3000:]
    return int(match.group(1)), Path(match.group(2))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flwr-run")
    home = root / "home"
    home.mkdir()
    out = root / "out"
    marker = uuid.uuid4().hex
    pyproject_before = (REPO_ROOT / "pyproject.toml").read_bytes()
    began = time.monotonic()
    proc = _start(
        out,
        f'preset="digits" num-server-rounds=2 target-epsilon={TARGET_EPSILON}',
        _env(home, marker),
        root / "script.log",
    )
    code = _finish(proc, marker, timeout=420)
    output = (root / "script.log").read_text(errors="replace")
    return {
        "code": code,
        "output": output,
        "out": out,
        "home": home,
        "leftover": marked_pids(marker),
        "wall_s": time.monotonic() - began,
        "pyproject_unchanged": (REPO_ROOT / "pyproject.toml").read_bytes() == pyproject_before,
    }


@pytest.mark.slow
def test_flwr_run_completes_with_dp_within_target(digits_run):
    assert digits_run["code"] == 0, digits_run["output"][-4000:]
    out = digits_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["test_accuracy"] > 0.5
    assert summary["target_epsilon"] == TARGET_EPSILON  # the run config reached the ServerApp
    eps = summary["per_client_epsilon"]
    assert sorted(eps) == [f"client-{i}" for i in range(CLIENTS)]
    assert all(0 < e <= TARGET_EPSILON * 1.01 for e in eps.values()), eps
    # The same artefacts as `privatune simulate`, all in OUT_DIR.
    assert json.loads((out / "config.json").read_text())["preset"] == "digits"
    assert (out / "global.safetensors").is_file() and (out / "rounds.png").is_file()
    assert len(list((out / "ledgers").glob("site-*.ledger.sqlite"))) == CLIENTS
    assert "test accuracy" in digits_run["output"]


@pytest.mark.slow
def test_flwr_run_leaves_nothing_behind(digits_run):
    assert digits_run["code"] == 0, digits_run["output"][-4000:]
    assert digits_run["leftover"] == []  # SuperLink, SuperExec, flwr-simulation, Ray: all gone
    port, work = _started(digits_run["output"])
    assert _port_is_closed(port)
    assert not work.exists()  # FLWR_HOME and Ray's session files went with the work folder
    assert list(digits_run["home"].iterdir()) == []  # nothing in ~/.flwr, ~/.cache, ...
    assert digits_run["pyproject_unchanged"]  # flwr run did not migrate the app's pyproject.toml
    logs = digits_run["out"] / "flwr-logs"
    run_log = (logs / "run.log").read_text(errors="replace")
    assert re.search(r"Successfully started run \d+", run_log)
    assert "digits-cnn/digits mode=head" in run_log  # the ServerApp's own log line, streamed
    assert "Starting Flower SuperLink" in (logs / "superlink.log").read_text(errors="replace")


@pytest.mark.slow
def test_interrupt_mid_run_stops_everything(tmp_path):
    """Ctrl-C during round 1 (SIGINT to the script's process group): exit 130, no process left."""
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "out"
    marker = uuid.uuid4().hex
    proc = _start(out, 'preset="digits" num-server-rounds=3', _env(home, marker), tmp_path / "script.log")
    run_log = out / "flwr-logs" / "run.log"
    deadline = time.monotonic() + 240
    while not (run_log.exists() and "[ROUND 1/3]" in run_log.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("round 1 never started:\n" + (tmp_path / "script.log").read_text(errors="replace")[-3000:])
        time.sleep(0.3)
    assert len(marked_pids(marker)) >= 3  # SuperLink, SuperExec, flwr-simulation (and Ray) are up
    os.killpg(proc.pid, signal.SIGINT)
    code = _finish(proc, marker, timeout=60)
    output = (tmp_path / "script.log").read_text(errors="replace")
    assert code == 130, output[-3000:]
    assert _gone(marker), _describe(marked_pids(marker))
    port, work = _started(output)
    assert _port_is_closed(port)
    assert not work.exists()
    if (out / "summary.json").exists():  # the ServerApp may record what it had when its link went away
        assert json.loads((out / "summary.json").read_text())["rounds_completed"] < 3
    assert "FAILED (exit 130)" in output


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ('preset="nope"', "unknown preset 'nope'"),
        ("bogus-key=1", "unknown key(s) ['bogus-key']"),
        ("preset=digits", "invalid format"),  # TOML: strings need quotes
        ('out-dir="/elsewhere"', "not as out-dir"),
    ],
)
def test_bad_run_config_is_refused_before_anything_starts(tmp_path, run_config, message):
    marker = uuid.uuid4().hex
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(SCRIPT), str(out), run_config],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path, marker),
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "SuperLink" not in proc.stdout  # nothing was started
    assert not out.exists()
    assert _gone(marker), _describe(marked_pids(marker))


def test_too_many_clients_and_legacy_federations_table_are_refused(tmp_path):
    env = _env(tmp_path, uuid.uuid4().hex, NUM_SUPERNODES="5000")
    proc = subprocess.run(
        [str(SCRIPT), str(tmp_path / "a"), 'preset="digits"'],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 2 and "into 5000 clients" in proc.stderr, proc.stderr

    app = tmp_path / "app"
    app.mkdir()
    legacy = (REPO_ROOT / "pyproject.toml").read_text() + '\n[tool.flwr.federations]\ndefault = "local"\n'
    (app / "pyproject.toml").write_text(legacy)
    env = _env(tmp_path, uuid.uuid4().hex, APP_DIR=str(app))
    proc = subprocess.run([str(SCRIPT), str(tmp_path / "b")], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "[tool.flwr.federations]" in proc.stderr, proc.stderr
    assert (app / "pyproject.toml").read_text() == legacy  # refused, not rewritten


def test_existing_run_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    proc = subprocess.run(
        [str(SCRIPT), str(out), 'preset="digits"'],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path, uuid.uuid4().hex),
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 2 and "already holds a run" in proc.stderr, proc.stderr
