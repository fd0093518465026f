"""A simulation on a Ray cluster that already runs (issue 13): `privatune simulate --ray-address HOST:PORT`.

The slow test starts a local Ray head of its own (`ray start --head`), runs a tiny federation on it, checks from
the cluster's own worker logs that the clients trained there, and stops the head, leaving no process behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from privatune.cli.inputs import UsageError, check_ray_cluster, check_resources
from privatune.simulations.simulate import ray_init_args

RAY = str(Path(sys.executable).with_name("ray"))


def test_a_private_ray_is_sized_to_this_machine_and_a_cluster_is_joined_as_it_is() -> None:
    own = ray_init_args("", "/tmp/pt-ray-x", 2, verbose=False)
    assert own["num_cpus"] == 2 and own["_temp_dir"] == "/tmp/pt-ray-x" and own["include_dashboard"] is False
    joined = ray_init_args("10.0.0.5:6379", "/tmp/pt-ray-x", 2, verbose=True)
    # Ray refuses num_cpus, num_gpus and a temp folder from a driver that joins a cluster
    assert joined["address"] == "10.0.0.5:6379"
    assert not {"num_cpus", "num_gpus", "_temp_dir"} & set(joined)
    assert joined["log_to_driver"] is True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("address", ["no-port", "host:", ":6379", "host:abc"])
def test_a_malformed_address_is_refused_in_one_line(address: str) -> None:
    with pytest.raises(UsageError, match="HOST:PORT"):
        check_ray_cluster(address, 1.0, 0.0)


def test_an_address_where_nothing_listens_is_refused_in_seconds() -> None:
    port = _free_port()
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match=r"nothing listens there.*ray start --head"):
        check_resources(1.0, 0.0, f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 10


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return [p for p in found if p != os.getpid()]


@pytest.mark.slow
def test_a_simulation_runs_on_a_local_ray_cluster_and_leaves_nothing_running(tmp_path: Path) -> None:
    temp = tempfile.mkdtemp(prefix="ptray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    env.pop("RAY_ADDRESS", None)
    head = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}"]
    subprocess.run(
        [*head, "--disable-usage-stats", "--include-dashboard=false"], check=True, env=env, capture_output=True
    )
    try:
        address = f"127.0.0.1:{port}"
        # a client asking for more CPUs than any node has is refused before anything runs
        big = subprocess.run(
            [sys.executable, "-m", "privatune.cli", "simulate", "--preset", "digits", "--ray-address", address,
             "--client-cpus", "3", "--out", str(tmp_path / "big")],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert big.returncode == 2 and "no node of the cluster has --client-cpus 3" in big.stderr + big.stdout
        run = tmp_path / "run"
        done = subprocess.run(
            [sys.executable, "-m", "privatune.cli", "simulate", "--preset", "digits", "--clients", "2", "--rounds",
             "1", "--run-config", "max-records=200", "--ray-address", address, "--out", str(run)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        import json

        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds_completed"] == 1
        # the clients trained in the cluster's workers: their log lines are in the cluster's logs, not ours
        logs = Path(temp, "session_latest", "logs")
        lines = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*"))
        assert "[client-0] round 1:" in lines and "[client-1] round 1:" in lines
    finally:
        stopped = _stop_head(temp)  # not `ray stop`, which stops every Ray on the machine
    assert stopped, "the head's processes were not found"
    assert [p for p in stopped if _alive(p)] == []
    assert _processes_mentioning(temp) == []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stop_head(temp: str) -> set[int]:
    """SIGTERM, then SIGKILL, the head's processes (their command lines name its temp folder) and their children."""
    import signal

    from privatune.simulations.benchmarks.modes.child import descendants

    roots = _processes_mentioning(temp)
    tree = set(roots) | {d for r in roots for d in descendants(r)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.time() + 20
        while any(_alive(p) for p in tree) and time.time() < deadline:
            time.sleep(0.5)
    return tree
