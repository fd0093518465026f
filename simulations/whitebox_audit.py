"""White-box one-run privacy audit with Dirac gradient canaries, through the real DP-SGD step code.

    privatune whitebox-audit --epsilon 2 --canaries 5000 --plant none
    python -m privatune.simulations.whitebox_audit --epsilon 2 --canaries 10000 --plant noise-half --json out.json

The black-box audit (:mod:`privatune.simulations.canary_audit`) sees only the final model and is capped near epsilon 4; it
missed noise seeded from the run config. This one follows Steinke, Nasr and Jagielski (2023)'s white-box setting:

1. a linear head (``features`` inputs, ``classes`` outputs) and ``records`` synthetic records whose features are
   zero outside the first ``data_features`` columns, so no record's gradient touches the canary coordinates;
2. ``m`` Dirac canaries: canary ``i`` is a per-sample gradient of norm ``canary_norm x C`` on its own weight
   coordinate, nothing elsewhere. Each is included with probability 1/2 (the auditor's coin flips); an included
   canary joins each step with the real sample rate ``q``, like a record, by being appended to ``p.grad_sample``
   in ``TrainHooks.before_step``: Opacus clips it and the site's noise path noises it;
3. the real step code, :func:`privatune.client.training.train_local` (Poisson sampler, Opacus clipping, ``install_noise``),
   with the noise :func:`privatune.common.accounting.calibrate_noise` sets for ``--epsilon`` over the run's steps;
4. after every step the auditor reads each canary coordinate's update (``after_step``), turns it into clip-norm
   units and scores the canary by the sum over steps of the log-likelihood ratio of a subsampled Gaussian step
   (:func:`privatune.common.canary.subsampled_gaussian_llr` at the real ``q``, with the noise scale fitted to that step's
   observations by :func:`privatune.common.canary.fit_noise_scale`, so less noise than claimed sharpens the test);
   ``--score sum`` uses the plain sum of the updates instead;
5. the top ``k+`` scores are guessed "in" (by default ``k+`` is set from ``m`` and the claim before training,
   :func:`privatune.common.canary.guesses_for_claim`), the bottom ``k-`` "out" (none by default), and :mod:`privatune.common.canary`
   turns the correct guesses into a 95 % lower bound on epsilon. A bound above the accountant's claim proves a bug: exit status 1.

The *informed* adversary (the default) also knows the run config and the mechanism: it regenerates the noise the
site would draw if the noise were seeded from the run config (``SeededRandomness(seed)``, the draws in the order
the sampler and ``install_noise`` make them) and subtracts it when the replay explains the observed updates
(their residual energy falls below half). Against a site CSPRNG the replay explains nothing and is ignored.

``--plant`` injects one known bug, confined to this module, to show the audit catches it: ``noise-half`` (every
noise draw scaled by 0.5), ``noise-seeded`` (the site's noise from ``SeededRandomness(run seed)``), ``no-clip``
(per-sample gradients summed unclipped). ``none`` is the real code with the site's :class:`SiteRandomness`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privatune.common.jsonsafe import jsonable
from privatune.simulations.benchmarks.report import write_json

PLANTS = ("none", "noise-half", "noise-seeded", "no-clip")
ADVERSARIES = ("informed", "blind")
SCORES = ("llr", "sum")
# The run config's seed, as the planted bug would use it: the informed adversary derives the very same seed.
RUN_CONFIG_SEED = 42
# Memory: each step appends about q * m / 2 dense rows of ~m weights (50,000 canaries: ~100 MB a step).
MAX_CANARIES = 50_000
# The informed adversary uses its replay when the residual energy is below this fraction of the observed one
# (a correct replay leaves float rounding; a wrong one doubles the energy).
_REPLAY_EXPLAINS = 0.5


class WhiteboxAuditError(ValueError):
    """Settings a white-box audit cannot run with; the message names the option and the fix."""


@dataclass(frozen=True)
class WhiteboxSettings:
    """Everything one white-box audit depends on; sizes chosen so a run takes seconds on one core."""

    epsilon: float = 2.0
    canaries: int = 5000
    plant: str = "none"
    adversary: str = "informed"
    score: str = "llr"
    k_plus: int = -1  # -1 = chosen from m and the claim (common.canary.guesses_for_claim)
    k_minus: int = 0
    records: int = 1000
    batch_size: int = 20  # q = 1 / ceil(records / batch_size) = 0.02
    epochs: int = 5  # steps = epochs x ceil(records / batch_size) = 250
    lr: float = 1.0
    max_grad_norm: float = 1.0
    canary_norm: float = 10.0  # each canary's gradient norm, in units of max_grad_norm (>= 1)
    classes: int = 10
    data_features: int = 16
    run_seed: int = RUN_CONFIG_SEED  # the run config's seed (what a seeded-noise bug would use)
    auditor_seed: int = 0  # the auditor's coin flips, per-step canary sampling, data and initial model
    accountant: str = "rdp"
    confidence: float = 0.95
    threads: int = 1


@dataclass(frozen=True)
class WhiteboxResult:
    """What the audit measured; ``violation`` is True when the lower bound exceeds the claimed epsilon."""

    settings: dict[str, Any]
    parameters: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    delta: float
    epsilon_claimed: float
    included: int
    k_plus: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    epsilon_max_for_m: float  # the bound if every guess were right
    replay_used: bool  # the informed adversary subtracted the regenerated noise
    replay_energy_ratio: float  # residual / observed energy on the canary coordinates (nan: no replay)
    mean_score_in: float
    mean_score_out: float
    train_seconds: float
    total_seconds: float

    @property
    def violation(self) -> bool:
        return self.epsilon_lower_bound > self.epsilon_claimed

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["violation"] = self.violation
        return jsonable(d)


# ----------------------------------------------------------------------------------------------- planted bugs


class HalfNoise:
    """A test fault: the wrapped source's noise at half the standard deviation the optimizer asks for."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.kind = inner.kind

    def uniform(self, n: int) -> np.ndarray:
        return self.inner.uniform(n)

    def gaussian(self, shape: tuple[int, ...], std: float, *, device: Any, dtype: torch.dtype) -> torch.Tensor:
        return self.inner.gaussian(shape, 0.5 * std, device=device, dtype=dtype)


def disable_clipping(optimizer: Any) -> None:
    """A test fault: this DPOptimizer sums per-sample gradients unclipped (noise and scaling unchanged)."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def clip_and_accumulate(self: Any) -> None:
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad = self._get_flat_grad_sample(p).to(p.dtype).sum(dim=0)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    optimizer.clip_and_accumulate = types.MethodType(clip_and_accumulate, optimizer)


def site_randomness(plant: str, run_seed: int, site: Any = None) -> Any:
    """The randomness the site trains with: its own CSPRNG, unless a noise bug is planted.

    ``site`` replaces the CSPRNG (tests pass a seeded source the adversary does not know, for reproducibility).
    """
    from privatune.client.randomness import SeededRandomness, SiteRandomness

    if plant == "noise-seeded":
        return SeededRandomness(run_seed)  # the bug: noise anyone holding the run config can regenerate
    base = site if site is not None else SiteRandomness()
    return HalfNoise(base) if plant == "noise-half" else base


# -------------------------------------------------------------------------------------------------- the model


class LinearHead(nn.Module):
    """The audited model: one linear layer, named like the client's head so it trains at the full rate."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def canary_coordinates(m: int, classes: int, data_features: int) -> tuple[int, np.ndarray]:
    """(features, flat weight index of each canary): canary ``i`` owns W[i % classes, data_features + i // classes]."""
    canary_features = -(-m // classes)
    features = data_features + canary_features
    i = np.arange(m)
    return features, (i % classes) * features + data_features + i // classes


# ---------------------------------------------------------------------------------------------- the adversary


class NoiseReplay:
    """The informed adversary's guess at the site's noise: ``SeededRandomness(run seed)`` drawn in the order the
    real code draws (each step: the Poisson mask over the records, then one Gaussian per optimizer parameter)."""

    def __init__(self, run_seed: int, records: int, shapes: Sequence[tuple[int, ...]], weight_index: int) -> None:
        from privatune.client.randomness import SeededRandomness

        self.rng = SeededRandomness(run_seed)
        self.records = records
        self.shapes = list(shapes)
        self.weight_index = weight_index

    def next_step(self, std: float, coords: np.ndarray) -> np.ndarray:
        """The replayed noise on the canary coordinates for the next step (the weight parameter, float32 cast)."""
        self.rng.uniform(self.records)
        out = None
        for j, shape in enumerate(self.shapes):
            z = self.rng.gaussian(shape, std, device="cpu", dtype=torch.float32)
            if j == self.weight_index:
                out = z.reshape(-1).numpy()[coords].astype(np.float64)
        assert out is not None
        return out


# ---------------------------------------------------------------------------------------------------- the run


def check(s: WhiteboxSettings) -> None:
    """Refuse settings the audit cannot run with, naming the option."""
    if s.plant not in PLANTS:
        raise WhiteboxAuditError(f"--plant must be one of {', '.join(PLANTS)}, got {s.plant!r}")
    if s.adversary not in ADVERSARIES:
        raise WhiteboxAuditError(f"--adversary must be one of {', '.join(ADVERSARIES)}, got {s.adversary!r}")
    if s.score not in SCORES:
        raise WhiteboxAuditError(f"--score must be one of {', '.join(SCORES)}, got {s.score!r}")
    if not (isinstance(s.epsilon, (int, float)) and s.epsilon > 0 and math.isfinite(s.epsilon)):
        raise WhiteboxAuditError(f"--epsilon must be a finite number > 0, got {s.epsilon}")
    if not 2 <= s.canaries <= MAX_CANARIES:
        raise WhiteboxAuditError(
            f"--canaries must be in 2..{MAX_CANARIES} (each step holds a dense per-sample "
            f"gradient for every sampled canary, q x m/2 rows of m weights), got {s.canaries}"
        )
    kp, km = s.k_plus, s.k_minus
    if kp < -1 or km < 0 or (kp == 0 and km == 0) or max(kp, 0) + km > s.canaries:
        raise WhiteboxAuditError(
            f"--k-plus {kp} (-1 = automatic) and --k-minus {km} must be >= 0, at least one "
            f"guess in all, and at most --canaries ({s.canaries}) together"
        )
    for name, value, low in (
        ("records", s.records, 1),
        ("batch-size", s.batch_size, 1),
        ("epochs", s.epochs, 1),
        ("classes", s.classes, 2),
        ("data-features", s.data_features, 1),
    ):
        if value < low:
            raise WhiteboxAuditError(f"--{name} must be >= {low}, got {value}")
    if not s.canary_norm >= 1.0:
        raise WhiteboxAuditError(
            f"--canary-norm must be >= 1 (a canary at least as large as the clip norm), got {s.canary_norm}"
        )
    if not (s.lr > 0 and s.max_grad_norm > 0):
        raise WhiteboxAuditError(f"--lr and --max-grad-norm must be > 0, got {s.lr} and {s.max_grad_norm}")
    if s.accountant not in ("rdp", "prv"):
        raise WhiteboxAuditError(f"--accountant must be rdp or prv, got {s.accountant!r}")


def run_whitebox_audit(s: WhiteboxSettings, site: Any = None) -> WhiteboxResult:
    """Train once through ``train_local`` with Dirac canaries, score them from the per-step models, bound epsilon.

    ``site`` replaces the site's CSPRNG for the real code and ``noise-half`` (tests: a seeded source whose seed the
    adversary is not given); it is ignored for ``noise-seeded``, whose noise comes from the run seed.
    """
    check(s)
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    if s.threads > 0:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, site, t0)
    finally:
        torch.set_num_threads(before)


def _run(s: WhiteboxSettings, site: Any, t0: float) -> WhiteboxResult:
    from privatune.client.training import TrainHooks, train_local
    from privatune.common.accounting import (
        AccountingError,
        calibrate_noise,
        default_delta,
        epsilon_of,
        sample_rate,
        steps_per_epoch,
    )
    from privatune.common.canary import (
        audit_from_scores,
        fit_noise_scale,
        guesses_for_claim,
        perfect_guess_bound,
        subsampled_gaussian_llr,
    )

    m, C = s.canaries, float(s.max_grad_norm)
    q = sample_rate(s.records, s.batch_size)
    steps = steps_per_epoch(s.records, s.batch_size) * s.epochs
    delta = default_delta(s.records)
    try:
        sigma = calibrate_noise(s.epsilon, delta, q, steps, s.accountant)
    except AccountingError as err:
        raise WhiteboxAuditError(f"cannot calibrate the noise for --epsilon {s.epsilon}: {err}") from None
    claim = epsilon_of([(sigma, q, steps)], delta, s.accountant)
    km = s.k_minus
    kp = s.k_plus if s.k_plus >= 0 else min(guesses_for_claim(m, claim, delta, s.confidence), m - km)

    # The auditor's own randomness: data, initial model, coin flips, per-step canary sampling.
    rng = np.random.default_rng([s.auditor_seed, 0xD1AC])
    features, coords = canary_coordinates(m, s.classes, s.data_features)
    x = np.zeros((s.records, features), dtype=np.float32)
    x[:, : s.data_features] = rng.standard_normal((s.records, s.data_features))
    y = rng.integers(0, s.classes, size=s.records)
    torch.manual_seed(int(rng.integers(2**31)))
    model = LinearHead(features, s.classes)
    weight = model.head.weight
    included = rng.random(m) < 0.5
    idx_in = np.flatnonzero(included)
    rows_of = coords // features
    cols_of = coords % features
    coords_t = torch.as_tensor(coords, dtype=torch.long)

    randomness = site_randomness(s.plant, s.run_seed, site)
    state: dict[str, Any] = {"prev": weight.detach().reshape(-1)[coords_t].double().numpy().copy()}
    raw = np.zeros(m)
    resid = np.zeros(m)
    energy = [0.0, 0.0]  # observed, residual

    def score(v: np.ndarray) -> np.ndarray:  # with the noise scale the step shows, not the one it claims
        return subsampled_gaussian_llr(v, q, fit_noise_scale(v)) if s.score == "llr" else v

    def after_make_private(optimizer: Any) -> None:
        state["optimizer"] = optimizer
        params = list(optimizer.params)
        wi = next(i for i, p in enumerate(params) if p is weight)
        if s.adversary == "informed":
            state["replay"] = NoiseReplay(s.run_seed, s.records, [tuple(p.shape) for p in params], wi)
        if s.plant == "no-clip":
            disable_clipping(optimizer)

    def before_step(step: int, module: nn.Module, optimizer: Any) -> None:
        chosen = idx_in[rng.random(idx_in.size) < q]
        for p in optimizer.params:
            gs = p.grad_sample
            extra = torch.zeros((chosen.size, *p.shape), dtype=gs.dtype, device=gs.device)
            if p is weight and chosen.size:
                extra[torch.arange(chosen.size), torch.as_tensor(rows_of[chosen]), torch.as_tensor(cols_of[chosen])] = (
                    s.canary_norm * C
                )
            p.grad_sample = torch.cat([gs, extra])

    def after_step(step: int, module: nn.Module) -> None:
        cur = weight.detach().reshape(-1)[coords_t].double().numpy()
        scale = state["optimizer"].expected_batch_size / (s.lr * C)  # update -> summed gradient, clip units
        obs = (state["prev"] - cur) * scale
        state["prev"] = cur.copy()
        energy[0] += float(obs @ obs)
        raw[:] += score(obs)
        if "replay" in state:  # obs = (clipped canary gradient + noise) / C: take the regenerated noise away
            res = obs - state["replay"].next_step(sigma * C, coords) / C
            energy[1] += float(res @ res)
            resid[:] += score(res)

    hooks = TrainHooks(after_make_private=after_make_private, before_step=before_step, after_step=after_step)
    result = train_local(
        model,
        (torch.from_numpy(x),),
        torch.from_numpy(y),
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        dp=True,
        noise_multiplier=sigma,
        max_grad_norm=C,
        randomness=randomness,
        hooks=hooks,
    )
    if result.steps != steps or abs(result.sample_rate - q) > 1e-12:
        raise RuntimeError(
            f"train_local ran {result.steps} steps at q={result.sample_rate}, the audit planned {steps} at q={q}"
        )
    ratio = energy[1] / energy[0] if "replay" in state and energy[0] > 0 else math.nan
    use_replay = "replay" in state and ratio < _REPLAY_EXPLAINS
    scores = resid if use_replay else raw
    audit = audit_from_scores(scores, included, kp, km, delta, s.confidence)
    return WhiteboxResult(
        settings=asdict(s),
        parameters=sum(p.numel() for p in model.parameters()),
        sample_rate=q,
        steps=steps,
        noise_multiplier=sigma,
        delta=delta,
        epsilon_claimed=claim,
        included=int(included.sum()),
        k_plus=kp,
        guesses=audit.guesses,
        correct=audit.correct,
        epsilon_lower_bound=audit.epsilon_lower_bound,
        epsilon_max_for_m=perfect_guess_bound(m, kp + km, delta, s.confidence),
        replay_used=bool(use_replay),
        replay_energy_ratio=ratio,
        mean_score_in=float(scores[included].mean()) if included.any() else math.nan,
        mean_score_out=float(scores[~included].mean()) if (~included).any() else math.nan,
        train_seconds=result.seconds,
        total_seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------------------------------- output


def summary_lines(res: WhiteboxResult) -> list[tuple[str, str]]:
    """(label, value) rows for the terminal."""
    s = res.settings
    replay = (
        "not tried (blind adversary)"
        if s["adversary"] == "blind"
        else f"{'used' if res.replay_used else 'not used'} (residual energy {res.replay_energy_ratio:.3g} of observed)"
    )
    return [
        (
            "mechanism",
            f"{res.steps} steps, q {res.sample_rate:.4g}, sigma {res.noise_multiplier:.4g}, "
            f"C {s['max_grad_norm']:g}, {res.parameters} parameters",
        ),
        ("plant", s["plant"]),
        ("canaries (m)", f"{s['canaries']} Dirac, norm {s['canary_norm']:g} C, {res.included} included"),
        ("guesses (r)", f"{res.k_plus} in + {s['k_minus']} out, score {s['score']}, {s['adversary']} adversary"),
        ("seeded-noise replay", replay),
        ("correct", f"{res.correct} of {res.guesses}"),
        (f"empirical eps >= ({s['confidence']:.0%})", f"{res.epsilon_lower_bound:.3f}"),
        (
            "claimed epsilon",
            f"{res.epsilon_claimed:.3f} ({s['accountant']}, target {s['epsilon']:g}) at delta {res.delta:.3g}",
        ),
        ("most m allows", f"{res.epsilon_max_for_m:.3f} (every guess right)"),
        ("time", f"train {res.train_seconds:.1f} s, total {res.total_seconds:.1f} s"),
    ]


def verdict(res: WhiteboxResult) -> str:
    if res.violation:
        return (
            f"BUG: the empirical lower bound {res.epsilon_lower_bound:.3f} exceeds the claimed epsilon "
            f"{res.epsilon_claimed:.3f}: the DP-SGD step leaks more than its accounting says"
        )
    note = (
        " (a claim above what m canaries can show cannot be refuted: use more canaries)"
        if res.epsilon_claimed >= res.epsilon_max_for_m
        else ""
    )
    return f"consistent: lower bound {res.epsilon_lower_bound:.3f} <= claimed {res.epsilon_claimed:.3f}{note}"


def report(res: WhiteboxResult, json_path: Path | None = None, console: Any = None) -> int:
    """Print the result, write its JSON, return the exit status: 1 when the bound exceeds the claim, else 0."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="White-box one-run audit (Dirac gradient canaries)", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in summary_lines(res):
        table.add_row(label, value)
    console.print(table)
    console.print(f"[bold white on red]{verdict(res)}[/]" if res.violation else f"[green]{verdict(res)}[/]")
    if json_path:
        write_json(json_path, res.to_json())
    return 1 if res.violation else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m privatune.simulations.whitebox_audit", description=__doc__.split("\n\n")[0]
    )
    d = WhiteboxSettings()
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="target epsilon of the audited run")
    p.add_argument("--canaries", type=int, default=d.canaries, help="m, Dirac gradient canaries")
    p.add_argument("--plant", default=d.plant, choices=PLANTS)
    p.add_argument("--adversary", default=d.adversary, choices=ADVERSARIES)
    p.add_argument("--score", default=d.score, choices=SCORES)
    p.add_argument("--k-plus", type=int, default=d.k_plus, help="'in' guesses (-1: from m and the claim)")
    p.add_argument("--k-minus", type=int, default=d.k_minus, help="'out' guesses")
    p.add_argument("--records", type=int, default=d.records)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--auditor-seed", type=int, default=d.auditor_seed)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    a = p.parse_args(argv)
    settings = WhiteboxSettings(
        epsilon=a.epsilon,
        canaries=a.canaries,
        plant=a.plant,
        adversary=a.adversary,
        score=a.score,
        k_plus=a.k_plus,
        k_minus=a.k_minus,
        records=a.records,
        batch_size=a.batch_size,
        epochs=a.epochs,
        auditor_seed=a.auditor_seed,
    )
    try:
        res = run_whitebox_audit(settings)
    except WhiteboxAuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return report(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
