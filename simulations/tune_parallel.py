"""``privatune tune --jobs N``: N trials at once, each in its own worker process on the study's SQLite storage.

Each worker is a fresh process (multiprocessing "spawn": no forked Ray, torch or SQLite state) that loads the
study from STUDY/study.db and runs trials (simulations/tune.py ``run_trial``) until the study's remaining trials
are taken: a counter shared by the workers hands out the trials, so exactly the planned number run. What makes
two simulations at once safe on one machine:

- Ray: each trial's ``run_simulation`` starts its own local Ray instance in its own temporary folder
  (``_temp_dir``, removed after the run), with its own ports; two instances do not share state.
- The run folder: each trial writes STUDY/trials/trial-NNNN (the trial number is unique in the storage).
- The sites' ledgers (STUDY/ledgers, shared): every append takes SQLite's write lock first (``BEGIN IMMEDIATE``,
  common/ledger/storage.py) and reads the chain's head under it, so two trials appending to one site's ledger
  serialise and the chain stays whole; the site key is created atomically (client/site_secret.py).
- What is not safe: a site budget (``sim-max-epsilon``). The study projects each trial against the ledgers before
  it runs, and a site's guard plans each round from its ledger before recording it; a trial running at the same
  time is not in the ledgers yet, so both projections (and both plans) could pass a budget together. ``--jobs``
  above 1 is therefore refused with a site budget (``check_jobs``).
- The sampler: worker k seeds its sampler with seed + k, so two workers do not propose the same trial (the grid
  sampler takes its next grid point from the storage).

Progress lines come from every worker as they happen; each starts with its trial's number.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from privatune.simulations.tune import TuneOptions


def check_jobs(jobs: int, sim_max_epsilon: float) -> str:
    """ "" when --jobs can run, else why not (one line naming the option and the fix)."""
    if jobs < 1:
        return f"--jobs must be >= 1, got {jobs}"
    if jobs > 1 and sim_max_epsilon > 0:
        return (
            f"--jobs {jobs} with a site budget (sim-max-epsilon={sim_max_epsilon:g}) is refused: the budget stop "
            "projects each trial against the sites' ledgers before it runs, and a trial running at the same time is "
            "not in them yet, so together they could pass the budget; use --jobs 1 with a site budget"
        )
    return ""


def _say(line: str) -> None:
    print(line, flush=True)


def _worker(opts: TuneOptions, study_id: str, remaining: Any) -> None:
    import optuna

    from privatune.simulations.tune import open_study, run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(opts)
    while True:
        with remaining.get_lock():
            if remaining.value <= 0:
                return
            remaining.value -= 1
        run_trial(study, opts, study_id)  # no budget stop here: check_jobs refused a site budget


def run_parallel(opts: TuneOptions, study_id: str, to_run: int) -> None:
    """Run ``to_run`` trials with ``opts.jobs`` workers at once; returns when all have finished."""
    from privatune.common.config import RunConfig
    from privatune.simulations.tune import TuneError

    refused = check_jobs(opts.jobs, RunConfig.from_flower(dict(opts.base)).sim_max_epsilon)
    if refused:
        raise TuneError(refused)
    if to_run <= 0:
        return
    ctx = mp.get_context("spawn")
    remaining = ctx.Value("i", to_run)
    workers = []
    for k in range(min(opts.jobs, to_run)):
        worker_opts = replace(opts, worker=k, say=_say, after_trial=None)
        workers.append(ctx.Process(target=_worker, args=(worker_opts, study_id, remaining), name=f"trial-worker-{k}"))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    failed = [f"{w.name} exit code {w.exitcode}" for w in workers if w.exitcode != 0]
    if failed:
        raise TuneError(
            f"--jobs {opts.jobs}: {', '.join(failed)} (its error is above); the trials it finished are in the "
            "study: run the same command again to go on"
        )
