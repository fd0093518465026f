"""``privatune tune --total-epsilon E``: the study is given its total epsilon *including tuning* and calibrates the
target epsilon each trial runs at, so that the study's cost (the way ``--privacy`` counts it) is E.

A trial with target epsilon e runs, at each simulated site, the mechanism the site's guard plans for it: noise
calibrated by the project's own calibration (client/privacy_guard.py ``plan_noise``, i.e. common/accounting.py
``calibrate_noise`` under the run's accountant) for the site's training records, sample rate and steps, plus the
noised metric releases of ``release-metrics`` (client/metrics_release.py ``planned_releases``). A trial's RDP curve
is the composition of those; where sites differ (their record counts, so their sample rates and steps), and where
the search space varies ``batch-size``, ``num-server-rounds`` or ``local-epochs``, the study bounds every trial by
the pointwise largest curve of them all (the worst site of the worst setting). Training and metric releases are
composed although they touch disjoint records: the same over-statement the study's own selection total makes from
the ledgers (simulations/tune.py ``privacy_totals``), so the reported total is the one calibrated.

- ``select``: e such that the repeat-and-select bound (tune_privacy ``selection_epsilon``'s, with the study's mean,
  shape and delta) on that worst curve is E;
- ``compose``: e such that RDP composition of the planned number of trials' worst curves is E (the sites' ledgers
  compose under the run's accountant, at most the RDP figure for the same mechanisms);
- ``public``: the trials spend nothing on the private data; the final private run is given E itself.

e is found by a safeguarded interpolation (a bisection at worst) below E; since the calibration's own tolerance makes the bound a step
function of e, the e kept is the largest one tried whose bound is at most E, and the bound it reaches is reported.
Before each trial the study checks that its curve is within the calibrated worst one (a search key this module
does not enumerate may change the mechanism): a trial that is not is refused, never run.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from privatune.common.accounting import TARGET_EPSILON_MAX, TARGET_EPSILON_MIN, sample_rate, steps_per_epoch
from privatune.common.config import RunConfig
from privatune.simulations.tune import TuneError
from privatune.simulations.tune_privacy import ORDERS, curve_epsilon, distribution_shape, selection_of_curve

if TYPE_CHECKING:  # pragma: no cover
    from privatune.simulations.tune import TuneOptions

# Searched keys that set a trial's mechanism and are enumerated over the space's grid for the worst curve.
ENUMERATED_KEYS = ("batch-size", "num-server-rounds", "local-epochs")
# Searched keys --total-epsilon refuses: they are what it sets, or change the accounting itself.
REFUSED_KEYS = (
    "target-epsilon",
    "dp",
    "noise-multiplier",
    "delta",
    "accountant",
    "release-metrics",
    "metrics-noise-multiplier",
)
MAX_SETTINGS = 64  # enumerated combinations of ENUMERATED_KEYS at most
REL_TOLERANCE = 2e-4  # the bisection stops once the bound is this close below E
MAX_STEPS = 40


class TotalEpsilonError(TuneError):
    """--total-epsilon cannot be met; the message names the option and the fix."""


def site_counts(cfg: RunConfig, clients: int) -> list[tuple[float, int]]:
    """Per simulated site: (its delta for this run, its training records), as the site loads them."""
    from privatune.client.privacy_guard import run_delta
    from privatune.client.round import load_local_data
    from privatune.client.site_config import SiteConfig

    out = []
    for pid in range(clients):
        site = SiteConfig.from_node_config({"partition-id": pid, "num-partitions": clients}, cfg)
        out.append((run_delta(cfg, site.delta), len(load_local_data(cfg, site).train_ids)))
    return out


def mechanisms(cfg: RunConfig, delta: float, n: int) -> list[tuple[float, float, int]]:
    """What a whole trial of ``cfg`` runs at a site of ``n`` training records: training, then metric releases."""
    from privatune.client.metrics_release import planned_releases
    from privatune.client.privacy_guard import plan_noise

    steps = cfg.num_server_rounds * cfg.local_epochs * steps_per_epoch(n, cfg.batch_size)
    return [(plan_noise(cfg, n, delta), sample_rate(n, cfg.batch_size), steps), *planned_releases(cfg)]


def rdp_curve(mechanisms: list[tuple[float, float, int]]) -> np.ndarray:
    """The RDP curve (at tune_privacy.ORDERS) of composing Poisson-subsampled Gaussians, by dp-accounting."""
    return np.sum([_one_curve(*m) for m in mechanisms], axis=0)


@functools.lru_cache(maxsize=4096)
def _one_curve(sigma: float, q: float, steps: int) -> np.ndarray:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    gauss = dp_accounting.GaussianDpEvent(sigma)
    one = gauss if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gauss)
    acc = RdpAccountant(list(ORDERS))
    logging.disable(logging.WARNING)  # dp-accounting warns per order it cannot bound (that order is then inf)
    try:
        acc.compose(dp_accounting.SelfComposedDpEvent(one, int(steps)))
    finally:
        logging.disable(logging.NOTSET)
    return np.asarray(acc._rdp, dtype=float)


def settings_of(opts: TuneOptions) -> list[dict[str, Any]]:
    """The combinations of the searched ENUMERATED_KEYS (their grid), each a dict of run-config values."""
    from privatune.simulations.tune_space import SpaceError

    searched = [p for p in opts.space if p.key in ENUMERATED_KEYS]
    refused = [p.key for p in opts.space if p.key in REFUSED_KEYS]
    if refused:
        raise TotalEpsilonError(
            f"--total-epsilon sets each trial's privacy: the space cannot search {', '.join(refused)}; fix it in "
            "--run-config or --config instead"
        )
    try:
        grids = [p.grid() for p in searched]
    except SpaceError as err:
        raise TotalEpsilonError(f"--total-epsilon needs the worst trial's mechanism: {err}") from None
    combos = [dict(zip([p.key for p in searched], values, strict=True)) for values in itertools.product(*grids)]
    if len(combos) > MAX_SETTINGS:
        raise TotalEpsilonError(
            f"--total-epsilon: the space's {' x '.join(str(len(g)) for g in grids)} settings of "
            f"{', '.join(ENUMERATED_KEYS)} are over {MAX_SETTINGS} to bound; search fewer values of them"
        )
    return combos


def worst_curve(settings: list[tuple[RunConfig, list[tuple[float, int]]]], epsilon: float) -> np.ndarray:
    """The pointwise largest RDP curve of any site in any setting, every trial at target ``epsilon``."""
    distinct = set()
    for cfg, sites in settings:
        at_e = replace(cfg, target_epsilon=epsilon)
        distinct |= {tuple(mechanisms(at_e, delta, n)) for delta, n in sites}
    return np.max(np.stack([rdp_curve(list(m)) for m in distinct]), axis=0)


def trial_curve(cfg: RunConfig, clients: int) -> np.ndarray:
    """One trial's own worst curve over the sites (what the check before a trial compares)."""
    return worst_curve([(cfg, site_counts(cfg, clients))], cfg.target_epsilon)


def bound_of(opts: TuneOptions, curve: np.ndarray, delta: float, trials: int) -> float:
    """The study's epsilon (at ``delta``) with every trial bounded by ``curve``, the way --privacy counts it."""
    if opts.privacy == "select":
        return selection_of_curve(curve, opts.trials_mean, distribution_shape(opts.distribution, opts.nb_shape), delta)
    return curve_epsilon(curve * trials, delta)


def calibrate(opts: TuneOptions, trials: int, delta: float) -> dict[str, Any]:
    """The per-trial target epsilon for ``opts.total_epsilon`` (module docstring), and what it reaches."""
    total = opts.total_epsilon
    if opts.privacy == "public":
        return {
            "total_epsilon": total,
            "privacy": "public",
            "per_trial_epsilon": total,
            "bound": total,
            "how": _HOW["public"],
        }
    if opts.privacy == "compose" and trials < 1:
        raise TotalEpsilonError(
            "--total-epsilon with --privacy compose needs a planned number of trials to share it: give --trials N "
            "(N >= 1; 0, the whole grid, is counted only with --sampler grid)"
        )
    from privatune.simulations.tune import trial_config

    combos = settings_of(opts)
    settings = []
    for combo in combos:
        cfg = trial_config(opts, combo, 0, "calibration")
        settings.append((cfg, site_counts(cfg, opts.clients)))

    def f(e: float) -> tuple[float, np.ndarray]:
        curve = worst_curve(settings, e)
        return bound_of(opts, curve, delta, trials), curve

    from privatune.common.accounting import AccountingError

    hi = min(total, TARGET_EPSILON_MAX)
    lo = hi / 8
    while True:  # a lower end whose bound is within the total (RDP cannot certify the smallest targets)
        try:
            f_lo, curve = f(lo)
        except AccountingError:
            f_lo = math.inf
        if f_lo <= total:
            break
        if lo / 4 < TARGET_EPSILON_MIN:
            raise TotalEpsilonError(
                f"--total-epsilon {total:g}: even trials at target epsilon {lo:.3g} cost {f_lo:.3f} "
                f"({opts.privacy}); raise --total-epsilon, or plan fewer trials (--trials / --trials-mean)"
            )
        hi, lo = lo, lo / 4
    best = (lo, f_lo, curve)
    f_hi, curve_hi = f(hi)
    if f_hi <= total:
        best = (hi, f_hi, curve_hi)
    aim = total * (1 - REL_TOLERANCE / 2)
    for _ in range(MAX_STEPS):
        if best[1] >= total * (1 - REL_TOLERANCE) or hi / lo - 1 < 1e-7:
            break
        # the bound is nearly linear in e: interpolate, kept inside the bracket's middle 80 % (a bisection's pace
        # at worst); the calibration's tolerance makes f a step function, so no smoothness is assumed
        frac = min(0.9, max(0.1, (aim - f_lo) / (f_hi - f_lo))) if f_hi > f_lo else 0.5
        mid = lo + frac * (hi - lo)
        f_mid, curve_mid = f(mid)
        if f_mid <= total:
            lo, f_lo = mid, f_mid
            if f_mid > best[1]:
                best = (mid, f_mid, curve_mid)
        else:
            hi, f_hi = mid, f_mid
    e, reached, curve = best
    return {
        "total_epsilon": total,
        "privacy": opts.privacy,
        "per_trial_epsilon": e,
        "bound": reached,
        "trials_counted": trials if opts.privacy == "compose" else None,
        "settings_bounded": combos,
        "worst_curve": [float(x) for x in curve],
        "how": _HOW[opts.privacy],
    }


def check_trial(calibration: dict[str, Any], cfg: RunConfig, clients: int) -> str:
    """ "" when a trial's curve is within the calibrated worst curve, else why it is refused."""
    if "worst_curve" not in calibration:
        return ""
    mine = trial_curve(cfg, clients)
    worst = np.asarray(calibration["worst_curve"])
    if np.all(mine <= worst * (1 + 1e-9) + 1e-12):
        return ""
    return (
        "its mechanism costs more than the worst one --total-epsilon was calibrated for (a searched key changes the "
        "sites' records or steps); search it in --run-config instead, or leave --total-epsilon out"
    )


_HOW = {
    "select": (
        "per-trial target epsilon calibrated so that the repeat-and-select bound on the worst trial's RDP curve "
        "(worst site, worst searched batch-size/rounds/epochs, training and metric releases composed) is the total"
    ),
    "compose": (
        "per-trial target epsilon calibrated so that RDP composition of the planned trials' worst RDP curve "
        "(worst site, worst searched setting, training and metric releases composed) is the total"
    ),
    "public": "the trials spend nothing on the private data; the final private run is given the total",
}


def apply_total_epsilon(opts: TuneOptions) -> None:
    """Calibrate once, before the study opens: every trial (and the best config) gets the per-trial target."""
    import time

    from privatune.simulations.tune_space import grid_space

    trials = opts.trials
    if trials <= 0 and opts.sampler == "grid":
        trials = math.prod(len(v) for v in grid_space(opts.space).values())
    base = RunConfig.from_flower(dict(opts.base))
    delta = base.delta or 1e-5  # as simulations/tune.py privacy_totals: the run's delta, else the sites' default
    t0 = time.perf_counter()
    cal = _stored(opts) or calibrate(opts, trials, delta)
    opts.calibration = cal
    opts.base = {**opts.base, "target-epsilon": cal["per_trial_epsilon"], "dp": True}
    opts.say(
        f"--total-epsilon {cal['total_epsilon']:g} ({opts.privacy}): each trial's target epsilon "
        f"{cal['per_trial_epsilon']:.4f} (bound {cal['bound']:.4f} at delta {delta:g}; "
        f"{time.perf_counter() - t0:.0f} s to calibrate)"
    )


def _stored(opts: TuneOptions) -> dict[str, Any] | None:
    """A resumed study's own calibration (kept in study.db): not recomputed. Its settings check (the base run
    config with the calibrated target) refuses a resume with other settings."""
    import optuna

    db = opts.study_dir / "study.db"
    if not db.exists():
        return None
    from privatune.simulations.tune import STUDY_NAME

    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db.resolve()}")
    except KeyError:
        return None
    cal = study.user_attrs.get("calibration")
    if not isinstance(cal, dict) or cal.get("total_epsilon") != opts.total_epsilon:
        return None
    return dict(cal) if cal.get("privacy") == opts.privacy else None
