"""Fault campaign: feed the real CLI bad input and classify how each case ends.

Each case runs ``python -m privatune.cli ...`` in a subprocess with a timeout and is classified as

- ``clear``: a non-zero exit with a short error (at most 2 lines on stderr), no traceback, naming what
  the case expects (the key, file or option);
- ``vague``: a non-zero exit without a traceback, but the message misses what it should name, or the
  CLI calls the error unexpected (one line plus a log file: a case the code did not foresee);
- ``silent``: exit 0 on a broken input;
- ``traceback``: a Python traceback, or Ray's class names or colour codes, in the output;
- ``hang``: still running at the timeout.

    python -m privatune.simulations.fault_campaign [--timeout 60] [--json results.json]

Nothing trains: every case must be refused before a simulation starts, so the campaign takes about
a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from privatune.common.offline import OFFLINE_ENV

TRACEBACK_SIGNS = re.compile(
    r"Traceback \(most recent call last\)|RayTaskError|ClientAppException|\x1b\[|╭─+ Traceback"
)


@dataclass
class Case:
    name: str
    args: list[str]
    expect: str  # a word the error must contain (case-insensitive)
    setup: Callable[[Path], None] | None = None


@dataclass
class Outcome:
    name: str
    verdict: str
    rc: int | None
    seconds: float
    message: str


def _sim(tmp: Path, *extra: str, out: str | None = None) -> list[str]:
    return [
        "simulate",
        "--preset",
        "digits",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--out",
        out or str(tmp / "out"),
        *extra,
    ]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _site(tmp: Path, node: str, run: str = 'preset="sms-spam"') -> list[str]:
    return ["site", "check", "--node-config", node, "--run-config", run]


def cases(tmp: Path) -> list[Case]:
    big_csv = tmp / "big.csv"
    loop = tmp / "loop"
    keys = tmp / "keys"
    old_run = tmp / "old-run"
    a_file = tmp / "a-file.txt"
    _write(tmp / "s.csv", "text,label\nhello,ham\nbuy now,spam\n")  # a valid site file for the node-config cases

    # Setups of more than one step (a case's setup returns nothing; a lambda would build a tuple).
    def make_old_run(t: Path) -> None:
        _write(old_run / "summary.json", '{"status": "completed"}')
        (old_run / "ledgers").mkdir(exist_ok=True)

    def make_loop(t: Path) -> None:
        loop.unlink(missing_ok=True)
        os.symlink(loop, loop)

    def make_keys(t: Path) -> None:
        keys.mkdir(exist_ok=True)
        _write(keys / "public.ctx", "x")

    return [
        # background list of issue 9
        Case("max-grad-norm=inf", _sim(tmp, "--run-config", "max-grad-norm=inf"), "max-grad-norm"),
        Case("noise-multiplier=inf", _sim(tmp, "--run-config", "noise-multiplier=inf"), "noise-multiplier"),
        Case("delta=0.5", _sim(tmp, "--run-config", "delta=0.5"), "delta"),
        Case("--epsilon 1e-300", _sim(tmp, "--epsilon", "1e-300"), "target-epsilon"),
        Case("--epsilon 1e308", _sim(tmp, "--epsilon", "1e308"), "target-epsilon"),
        Case("--client-gpus -1", _sim(tmp, "--client-gpus", "-1"), "--client-gpus"),
        Case("--client-gpus nan", _sim(tmp, "--client-gpus", "nan"), "--client-gpus"),
        Case(
            "rerun into a run folder",
            _sim(tmp, out=str(old_run)),
            "--overwrite",
            setup=make_old_run,
        ),
        Case('--run-config "lr=\'1"', _sim(tmp, "--run-config", "lr='1"), "lr"),
        Case(
            "labels=x,y on sms-spam",
            [
                "simulate",
                "--preset",
                "sms-spam",
                "--clients",
                "2",
                "--out",
                str(tmp / "out"),
                "--run-config",
                "labels=x,y",
            ],
            "ham,spam",
        ),
        Case(
            "he-public-context=/nonexistent",
            _sim(tmp, "--secure-aggregation", "he", "--run-config", "he-public-context=/nonexistent"),
            "he-public-context",
        ),
        Case("--out at a file", _sim(tmp, out=str(a_file)), "is a file", setup=lambda t: _write(a_file, "x")),
        Case("--out /proc", _sim(tmp, out="/proc"), "--out"),
        Case("--out unwritable (/sys/kernel/x)", _sim(tmp, out="/sys/kernel/privatune-x"), "--out"),
        Case(
            "keygen --poly-modulus-degree 3", ["keygen", "--out", str(tmp / "k3"), "--poly-modulus-degree", "3"], "8192"
        ),
        Case(
            "decrypt given a folder",
            ["decrypt", "--secret-context", str(tmp), "--checkpoint", str(tmp), "--out", str(tmp / "x.safetensors")],
            "folder",
        ),
        Case(
            "he-secret-context=<folder>",
            _site(tmp, f'site-id=a data-path="{tmp}/s.csv" ledger-path="{tmp}/l.sqlite" he-secret-context="{tmp}"'),
            "he-secret-context",
        ),
        Case("audit --json unwritable", ["audit", str(tmp), "--json", "/proc/privatune-audit.json"], "--json"),
        Case(
            "50 MB text field",
            _site(tmp, f'site-id=a data-path="{big_csv}" ledger-path="{tmp}/l.sqlite"'),
            "field too large",
            setup=lambda t: _write(big_csv, 'text,label\n"' + "x" * 50_000_000 + '",ham\n'),
        ),
        Case(
            "symlink loop",
            _site(tmp, f'site-id=a data-path="{loop}" data-format=csv ledger-path="{tmp}/l.sqlite"'),
            "symlink loop",
            setup=make_loop,
        ),
        Case(
            'max-epsilon="abc"',
            _site(tmp, f'site-id=a data-path="{tmp}/s.csv" ledger-path="{tmp}/l.sqlite" max-epsilon="abc"'),
            "not a number",
        ),
        Case("--seed -1", _sim(tmp, "--seed", "-1"), "--seed"),
        Case(
            "keygen over existing keys",
            ["keygen", "--out", str(keys)],
            "--overwrite",
            setup=make_keys,
        ),
        # a few more
        Case("--clients 0", _sim(tmp, "--clients", "0"), "--clients"),
        Case("--rounds -1", _sim(tmp, "--rounds", "-1"), "--rounds"),
        Case("--client-cpus 0", _sim(tmp, "--client-cpus", "0"), "--client-cpus"),
        Case("--client-cpus 1000", _sim(tmp, "--client-cpus", "1000"), "--client-cpus"),
        Case("--alpha nan", _sim(tmp, "--alpha", "nan"), "alpha"),
        Case("unknown run-config key", _sim(tmp, "--run-config", "learning-rate=1"), "learning-rate"),
        Case("batch-size=abc", _sim(tmp, "--run-config", "batch-size=abc"), "batch-size"),
        Case("--run-config without =", _sim(tmp, "--run-config", "lr"), "key=value"),
        Case(
            "--overwrite on a foreign folder",
            _sim(tmp, "--overwrite", out=str(tmp / "photos")),
            "not a privatune run",
            setup=lambda t: _write(t / "photos" / "holiday.jpg", "x"),
        ),
        Case(
            "decrypt missing files",
            [
                "decrypt",
                "--secret-context",
                str(tmp / "nope.ctx"),
                "--checkpoint",
                str(tmp / "nope.ckpt"),
                "--out",
                str(tmp / "x.safetensors"),
            ],
            "nope",
        ),
        Case("audit a missing path", ["audit", str(tmp / "no-such-ledger.sqlite")], "no-such-ledger"),
        Case("keygen --out at a file", ["keygen", "--out", str(a_file)], "is a file"),
        Case(
            "max-epsilon=nan",
            _site(tmp, f'site-id=a data-path="{tmp}/s.csv" ledger-path="{tmp}/l.sqlite" max-epsilon=nan'),
            "max-epsilon",
        ),
    ]


def classify(rc: int | None, stdout: str, stderr: str, expect: str) -> str:
    if rc is None:
        return "hang"
    text = stdout + stderr
    if TRACEBACK_SIGNS.search(text):
        return "traceback"
    if rc == 0:
        return "silent"
    err_lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if expect.lower() in text.lower() and len(err_lines) <= 2 and "unexpected" not in stderr:
        return "clear"
    return "vague"


def _message(stdout: str, stderr: str) -> str:
    lines = [ln.strip() for ln in (stderr or stdout).splitlines() if ln.strip()]
    fail = [ln for ln in (stdout + "\n" + stderr).splitlines() if "FAIL" in ln or "error" in ln.lower()]
    pick = fail[0] if fail else (lines[-1] if lines else "")
    return re.sub(r"\s+", " ", pick)[:160]


def run_case(case: Case, tmp: Path, timeout: float, root: Path) -> Outcome:
    if case.setup is not None:
        case.setup(tmp)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        **OFFLINE_ENV,
        "COLUMNS": "200",
        "TERM": "dumb",
    }
    env.pop("FLWR_HOME", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "privatune.cli", *case.args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        rc = None
    seconds = time.perf_counter() - t0
    return Outcome(case.name, classify(rc, out, err, case.expect), rc, seconds, _message(out, err))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    ap.add_argument("--json", type=Path, default=None, help="write the outcomes here")
    ap.add_argument("--only", default="", help="run only cases whose name contains this text")
    ap.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the privatune source tree under test (default: this one), e.g. an older commit's",
    )
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="pt-faults-"))
    outcomes: list[Outcome] = []
    try:
        for case in cases(tmp):
            if args.only and args.only not in case.name:
                continue
            o = run_case(case, tmp, args.timeout, args.root.resolve())
            outcomes.append(o)
            print(f"{o.verdict:9s} rc={o.rc!s:4s} {o.seconds:5.1f}s  {o.name}: {o.message}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.verdict] = counts.get(o.verdict, 0) + 1
    print("\n| case | verdict | exit | seconds |\n|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.name} | {o.verdict} | {o.rc} | {o.seconds:.1f} |")
    print("\ncounts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(outcomes)})")
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "cases": [asdict(o) for o in outcomes]}, indent=2))
    return 0 if all(o.verdict == "clear" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
