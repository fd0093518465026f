"""One run per folder: ``--out`` is checked and claimed before anything starts.

A second run written into the folder of a first would reuse its ledgers (its spent budget) and
append to its metrics, so the table and the ledgers would describe different runs. A folder that
holds a run is refused unless ``--overwrite`` is given, and ``--overwrite`` only ever deletes a
folder that looks like a privatune run folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from privatune.common.ledger import SERVER_LEDGER_NAME, SQLITE_SIDE_SUFFIXES

# Files and folders a privatune run leaves (server/run_record.py, server/app.py, simulations/simulate.py).
RUN_MARKERS = ("summary.json", "config.json", "metrics.jsonl", "ledgers", SERVER_LEDGER_NAME)
RUN_ENTRIES = frozenset(
    (
        *RUN_MARKERS,
        "rounds.png",
        "global.safetensors",
        "global.he-checkpoint",
        "global.decrypted.safetensors",
        "keys",
        "cache",
        "data",  # privatune simulate --data: the canonical copy of the user's records (common/sim_data.py)
        "evaluation",  # privatune evaluate's reports on the run's model (its default --out, privatune/cli/evaluate.py)
        ".flwr",
        ".cache",
        "checkpoint",  # the server's state after every round (server/checkpoint.py)
        "simulation.json",  # the number of clients, for --resume (simulations/resume.py)
        "personalisation",  # privatune personalise's per-client report (simulations/personalise.py)
        *(SERVER_LEDGER_NAME + suffix for suffix in SQLITE_SIDE_SUFFIXES),
    )
)


class RunFolderError(ValueError):
    """``--out`` cannot take this run; the message names the folder and the fix."""


def _why(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symlink loop"
    return err.strerror or str(err)


def check_writable(out: Path) -> Path:
    """Create ``out`` if needed and prove we can write there (a probe file made and removed)."""
    try:
        out = Path(os.path.abspath(out))
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out} is a file, not a folder: give a folder path for the run's results")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".privatune-probe-{os.getpid()}"
        with open(probe, "w") as fh:
            fh.write("probe\n")
        probe.unlink()
    except RunFolderError:
        raise
    except OSError as err:
        raise RunFolderError(
            f"--out {out}: cannot write there ({_why(err)}); choose a folder you can write to"
        ) from None
    return out


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / m).exists() for m in ("summary.json", "ledgers", SERVER_LEDGER_NAME))


def claim(out: Path, overwrite: bool) -> Path:
    """Make ``out`` ready for a new run: refuse one that holds a run, or empty it under ``overwrite``."""
    out = Path(os.path.abspath(out))
    if out.exists() and out.is_dir():
        if holds_run(out) and not overwrite:
            raise RunFolderError(
                f"--out {out} already holds a run (summary.json or ledgers/); a second run would mix its "
                "ledgers and metrics with the first: choose another folder, or pass --overwrite to delete "
                "the old run"
            )
        if overwrite and any(out.iterdir()):
            entries = {p.name for p in out.iterdir()}
            if not any(m in entries for m in RUN_MARKERS):
                raise RunFolderError(
                    f"--out {out} is not empty and is not a privatune run folder (no summary.json, config.json, "
                    "metrics.jsonl or ledgers/); --overwrite deletes only run folders: choose another folder"
                )
            foreign = sorted(entries - RUN_ENTRIES - {n for n in entries if n.startswith(".privatune-probe")})
            if foreign:
                raise RunFolderError(
                    f"--out {out} holds files a run does not write ({', '.join(foreign[:5])}); --overwrite "
                    "will not delete them: move them or choose another folder"
                )
            for p in out.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    return check_writable(out)
