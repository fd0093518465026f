"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski, 2023), through the client's own code.

    python -m privatune.simulations.canary_audit --preset digits --canaries 1000            # DP on, target epsilon 8
    python -m privatune.simulations.canary_audit --preset digits --canaries 1000 --no-dp    # the non-private control
    privatune canary-audit --preset digits --canaries 1000 --epsilon 4

What runs, in order:

1. one client's training split of the preset (simulated partition ``--client`` of ``--clients``), exactly what
   the ClientApp would load;
2. ``m`` canaries the data never contains: out-of-distribution inputs (random sparse pixel patterns for images,
   strings of random letters for text), each with a fixed random label; each canary joins the training set
   independently with probability 1/2;
3. one local training pass through :func:`privatune.client.round.train_round` (what the ClientApp runs) with the module it picks for
   the fine-tuning mode (:func:`privatune.client.round.module_and_inputs`: the head on cached backbone features in ``head``
   mode, the whole classifier otherwise), the noise the client would plan (:func:`privatune.client.privacy_guard.plan_noise`
   for a one-round run at ``--epsilon``), the client's delta and seed formula;
4. membership scores (minus the loss of each canary's label under the trained model), guesses for the ``k``
   highest and ``k`` lowest scores, and the 95 % empirical epsilon lower bound of :mod:`privatune.common.canary`;
5. the claimed epsilon of that exact mechanism from :mod:`privatune.common.accounting` (RDP and PRV). A lower bound above a
   claim proves a bug in the DP path; the run says so loudly and exits 1.

Settings are the audit's own (more epochs, a larger learning rate than the presets' defaults): an audit wants the
strongest memorisation the mechanism allows, and the claim is computed for exactly those settings. The default
mode is ``partial`` for images (the CNN's last block and the head train): a linear head on frozen features lacks
the capacity to memorise hundreds of random-label canaries, so in ``head`` mode even a non-private run only
reaches a lower bound of about 2 with 500 canaries. Text presets train the head only (MiniLM under DP-SGD on CPU
is too slow for an audit); their canaries are best audited on a preset with several labels (trec6): with two
labels, half of the random labels agree with what the model predicts anyway.
"""

from __future__ import annotations

import argparse
import math
import string
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privatune.common.accounting import AccountingError, default_delta, epsilon_of
from privatune.common.canary import CanaryAuditResult, audit_from_scores, draw_inclusion
from privatune.common.config import PRESETS, RunConfig
from privatune.common.datasets import IMAGE_SIDE, LabelledData, pixels_to_model_input
from privatune.common.jsonsafe import jsonable
from privatune.simulations.benchmarks.report import write_json

# (epochs, lr, batch size) per (data kind, fine-tuning mode), found by measurement (digits for images, trec6 for
# text; docs/benchmarks.md). Text models train the head only here: DP-SGD through MiniLM on 2 CPU cores is too slow
# for an audit that should take a minute.
AUDIT_DEFAULTS: dict[tuple[str, str], tuple[int, float, int]] = {
    ("image", "head"): (100, 0.05, 32),
    ("image", "partial"): (10, 2.0, 32),
    ("image", "full"): (10, 2.0, 32),
    ("text", "head"): (200, 0.5, 32),
}
DEFAULT_MODE = {"image": "partial", "text": "head"}
RUN_ID = "canary-audit"
_SCORE_BATCH = 256


class CanaryAuditError(ValueError):
    """Settings an audit cannot run with; the message names the option and the fix."""


@dataclass(frozen=True)
class CanarySettings:
    """Everything one audit run depends on; 0 / "" mean "the audit's default for this mode"."""

    preset: str = "digits"
    canaries: int = 1000
    dp: bool = True
    epsilon: float = 8.0
    mode: str = ""
    epochs: int = 0
    lr: float = 0.0
    batch_size: int = 0
    k: int = 0  # guesses on each side; 0 = canaries // 10
    clients: int = 3
    client: int = 0
    seed: int = 42  # the run config's seed: client partition, head init, canaries, coin flips, training
    accountant: str = "rdp"
    max_grad_norm: float = 1.0
    density: float = 0.1  # image canaries: fraction of lit pixels
    confidence: float = 0.95
    max_records: int = 0  # subsample the preset (fast tests); 0 = all of it
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads during the run; 0 = leave torch's setting alone


@dataclass(frozen=True)
class CanaryRunResult:
    """What the audit measured; ``violation`` is True when the lower bound exceeds a claimed epsilon."""

    settings: dict[str, Any]
    mode: str
    epochs: int
    lr: float
    batch_size: int
    client_records: int
    train_records: int  # client records + included canaries
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_claimed: float  # the accountant the settings name; inf without DP
    epsilon_rdp: float
    epsilon_prv: float | None  # None when the PRV accountant cannot compute it
    audit: CanaryAuditResult
    canary_loss_in: float  # mean loss of the included canaries' labels
    canary_loss_out: float  # ... of the excluded ones
    train_seconds: float
    total_seconds: float

    @property
    def epsilon_lower_bound(self) -> float:
        return self.audit.epsilon_lower_bound

    @property
    def violation(self) -> bool:
        claims = [self.epsilon_claimed, self.epsilon_rdp] + ([self.epsilon_prv] if self.epsilon_prv is not None else [])
        return any(self.epsilon_lower_bound > c for c in claims)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["audit"]["accuracy"] = self.audit.accuracy
        d["epsilon_lower_bound"] = self.epsilon_lower_bound
        d["violation"] = self.violation
        return jsonable(d)


# ------------------------------------------------------------------------------------------------- canaries


def make_canaries(
    kind: str, label_names: Sequence[str], m: int, rng: np.random.Generator, density: float = 0.1
) -> LabelledData:
    """``m`` out-of-distribution records, each with a random label fixed here.

    Images: each pixel lit with probability ``density`` (then MNIST-normalised like every digit), a pattern no
    digit resembles. Texts: 6-12 "words" of 3-9 random lowercase letters.
    """
    if kind == "image":
        if not 0.0 < density < 1.0:
            raise CanaryAuditError(f"--density must be in (0, 1), got {density}")
        pixels = (rng.random((m, IMAGE_SIDE, IMAGE_SIDE)) < density).astype(np.float32)
        inputs: list[str] | np.ndarray = pixels_to_model_input(pixels)
    elif kind == "text":
        letters = np.array(list(string.ascii_lowercase))

        def word() -> str:
            return "".join(rng.choice(letters, size=int(rng.integers(3, 10))))

        inputs = [" ".join(word() for _ in range(int(rng.integers(6, 13)))) for _ in range(m)]
    else:
        raise CanaryAuditError(f"no canaries for data of kind {kind!r}")
    labels = rng.integers(0, len(label_names), size=m).astype(np.int64)
    return LabelledData("canaries", kind, inputs, labels, tuple(label_names))  # type: ignore[arg-type]


def concat(a: LabelledData, b: LabelledData) -> LabelledData:
    """``a`` followed by ``b`` (same kind and label set)."""
    if a.kind != b.kind or a.label_names != b.label_names:
        raise CanaryAuditError("canaries and client data disagree on kind or label set")
    if a.kind == "text":
        inputs: list[str] | np.ndarray = list(a.inputs) + list(b.inputs)
    else:
        inputs = np.concatenate([np.asarray(a.inputs), np.asarray(b.inputs)]).astype(np.float32, copy=False)
    return LabelledData(a.name, a.kind, inputs, np.concatenate([a.labels, b.labels]), a.label_names)


# ------------------------------------------------------------------------------------------------------ run


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Tiny per-step work on a shared 2-core host: one intra-op thread is far faster than two fighting."""
    if n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve(settings: CanarySettings) -> tuple[RunConfig, str]:
    """The client's run config for this audit (one round) and the data kind; refuses bad settings early."""
    s = settings
    if s.preset not in PRESETS:
        raise CanaryAuditError(f"unknown preset {s.preset!r}; choose one of {', '.join(PRESETS)}")
    from privatune.common.federation_data import check_federation_size
    from privatune.common.models import get_model_spec

    kind = get_model_spec(PRESETS[s.preset].model).kind
    mode = s.mode or DEFAULT_MODE[kind]
    if (kind, mode) not in AUDIT_DEFAULTS:
        modes = [m for k, m in AUDIT_DEFAULTS if k == kind]
        raise CanaryAuditError(f"--mode for {kind} presets must be one of {', '.join(modes)}, got {mode!r}")
    if s.canaries < 2:
        raise CanaryAuditError(f"--canaries must be at least 2, got {s.canaries}")
    k = s.k or max(s.canaries // 10, 1)
    if k < 1 or 2 * k > s.canaries:
        raise CanaryAuditError(f"--k {k} guesses on each side need at least {2 * k} canaries, got {s.canaries}")
    if s.dp and not (s.epsilon > 0 and math.isfinite(s.epsilon)):
        raise CanaryAuditError(f"--epsilon must be a finite number > 0 with DP on (or use --no-dp), got {s.epsilon}")
    if s.clients < 1 or not 0 <= s.client < s.clients:
        raise CanaryAuditError(f"--client must be in 0..{s.clients - 1} (--clients >= 1), got {s.client}")
    if s.seed < 0:
        raise CanaryAuditError(f"--seed must be >= 0, got {s.seed}")
    epochs, lr, batch = AUDIT_DEFAULTS[(kind, mode)]
    try:
        cfg = RunConfig.create(
            preset=s.preset,
            mode=mode,
            num_server_rounds=1,
            local_epochs=s.epochs or epochs,
            lr=s.lr or lr,
            batch_size=s.batch_size or batch,
            dp=s.dp,
            target_epsilon=s.epsilon if s.dp else math.inf,
            accountant=s.accountant,
            max_grad_norm=s.max_grad_norm,
            seed=s.seed,
            max_records=s.max_records,
            min_clients=1,
        )
        check_federation_size(cfg, s.clients)
    except ValueError as err:
        raise CanaryAuditError(str(err)) from None
    return cfg, kind


def run_canary_audit(settings: CanarySettings) -> CanaryRunResult:
    """Insert canaries, train once through the client's path, score, and bound epsilon from below."""
    t0 = time.perf_counter()
    cfg, kind = resolve(settings)
    with _torch_threads(settings.threads):
        return _run(settings, cfg, kind, t0)


def _run(s: CanarySettings, cfg: RunConfig, kind: str, t0: float) -> CanaryRunResult:
    from privatune.client.privacy_guard import plan_noise
    from privatune.client.round import LocalRun, train_round
    from privatune.client.site_config import SiteConfig
    from privatune.common.federation_data import client_partition
    from privatune.common.models import configure_trainable, get_model_spec

    m = s.canaries
    k = s.k or max(m // 10, 1)
    client_train, _ = client_partition(cfg, s.client, s.clients)
    rng = np.random.default_rng([s.seed, 0xCA7A])
    canaries = make_canaries(kind, cfg.label_names, m, rng, s.density)
    included = draw_inclusion(m, np.random.default_rng([s.seed, 0x1C1D]))
    train = concat(client_train, canaries.subset(np.flatnonzero(included)))
    n = len(train)

    # The ClientApp's own choices, for a simulated client in a one-round run.
    delta = cfg.delta or default_delta(n)
    try:
        noise = plan_noise(cfg, n, delta)
    except AccountingError as err:
        raise CanaryAuditError(f"cannot calibrate the noise for --epsilon {s.epsilon}: {err}") from None
    site = SiteConfig(
        site_id=RUN_ID,
        ledger_path=Path("unused.ledger.sqlite"),
        cache_dir=None,
        max_epsilon=None,
        he_secret_context=None,
        device=s.device,
        partition_id=s.client,
        num_partitions=s.clients,
    )
    model = get_model_spec(cfg.model).build(len(cfg.label_names), cfg.seed)
    names = configure_trainable(model, cfg.fine_tuning)
    run = LocalRun(
        cfg=cfg,
        site=site,
        run_id=RUN_ID,
        server_round=1,
        train=train,
        val=train.subset([]),
        train_ids=[],
        val_ids=[],
        dataset_fingerprint="canary-audit",
        key_check="",
        model=model,
        trainable_names=names,
    )
    result = train_round(run, train, noise)

    losses = canary_losses(run, canaries, s.device)
    audit = audit_from_scores(-losses, included, k, k, delta, s.confidence)
    mech = [(result.noise_multiplier, result.sample_rate, result.steps)]
    eps_rdp = epsilon_of(mech, delta, "rdp")
    try:
        eps_prv: float | None = epsilon_of(mech, delta, "prv")
    except AccountingError:
        eps_prv = None
    claimed = eps_rdp if cfg.accountant == "rdp" else (eps_prv if eps_prv is not None else math.inf)
    return CanaryRunResult(
        settings=asdict(s),
        mode=cfg.mode,
        epochs=cfg.local_epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        client_records=len(client_train),
        train_records=n,
        noise_multiplier=result.noise_multiplier,
        sample_rate=result.sample_rate,
        steps=result.steps,
        delta=delta,
        epsilon_claimed=claimed,
        epsilon_rdp=eps_rdp,
        epsilon_prv=eps_prv,
        audit=audit,
        canary_loss_in=float(losses[included].mean()) if included.any() else math.nan,
        canary_loss_out=float(losses[~included].mean()) if (~included).any() else math.nan,
        train_seconds=result.seconds,
        total_seconds=time.perf_counter() - t0,
    )


@torch.no_grad()
def canary_losses(run: Any, canaries: LabelledData, device: str) -> np.ndarray:
    """Cross-entropy of each canary's own label under the trained model (eval mode, the client's module)."""
    from privatune.client.round import module_and_inputs

    module, inputs = module_and_inputs(run, canaries)
    was_training = module.training
    module.eval()
    labels = torch.as_tensor(canaries.labels, dtype=torch.long)
    out = []
    try:
        for i in range(0, len(canaries), _SCORE_BATCH):
            logits = module(*(t[i : i + _SCORE_BATCH].to(device) for t in inputs)).float().cpu()
            out.append(torch.nn.functional.cross_entropy(logits, labels[i : i + _SCORE_BATCH], reduction="none"))
    finally:
        module.train(was_training)
    return torch.cat(out).numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------------- output


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def summary_lines(res: CanaryRunResult) -> list[tuple[str, str]]:
    """(label, value) rows for the terminal; short enough for an 80-column terminal."""
    s, a = res.settings, res.audit
    dp = f"on, sigma {res.noise_multiplier:.4g}" if s["dp"] else "OFF (no noise, no clipping)"
    return [
        ("preset / mode", f"{s['preset']} / {res.mode} (client {s['client']} of {s['clients']})"),
        (
            "training",
            f"{res.train_records} records ({res.client_records} client + {a.included} canaries), "
            f"{res.epochs} epochs, lr {res.lr:g}, batch {res.batch_size}",
        ),
        ("DP-SGD", f"{dp}, q {res.sample_rate:.4g}, {res.steps} steps, C {s['max_grad_norm']:g}"),
        (
            "canaries",
            f"{a.m}, {a.included} included; mean loss in {res.canary_loss_in:.3f} / out {res.canary_loss_out:.3f}",
        ),
        ("guesses", f"{a.k_plus} in + {a.k_minus} out, {a.correct}/{a.guesses} correct ({a.accuracy:.1%})"),
        (
            "claimed epsilon",
            f"{_f(res.epsilon_claimed)} ({s['accountant']}; RDP {_f(res.epsilon_rdp)}, "
            f"PRV {_f(res.epsilon_prv)}) at delta {res.delta:.3g}",
        ),
        (f"empirical eps >= ({a.confidence:.0%})", f"{res.epsilon_lower_bound:.3f}"),
        ("time", f"train {res.train_seconds:.1f} s, total {res.total_seconds:.1f} s"),
    ]


def verdict(res: CanaryRunResult) -> str:
    if res.violation:
        return (
            f"BUG: the empirical lower bound {res.epsilon_lower_bound:.3f} exceeds the claimed epsilon "
            f"{_f(res.epsilon_claimed)}: the DP training path leaks more than its accounting says"
        )
    if math.isinf(res.epsilon_claimed):
        return (
            f"no DP: the run is not private at all, and one run of canaries already proves "
            f"epsilon >= {res.epsilon_lower_bound:.3f}"
        )
    return f"consistent: lower bound {res.epsilon_lower_bound:.3f} <= claimed {_f(res.epsilon_claimed)}"


def print_result(res: CanaryRunResult, console: Any = None) -> None:
    """The summary as a two-column table, then the verdict (red and loud for a violation)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="One-run canary audit (Steinke, Nasr, Jagielski 2023)", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in summary_lines(res):
        table.add_row(label, value)
    console.print(table)
    if res.violation:
        console.print(f"[bold white on red]{verdict(res)}[/]")
    else:
        console.print(f"[green]{verdict(res)}[/]")


def report(res: CanaryRunResult, json_path: Path | None = None, console: Any = None) -> int:
    """Print the result, write its JSON, and return the exit status: 1 when the bound exceeds a claim, else 0."""
    print_result(res, console)
    if json_path:
        write_json(json_path, res.to_json())
    return 1 if res.violation else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m privatune.simulations.canary_audit", description=__doc__.split("\n\n")[0]
    )
    d = CanarySettings()
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--canaries", type=int, default=d.canaries, help="m, the number of canaries")
    p.add_argument("--no-dp", action="store_true", help="train without DP (the control: the bound should be high)")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="target epsilon of the one training run")
    p.add_argument(
        "--mode",
        default=d.mode,
        help="head | partial | full, the modes this audit has tuned settings for (partial = last-k with k=1; default: partial for images)",
    )
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--k", type=int, default=0, help="guesses on each side (default: canaries // 10)")
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--client", type=int, default=d.client)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--accountant", default=d.accountant, choices=("rdp", "prv"))
    p.add_argument("--max-records", type=int, default=0)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    a = p.parse_args(argv)
    settings = CanarySettings(
        preset=a.preset,
        canaries=a.canaries,
        dp=not a.no_dp,
        epsilon=a.epsilon,
        mode=a.mode,
        epochs=a.epochs,
        lr=a.lr,
        batch_size=a.batch_size,
        k=a.k,
        clients=a.clients,
        client=a.client,
        seed=a.seed,
        accountant=a.accountant,
        max_records=a.max_records,
        device=a.device,
        threads=a.threads,
    )
    try:
        res = run_canary_audit(settings)
    except CanaryAuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return report(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
