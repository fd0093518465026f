"""Failures that say so: one-line errors for bad input, failed/interrupted runs, one run per folder.

The fast tests never start Ray or train: every case is refused at the edge. The two slow ones run a
tiny real federation (digits preset, a few hundred records).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privatune.cli import app
from privatune.common.config import ConfigError, RunConfig
from privatune.common.offline import OFFLINE_ENV
from privatune.server.reasons import one_line
from privatune.server.run_record import RoundReport, RunRecorder

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.strip()]


def assert_one_line_error(result, *words: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def simulate(tmp_path: Path, *args: str, out: Path | None = None):
    return runner.invoke(
        app,
        [
            "simulate",
            "--preset",
            "digits",
            "--clients",
            "2",
            "--rounds",
            "1",
            "--out",
            str(out or tmp_path / "out"),
            *args,
        ],
    )


# ------------------------------------------------------------------------------------------ one_line
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
    "(pid=4242, ip=192.0.2.2, actor_id=abc)\n"
    '  File "/x/ray_actor.py", line 60, in run\n    raise ClientAppException(str(ex)) from ex\n'
    "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: "
    'Traceback (most recent call last):\n  File "/x/client/app.py", line 90, in train\n    run = prepare(msg)\n'
    "ValueError: noise-multiplier must be finite, got inf\n'>"
)


def test_one_line_keeps_the_innermost_message_without_ray_or_colour():
    line = one_line(RAY_REASON)
    assert line == "noise-multiplier must be finite, got inf"
    assert "\x1b" not in line and "Ray" not in line and "\n" not in line


def test_one_line_keeps_an_informative_class_name_and_plain_text():
    assert one_line("Traceback (most recent call last):\n  File 'a'\nZeroDivisionError: division by zero") == (
        "ZeroDivisionError: division by zero"
    )
    assert one_line("budget exhausted: spent 3.0") == "budget exhausted: spent 3.0"
    assert one_line("\x1b[31mred\x1b[0m text\nmore") == "more"
    assert one_line("") == "unknown error (no message)"
    assert len(one_line("x" * 5000)) <= 400


# ----------------------------------------------------------------------------------- statuses
def recorder(tmp_path: Path) -> RunRecorder:
    return RunRecorder(tmp_path, summary_base={"run_id": "r-7"})


def test_an_interrupt_is_not_overwritten_by_a_summary_write_already_under_way(tmp_path, monkeypatch):
    """The race behind a flaky `status: running` after SIGINT: the ServerApp's thread had built its summary
    ("running") and was writing it when the signal handler wrote "interrupted"; its rename came last."""
    from privatune.server import run_record

    rec = recorder(tmp_path)
    writing, release = threading.Event(), threading.Event()
    real_write = run_record.write_json_atomic

    def slow_first_write(path, data):
        if data["status"] == "running" and not writing.is_set():
            writing.set()
            release.wait(5)
        real_write(path, data)

    monkeypatch.setattr(run_record, "write_json_atomic", slow_first_write)
    server_thread = threading.Thread(target=rec.write_summary)
    server_thread.start()
    assert writing.wait(5)
    marker = threading.Thread(target=rec.mark_ended, args=("interrupted", "stopped by SIGINT"))
    marker.start()
    marker.join(0.3)
    assert marker.is_alive()  # it waits for the write in progress instead of racing it
    release.set()
    server_thread.join(5)
    marker.join(5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_reason"] == "stopped by SIGINT"


def test_a_run_where_no_round_aggregated_is_failed_with_each_reason(tmp_path):
    rec = recorder(tmp_path)
    rec.finish_round(RoundReport(round=0))
    rec.finish_round(RoundReport(round=1, dropped={"client-0": "client error: boom", "client-1": "data-error: x"}))
    assert rec.conclude() == "failed"
    s = rec.write_summary()
    assert s["status"] == "failed" and s["rounds_completed"] == 0
    assert s["failure_reasons"] == {"client-0": "client error: boom", "client-1": "data-error: x"}
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in rows] == ["r-7", "r-7"]


def test_later_rounds_failing_complete_with_a_warning(tmp_path):
    rec = recorder(tmp_path)
    rec.finish_round(RoundReport(round=1, aggregated=True))
    rec.finish_round(RoundReport(round=2, dropped={"client-0": "boom"}))
    assert rec.conclude() == "completed"
    s = rec.write_summary()
    assert "round(s) 2 aggregated nothing" in s["warnings"][0]
    assert s["failure_reasons"] == {"client-0": "boom"}


def test_stopped_and_interrupted_statuses_are_kept(tmp_path):
    rec = recorder(tmp_path)
    rec.finish_round(RoundReport(round=1, aggregated=True))
    rec.status = "stopped"
    assert rec.conclude() == "stopped"
    rec.status = "interrupted"
    assert rec.conclude() == "interrupted"


# --------------------------------------------------------------------------------- run config
@pytest.mark.parametrize(
    "values, key",
    [
        ({"max-grad-norm": "inf"}, "max-grad-norm"),
        ({"max-grad-norm": "nan"}, "max-grad-norm"),
        ({"noise-multiplier": "inf"}, "noise-multiplier"),
        ({"delta": "0.5"}, "delta"),
        ({"delta": "0.1"}, "delta"),
        ({"target-epsilon": "1e-300"}, "target-epsilon"),
        ({"target-epsilon": "1e308"}, "target-epsilon"),
        ({"seed": "-1"}, "seed"),
        ({"alpha": "nan"}, "alpha"),
        ({"round-timeout": "inf"}, "round-timeout"),
    ],
)
def test_run_config_refuses_values_that_cannot_work(values, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flower({"preset": "digits", **values})


def test_run_config_accepts_the_edges_of_its_ranges():
    assert RunConfig.from_flower({"target-epsilon": "0.05"}).target_epsilon == 0.05
    assert RunConfig.from_flower({"target-epsilon": "100"}).target_epsilon == 100
    assert RunConfig.from_flower({"target-epsilon": "inf"}).private is False
    assert RunConfig.from_flower({"delta": "1e-6"}).delta == 1e-6


# -------------------------------------------------------------------------------- simulate CLI
@pytest.mark.parametrize(
    "args, words",
    [
        (["--epsilon", "1e-300"], ["target-epsilon", "[0.01, 100]"]),
        (["--epsilon", "1e308"], ["target-epsilon", "[0.01, 100]"]),
        (["--client-gpus", "-1"], ["--client-gpus"]),
        (["--client-gpus", "nan"], ["--client-gpus", "finite"]),
        (["--client-cpus", "0"], ["--client-cpus"]),
        (["--client-cpus", "100000"], ["--client-cpus"]),
        (["--seed", "-1"], ["--seed", ">= 0"]),
        (["--clients", "0"], ["--clients"]),
        (["--rounds", "-2"], ["--rounds"]),
        (["--run-config", "lr='1"], ["'lr'", "quote"]),
        (["--run-config", "lr"], ["key=value"]),
        (["--run-config", "max-grad-norm=inf"], ["max-grad-norm"]),
        (["--run-config", "noise-multiplier=inf"], ["noise-multiplier"]),
        (["--run-config", "delta=0.5"], ["delta"]),
        (
            ["--secure-aggregation", "he", "--run-config", "he-public-context=/nonexistent/public.ctx"],
            ["he-public-context", "/nonexistent/public.ctx", "privatune keygen"],
        ),
    ],
)
def test_simulate_refuses_bad_input_in_one_line(tmp_path, args, words):
    start = time.perf_counter()
    result = simulate(tmp_path, *args)
    assert_one_line_error(result, *words)
    assert time.perf_counter() - start < 15
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_public_context_that_does_not_load_is_refused_before_the_run(tmp_path):
    bad = tmp_path / "public.ctx"
    bad.write_bytes(b"not a context")
    result = simulate(tmp_path, "--secure-aggregation", "he", "--run-config", f"he-public-context={bad}")
    assert_one_line_error(result, "he-public-context", str(bad))
    assert not (tmp_path / "out" / "summary.json").exists()


def test_labels_that_the_preset_dataset_lacks_are_named(tmp_path):
    result = runner.invoke(
        app,
        [
            "simulate",
            "--preset",
            "sms-spam",
            "--clients",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--run-config",
            "labels=x,y",
        ],
    )
    assert_one_line_error(result, "labels", "ham,spam", "x,y")


@pytest.mark.parametrize("kind", ["file", "proc", "sys"])
def test_an_out_folder_that_cannot_take_the_run_is_refused_up_front(tmp_path, kind):
    if kind == "file":
        out = tmp_path / "a-file"
        out.write_text("x")
        words = ["is a file"]
    elif kind == "proc":
        out, words = Path("/proc"), ["/proc", "cannot write"]
    else:
        out, words = Path("/sys/kernel/privatune-probe-test"), ["cannot write"]
    assert_one_line_error(simulate(tmp_path, out=out), "--out", *words)


def test_an_unwritable_out_folder_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real_open = open

    def refusing_open(path, *a, **k):  # root ignores chmod, so refuse the probe file directly
        if ".privatune-probe" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", refusing_open)
    assert_one_line_error(simulate(tmp_path, out=out), "--out", "Permission denied")


def fake_run(folder: Path) -> None:
    (folder / "ledgers").mkdir(parents=True)
    (folder / "ledgers" / "site-client-0.ledger.sqlite").write_bytes(b"x")
    (folder / "summary.json").write_text('{"status": "completed"}')
    (folder / "metrics.jsonl").write_text("{}\n")


def test_a_rerun_into_a_run_folder_is_refused_and_names_overwrite(tmp_path):
    fake_run(tmp_path / "old")
    line = assert_one_line_error(simulate(tmp_path, out=tmp_path / "old"), "already holds a run", "--overwrite")
    assert "resume" not in line.lower()
    assert (tmp_path / "old" / "summary.json").exists()


def test_overwrite_empties_a_run_folder_and_only_a_run_folder(tmp_path):
    fake_run(tmp_path / "old")
    # The run itself is then refused for another reason (no key file), after the folder was claimed.
    result = simulate(
        tmp_path,
        "--overwrite",
        "--secure-aggregation",
        "he",
        "--run-config",
        "he-public-context=/nonexistent",
        out=tmp_path / "old",
    )
    assert_one_line_error(result, "he-public-context")
    assert list((tmp_path / "old").iterdir()) == []
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("x")
    assert_one_line_error(simulate(tmp_path, "--overwrite", out=foreign), "not a privatune run folder")
    mixed = tmp_path / "mixed"
    fake_run(mixed)
    (mixed / "thesis.docx").write_text("x")
    assert_one_line_error(simulate(tmp_path, "--overwrite", out=mixed), "thesis.docx")
    assert (mixed / "thesis.docx").exists() and (mixed / "summary.json").exists()


# --------------------------------------------------------------------------- keys, decrypt, audit
def test_keygen_lists_the_allowed_ring_sizes(tmp_path):
    result = runner.invoke(app, ["keygen", "--out", str(tmp_path / "k"), "--poly-modulus-degree", "3"])
    assert_one_line_error(result, "--poly-modulus-degree", "8192, 16384, 32768")


def test_keygen_over_existing_keys_needs_the_real_overwrite_flag(tmp_path):
    keys = tmp_path / "k"
    keys.mkdir()
    (keys / "public.ctx").write_text("old")
    line = assert_one_line_error(runner.invoke(app, ["keygen", "--out", str(keys)]), "--overwrite")
    assert "overwrite=True" not in line
    result = runner.invoke(app, ["keygen", "--out", str(keys), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (keys / "public.ctx").read_bytes() != b"old"


def test_decrypt_given_folders_says_which_option(tmp_path):
    result = runner.invoke(
        app,
        [
            "decrypt",
            "--secret-context",
            str(tmp_path),
            "--checkpoint",
            str(tmp_path),
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert_one_line_error(result, "--secret-context", "folder")
    (tmp_path / "s.ctx").write_bytes(b"x")
    result = runner.invoke(
        app,
        [
            "decrypt",
            "--secret-context",
            str(tmp_path / "s.ctx"),
            "--checkpoint",
            str(tmp_path),
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert_one_line_error(result, "--checkpoint", "folder")


def test_decrypt_with_missing_files_is_one_line(tmp_path):
    result = runner.invoke(
        app,
        [
            "decrypt",
            "--secret-context",
            str(tmp_path / "none.ctx"),
            "--checkpoint",
            str(tmp_path / "none.ckpt"),
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert_one_line_error(result, "none.ctx")


def test_audit_json_to_an_unwritable_path_is_refused_before_the_audit(tmp_path):
    result = runner.invoke(app, ["audit", str(tmp_path), "--json", "/proc/privatune-audit.json"])
    assert_one_line_error(result, "--json", "/proc")


# ---------------------------------------------------------------------------- site config, data
def test_node_config_errors_name_the_key():
    from privatune.client.site_config import SiteConfig, SiteConfigError

    cfg = RunConfig.from_flower({"preset": "sms-spam"})
    base = {"site-id": "a", "data-path": "/x.csv", "ledger-path": "/tmp/l.sqlite"}
    with pytest.raises(SiteConfigError, match="max-epsilon: 'abc' is not a number"):
        SiteConfig.from_node_config({**base, "max-epsilon": "abc"}, cfg)
    with pytest.raises(SiteConfigError, match="max-epsilon"):
        SiteConfig.from_node_config({**base, "max-epsilon": "nan"}, cfg)
    with pytest.raises(SiteConfigError, match=r"he-secret-context: .* is a folder"):
        SiteConfig.from_node_config({**base, "he-secret-context": "/tmp"}, cfg)


def test_a_huge_csv_field_says_its_size_and_the_limit(tmp_path):
    import csv

    from privatune.client.site_data import SiteDataError, SiteDataSpec, load_site_data

    path = tmp_path / "big.csv"
    path.write_text('text,label\n"' + "x" * 200_000 + '",ham\n')
    with pytest.raises(SiteDataError) as err:
        load_site_data(SiteDataSpec(path=path, format="csv"), ("ham", "spam"), kind="text")
    msg = str(err.value)
    assert f"field too large (200000 bytes), limit {csv.field_size_limit()}" in msg
    assert "quoting" not in msg.lower()


@pytest.mark.parametrize("fmt", ["csv", "image-folder"])
def test_a_symlink_loop_is_called_one(tmp_path, fmt):
    from privatune.client.site_data import SiteDataError, SiteDataSpec, load_site_data

    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    kind = "text" if fmt == "csv" else "image"
    with pytest.raises(SiteDataError, match="symlink loop"):
        load_site_data(SiteDataSpec(path=loop, format=fmt), ("ham", "spam"), kind=kind)


# ------------------------------------------------------------------------------------ the handler
def test_an_unexpected_error_is_one_line_with_a_log_of_the_traceback(tmp_path, monkeypatch):
    import privatune.cli as cli

    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr("privatune.simulations.run_folder.claim", boom)
    result = simulate(tmp_path)
    assert result.exit_code == 3, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "unexpected KeyError" in lines[0] and "traceback in " in lines[0]
    log = Path(lines[0].split("traceback in ")[1].split(";")[0])
    assert "Traceback (most recent call last)" in log.read_text() and "surprise" in log.read_text()
    log.unlink()
    assert cli._innermost_known(RuntimeError("An error was encountered")) is None
    try:
        import fractions

        fractions.Fraction("not a fraction")  # a ValueError from inside a library: unexpected
    except ValueError as err:
        assert cli._innermost_known(err) is None
    try:
        RunConfig.from_flower({"lr": "-1"})  # privatune's own: known
    except ValueError as err:
        assert cli._innermost_known(err) is err
    wrapped = RuntimeError("An error was encountered. Ending simulation.")
    wrapped.__cause__ = ConfigError("labels: bad")
    assert str(cli._innermost_known(wrapped)) == "labels: bad"


# ------------------------------------------------------------------------------ real federations
def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        **OFFLINE_ENV,
    }
    env.pop("FLWR_HOME", None)
    env.pop("MPLCONFIGDIR", None)
    return env


@pytest.mark.slow
def test_a_run_where_every_client_fails_exits_1_as_failed(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "privatune.cli",
        "simulate",
        "--preset",
        "digits",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--out",
        str(out),
        "--run-config",
        "sim-max-epsilon=0.01 max-records=300",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    assert set(summary["failure_reasons"]) == {"client-0", "client-1"}
    assert all("budget" in r for r in summary["failure_reasons"].values())
    assert "run failed" in proc.stdout and "client-0: budget exhausted" in proc.stdout
    for f in [out / "summary.json", out / "metrics.jsonl", *out.rglob("*.sqlite")]:
        data = f.read_bytes()
        assert b"\x1b[" not in data and b"RayTaskError" not in data and b"Traceback" not in data, f


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_simulation_within_seconds_and_leaves_no_process(tmp_path, signum):
    from privatune.simulations.stopping import alive, descendants

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "privatune.cli",
        "simulate",
        "--preset",
        "digits",
        "--clients",
        "2",
        "--rounds",
        "3",
        "--out",
        str(out),
        "--run-config",
        "max-records=300",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path), cwd=tmp_path
    )
    seen: set[int] = set()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # round 0 is the untrained evaluation; round 1 is training after it
            lines.append(line)
            if "round 0/3" in line or time.monotonic() > deadline:
                break
        assert any("round 0/3" in ln for ln in lines), "".join(lines)
        for _ in range(20):  # 2 s of snapshots: Ray's processes and the client actors
            seen.update(descendants(proc.pid))
            time.sleep(0.1)
        assert seen, "the simulation started no child process"
        t0 = time.monotonic()
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 10 and proc.returncode == 128 + signum, "".join(lines) + rest
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and signal.Signals(signum).name in summary["stopped_reason"]
    time.sleep(0.5)
    assert [p for p in seen if alive(p)] == []
    from privatune.common.ledger import verify_chain

    for ledger in out.rglob("*.ledger.sqlite"):  # an append is one transaction: every chain still verifies
        assert verify_chain(ledger) == [], ledger


# ---------------------------------------------------------------------------------- the campaign
def test_the_campaign_classifies_each_way_a_case_can_end():
    from privatune.simulations.fault_campaign import classify

    assert classify(None, "", "", "x") == "hang"
    assert classify(1, "", "Traceback (most recent call last):\n  File ...\nValueError: x", "x") == "traceback"
    assert classify(0, "RayTaskError(ClientAppException)", "", "x") == "traceback"
    assert classify(0, "completed", "", "x") == "silent"
    assert classify(2, "", "error: --seed must be >= 0", "--seed") == "clear"
    assert classify(2, "", "error: something else", "--seed") == "vague"
    assert classify(3, "", "error: unexpected KeyError: 'a' (traceback in /tmp/x.log)", "KeyError") == "vague"


def test_the_campaign_runs_a_case_through_the_real_cli(capsys):
    from privatune.simulations.fault_campaign import main

    assert main(["--only", "--seed -1", "--timeout", "60"]) == 0
    assert "counts: clear 1 (of 1)" in capsys.readouterr().out
