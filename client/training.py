"""Local training and evaluation, with or without DP-SGD (Opacus).

Framework-free: tensors in, tensors out. The round at a site (:mod:`privatune.client.round`) decides what the
module is (the head alone on cached features, or the whole classifier) and what the privacy
parameters are; this module only runs the loop so it can be tested and benchmarked directly.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privatune.client.bookkeeping_dp import GRAD_SAMPLE_BOOKKEEPING, BookkeepingDPStep, BookkeepingRefusal
from privatune.client.bookkeeping_dp import probe as bookkeeping_probe
from privatune.client.dp_options import GRAD_SAMPLE_GHOST, build_optimizer, grad_sample_mode, physical_batches
from privatune.client.linear_dp import GRAD_SAMPLE_LINEAR, LinearDPStep, input_scales
from privatune.client.linear_dp import applies_to as closed_form_applies
from privatune.client.privacy_guard import DEFAULT_SITE_DELTA
from privatune.client.proximal import add_proximal_term
from privatune.client.randomness import PoissonBatchSampler, Randomness, install_noise
from privatune.common.accountants import DEFAULT_ACCOUNTANT
from privatune.common.accounting import sample_rate as dp_sample_rate
from privatune.common.accounting import steps_per_epoch
from privatune.common.evaluation import EvalResult, evaluate  # noqa: F401  (re-exported for the client glue)
from privatune.common.mechanism import DPMechanism
from privatune.common.models.classifier import unwrap
from privatune.common.optimizers import OPTIMIZER_SGD

# Opacus warns that its own secure RNG is off: its noise is not used (client.randomness.install_noise
# draws it from the site's source). The hook warning is Opacus' per-sample-gradient hooks on a module
# whose inputs need no grad (frozen features).
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass
class TrainHooks:
    """Observation and fault-injection points for white-box audits and tests (never set in production).

    ``after_make_private(optimizer)``: once, after Opacus wrapped the optimizer (a test may plant a fault);
    ``before_step(step, module, optimizer)``: after backward, per-sample gradients in ``p.grad_sample``, one
    row per sampled record (with K views: the mean of its views'), before clipping and noise (with physical
    batches: the logical batch's last chunk only; under ghost clipping there is no ``p.grad_sample``; on the
    closed-form linear and book-keeping paths they are materialised for the hook only, ``optimizer`` is
    the :class:`~privatune.client.linear_dp.LinearDPStep` or ``BookkeepingDPStep`` (its ``params``), and what the
    hook leaves there is clipped);
    ``after_step(step, module)``: after the optimizer step.
    """

    after_make_private: Callable[[Any], None] | None = None
    before_step: Callable[[int, nn.Module, Any], None] | None = None
    after_step: Callable[[int, nn.Module], None] | None = None


@dataclass(frozen=True)
class LocalTrainResult:
    """What one local training pass did; its mechanism feeds the accountant and the reply."""

    loss: float
    mechanism: DPMechanism  # noise multiplier 0.0 when DP is off
    seconds: float
    num_examples: int
    optimizer: str = OPTIMIZER_SGD  # what post-processed the (noised) gradient; no effect on epsilon
    grad_sample_mode: str = (
        ""  # DP only: Opacus' "hooks"/"ghost", "linear" (linear_dp.py), "bookkeeping" (bookkeeping_dp.py)
    )

    @property
    def steps(self) -> int:
        return self.mechanism.steps

    @property
    def sample_rate(self) -> float:
        return self.mechanism.sample_rate

    @property
    def noise_multiplier(self) -> float:
        return self.mechanism.noise_multiplier


#: Augmentation of a batch of the model's inputs with a generator: common/augment/image.py builds one for images
#: (the images first), common/augment/text_batch.py one for text (record numbers in, token tensors out).
BatchAugment = Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]]

OPACUS_PREFIX = "_module."  # what Opacus' GradSampleModule puts before its inner module's parameter names


def _bare_name(name: str) -> str:
    """A parameter name without the ``_module.`` prefixes Opacus' wrappers add."""
    while name.startswith(OPACUS_PREFIX):
        name = name[len(OPACUS_PREFIX) :]
    return name


def _is_head(name: str) -> bool:
    # "weight"/"bias" with no dot: the module is the head alone (head mode trains it on cached features)
    return name.startswith("head.") or "." not in name


def layer_lr_scales(
    names: Sequence[str], block_prefixes: Sequence[str], backbone_lr_scale: float, layer_lr_decay: float = 1.0
) -> dict[str, float]:
    """Each trainable parameter's factor on ``lr``: transfer learning's "early layers trained more slowly".

    The head gets 1. With ``layer_lr_decay`` = 1 every backbone parameter gets ``backbone_lr_scale``. With
    ``d < 1`` the topmost block holding a trainable parameter gets ``backbone_lr_scale`` and each block below
    it a further factor ``d`` (blocks are ``block_prefixes``, first to last, as ``Classifier.block_prefixes``
    names them); parameters in no block (embeddings) sit below the first block: one factor ``d`` below it.
    Names may carry Opacus' ``_module.`` prefix.
    """
    if not 0 < layer_lr_decay <= 1:
        raise ValueError(f"layer-lr-decay must be in (0, 1], got {layer_lr_decay:g}")
    blocks = tuple(block_prefixes)

    def block_of(name: str) -> int | None:
        bare = _bare_name(name)
        hits = [i for i, prefix in enumerate(blocks) if bare.startswith(prefix)]
        return max(hits) if hits else None  # nested prefixes: the innermost (longest-listed last) block

    body = [n for n in names if not _is_head(_bare_name(n))]
    in_blocks = [b for b in map(block_of, body) if b is not None]
    top = max(in_blocks) if in_blocks else -1
    scales: dict[str, float] = {}
    for name in names:
        if _is_head(_bare_name(name)):
            scales[name] = 1.0
        elif layer_lr_decay == 1.0:
            scales[name] = backbone_lr_scale
        else:
            block = block_of(name)
            depth = top - block if block is not None else top + 1
            scales[name] = backbone_lr_scale * layer_lr_decay**depth
    return scales


def param_groups(
    module: nn.Module,
    lr: float,
    backbone_lr_scale: float,
    *,
    layer_lr_decay: float = 1.0,
    block_prefixes: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The optimiser's groups: one per learning rate (:func:`layer_lr_scales`), the head's first."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    scales = layer_lr_scales([n for n, _ in named], block_prefixes, backbone_lr_scale, layer_lr_decay)
    by_scale: dict[float, list[nn.Parameter]] = {}
    for name, p in named:
        by_scale.setdefault(scales[name], []).append(p)
    if 1.0 not in by_scale:
        by_scale[1.0] = []  # keep the head's group first and present, as before
    order = [1.0, *sorted((s for s in by_scale if s != 1.0), reverse=True)]
    return [{"params": by_scale[s], "lr": lr * s} for s in order if s == 1.0 or by_scale[s]]


def train_local(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    dp: bool,
    noise_multiplier: float,
    max_grad_norm: float,
    randomness: Randomness,
    backbone_lr_scale: float = 0.1,
    momentum: float = 0.0,
    device: torch.device | str = "cpu",
    hooks: TrainHooks | None = None,
    delta: float = DEFAULT_SITE_DELTA,
    accountant: str = DEFAULT_ACCOUNTANT,
    optimizer_name: str = OPTIMIZER_SGD,
    max_physical_batch_size: int = 0,
    ghost_clipping: bool = False,
    layer_lr_decay: float = 1.0,
    block_prefixes: Sequence[str] | None = None,
    augment: BatchAugment | None = None,
    augment_views: int = 1,
    proximal_mu: float = 0.0,
    closed_form_linear: bool = True,
) -> LocalTrainResult:
    """Train ``module`` in place for ``epochs`` passes.

    With ``dp`` the loop is Opacus DP-SGD with Poisson sampling: ``sample_rate = 1/ceil(n/B)`` and
    exactly ``ceil(n/B)`` steps per epoch (:class:`privatune.client.randomness.PoissonBatchSampler`), what
    :func:`privatune.common.accounting.steps_per_epoch` predicts and the ledger records before training starts.
    Sampling, noise and (without DP) shuffling all draw from ``randomness``, the site's own source.
    ``delta`` and ``accountant`` only state the result's mechanism (how its epsilon is computed; the round at
    a site passes the run's, benchmarks and tests may leave the defaults).

    ``optimizer_name``, ``max_physical_batch_size`` and ``ghost_clipping`` (:mod:`privatune.client.dp_options`)
    change how a step is computed, not the mechanism: same batches, steps, clipping and noise.
    ``layer_lr_decay`` < 1 slows each block below the topmost trainable one by a further factor
    (:func:`layer_lr_scales`); ``block_prefixes`` default to the module's own (``Classifier.block_prefixes``).

    ``augment`` (inputs, generator) -> inputs and ``augment_views`` K: augmentation multiplicity (De et al. 2022,
    docs/augmentation.md). Each sampled record is repeated K times and augmented (the generator seeded from
    ``randomness``); under DP its per-sample gradient is the mean over its K views' gradients before clipping, so
    the sampling (records, not views), the clipping bound and the noise are those of K = 1; without DP the loss
    is the plain mean over all views.
    ``proximal_mu`` > 0 is FedProx toward the weights ``module`` holds now (the round's global model), added
    after DP's clipping and noise (:mod:`privatune.client.proximal`): no change to the mechanism.

    ``closed_form_linear`` (default on; tests and benchmarks turn it off to compare): under DP a bare
    ``nn.Linear`` (head mode on cached features) with one view, no augmentation and no ``after_make_private``
    hook is trained by :class:`privatune.client.linear_dp.LinearDPStep` instead of Opacus: per-sample norms in
    closed form, the same sampler, clipping, noise source and order, and step count, so the same mechanism and
    the same update to float rounding (``grad_sample_mode`` "linear"); ``max_physical_batch_size`` does not
    apply there (it needs no per-sample memory). Batches are rows indexed from the tensors (no per-record collate).
    The same switch, under the same conditions, trains a stack of Linear/Conv2d layers (the digits CNN) by
    :class:`privatune.client.bookkeeping_dp.BookkeepingDPStep` where its probe on two records passes (one backward
    pass, the same mechanism; ``grad_sample_mode`` "bookkeeping"); otherwise Opacus.
    """
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("no training records")
    if isinstance(augment_views, bool) or not isinstance(augment_views, int) or augment_views < 1:
        raise ValueError(f"augment-views must be an integer >= 1, got {augment_views!r}")
    views = augment_views
    device = torch.device(device)
    module.to(device)
    module.train()
    hooks = hooks or TrainHooks()
    dataset = TensorRows(*[t.cpu() for t in inputs], labels.cpu())
    per_epoch = steps_per_epoch(n, batch_size)
    if dp:
        loader = DataLoader(
            dataset,
            batch_sampler=PoissonBatchSampler(n, dp_sample_rate(n, batch_size), per_epoch, randomness),
            collate_fn=_collated,
        )
    else:
        order_seed = int(randomness.uniform(1)[0] * 2**62)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(order_seed),
            collate_fn=_collated,
        )
    if block_prefixes is None:
        block_prefixes = tuple(getattr(unwrap(module), "block_prefixes", ()))
    groups = param_groups(module, lr, backbone_lr_scale, layer_lr_decay=layer_lr_decay, block_prefixes=block_prefixes)
    optimizer = build_optimizer(optimizer_name, groups, lr=lr, momentum=momentum)
    loss_fn: Any = nn.CrossEntropyLoss()  # under ghost clipping, Opacus' wrapper around it
    train_module: nn.Module = module
    steps_expected = per_epoch * epochs
    q = dp_sample_rate(n, batch_size) if dp else min(1.0, batch_size / n)
    # Built (and so validated) before the first step; the step count is the one the loop ran.
    planned = DPMechanism(
        noise_multiplier if dp else 0.0, q, steps_expected, max_grad_norm, delta, accountant, augment_views=views
    )
    # The views' randomness is the site's, like the sampling and the noise (a seeded source in simulations).
    aug_generator = (
        torch.Generator().manual_seed(int(randomness.uniform(1)[0] * 2**62)) if augment is not None else None
    )
    engine: Any = None  # Opacus ships no type information: its engine and GradSampleModule are untyped
    private_module: Any = None
    mode = ""
    closed_form = dp and closed_form_linear and views == 1 and augment is None and hooks.after_make_private is None
    # a bare linear head: closed form; other Linear/Conv2d stacks: book-keeping if a probe on 2 records passes
    if closed_form and (
        closed_form_applies(module)
        or bookkeeping_probe(module, [t[:2].to(device) for t in inputs], labels[:2].to(device)) is None
    ):
        return _train_closed_form(
            module, loader, optimizer, planned, n, epochs, device, hooks, proximal_mu, optimizer_name, randomness
        )
    if dp:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")  # only its history is read: the release check below
        mode = grad_sample_mode(module, ghost_clipping)
        if views > 1 and mode == GRAD_SAMPLE_GHOST:
            raise ValueError(
                "augment-views > 1 averages each record's per-sample gradients before clipping, which ghost "
                "clipping never materialises; set ghost-clipping=false"
            )
        # poisson_sampling=False: the loader above already samples (Poisson, exact step count) from the
        # site's randomness; Opacus then takes sample_rate = 1 / len(loader) = q, as recorded.
        private = engine.make_private(
            module=module,
            optimizer=optimizer,
            criterion=loss_fn,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if len(private) == 4:  # ghost clipping: the criterion runs both backward passes
            private_module, optimizer, loss_fn, loader = private
        else:
            private_module, optimizer, loader = private
        private_module.forbid_grad_accumulation()
        train_module = private_module
        install_noise(optimizer, randomness)
        if hooks.after_make_private:
            hooks.after_make_private(optimizer)
    proximal = add_proximal_term(optimizer, module, proximal_mu)
    start = time.perf_counter()
    total_loss, total_seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for batch in physical_batches(loader, max_physical_batch_size, optimizer, dp=dp):
            xs = [x.to(device) for x in batch.inputs]
            y = batch.labels.to(device)
            records = int(y.numel())
            xs, y = _views(xs, y, views, augment, aug_generator)
            if batch.zero_grad:
                optimizer.zero_grad(set_to_none=True)
            # Poisson sampling can draw an empty batch: it is still a step of the mechanism (noise only), so it
            # runs through the optimiser like any other. Per-sample DP skips the forward (a transformer cannot
            # run on 0 rows) and hands Opacus empty per-sample gradients; otherwise the 0 rows go through.
            if dp and records == 0 and mode != GRAD_SAMPLE_GHOST:
                _empty_grad_samples(optimizer)
                loss = torch.zeros((), device=device)
            else:
                out = train_module(*xs)
                loss = loss_fn(out, y) if y.numel() else out.sum() * 0.0
                (loss * batch.weight if batch.weight != 1.0 else loss).backward()
            if dp and views > 1:
                _average_views(train_module, records, views)
            if batch.steps and hooks.before_step:
                hooks.before_step(steps, train_module, optimizer)
            if dp or batch.steps:  # DP, a chunk before a logical batch's last: Opacus only clips and accumulates
                optimizer.step()
            if batch.steps:
                if hooks.after_step:
                    hooks.after_step(steps, train_module)
                steps += 1
            total_loss += float(loss.detach()) * records
            total_seen += records
    seconds = time.perf_counter() - start
    if proximal is not None:
        proximal.remove()
    if dp:
        assert engine is not None
        history = engine.accountant.history
        recorded = sum(s for _, _, s in history)
        if steps != steps_expected or recorded != steps_expected or any(abs(r - q) > 1e-12 for _, r, _ in history):
            raise RuntimeError(
                f"Opacus accounted {history}, but the ledger recorded ({noise_multiplier}, {q}, "
                f"{steps_expected}) before training: refusing to release an update whose privacy "
                "cost differs from its record"
            )
        if hasattr(private_module, "remove_hooks"):
            private_module.remove_hooks()  # the module may be trained again in this process
        _strip_opacus(module)
    return LocalTrainResult(
        loss=total_loss / max(total_seen, 1),
        mechanism=replace(planned, steps=steps),
        seconds=seconds,
        num_examples=n,
        optimizer=optimizer_name,
        grad_sample_mode=mode,
    )


class TensorRows(Dataset[list[torch.Tensor]]):
    """Tensors indexed by rows, a whole batch at once (``__getitems__``): no per-record fetch and collate."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [t[i] for t in self.tensors]

    def __getitems__(self, rows: list[int]) -> list[torch.Tensor]:
        index = torch.as_tensor(rows, dtype=torch.long)  # an empty Poisson batch: (0, ...) rows of each tensor
        return [t.index_select(0, index) for t in self.tensors]


def _collated(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch  # TensorRows.__getitems__ returns the batch already stacked


def _train_closed_form(
    module: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    planned: DPMechanism,
    n: int,
    epochs: int,
    device: torch.device,
    hooks: TrainHooks,
    proximal_mu: float,
    optimizer_name: str,
    randomness: Randomness,
) -> LocalTrainResult:
    """DP-SGD without Opacus (see ``train_local``'s ``closed_form_linear``): a bare linear layer by
    :class:`LinearDPStep`, a stack of Linear/Conv2d layers by :class:`BookkeepingDPStep` (client/bookkeeping_dp.py)."""
    linear = closed_form_applies(module)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]  # Opacus' params order
    step = (LinearDPStep if linear else BookkeepingDPStep)(
        module,  # type: ignore[arg-type]  # LinearDPStep: closed_form_applies checked it is an nn.Linear
        params,
        noise_multiplier=planned.noise_multiplier,
        max_grad_norm=planned.max_grad_norm,
        expected_batch_size=int(n * (1 / len(loader))),  # what Opacus' make_private divides by
        randomness=randomness,
    )
    # The inputs are fixed: each record's sqrt(||x||^2 + 1) once, indexed with its rows (as are x and y, straight
    # from the site's Poisson sampler: the loader's own per-batch machinery is skipped, the draws are the same).
    data = loader.dataset
    assert isinstance(data, TensorRows)
    if isinstance(step, LinearDPStep):
        x_all, y_all = data.tensors
        rows = TensorRows(x_all, input_scales(x_all, step.with_bias), y_all)
    else:
        rows = data
    batch_sampler = loader.batch_sampler
    assert batch_sampler is not None
    proximal = add_proximal_term(optimizer, module, proximal_mu)
    start = time.perf_counter()
    loss_sum, total_seen, steps = torch.zeros((), dtype=torch.float64), 0, 0
    try:
        for _ in range(epochs):
            for index in batch_sampler:
                *xs, y = (t.to(device) for t in rows.__getitems__(index))
                before = partial(_call_hook, hooks.before_step, steps, module, step) if hooks.before_step else None
                try:
                    loss = step(xs[0], y, xs[1], before) if isinstance(step, LinearDPStep) else step(xs, y, before)
                except BookkeepingRefusal as e:  # the probe passed, this batch did not: stop, release nothing
                    raise RuntimeError(
                        f"the book-keeping DP path refused step {steps}: {e}; no update is released "
                        "(train_local(..., closed_form_linear=False) trains this model through Opacus)"
                    ) from e
                optimizer.step()
                if hooks.after_step:
                    hooks.after_step(steps, module)
                steps += 1
                loss_sum += loss * len(index)
                total_seen += len(index)
    finally:
        if isinstance(step, BookkeepingDPStep):
            step.close()
    seconds = time.perf_counter() - start
    if proximal is not None:
        proximal.remove()
    if steps != planned.steps:
        raise RuntimeError(
            f"the closed-form DP path ran {steps} steps, but the ledger recorded {planned.steps} before training: "
            "refusing to release an update whose privacy cost differs from its record"
        )
    return LocalTrainResult(
        loss=float(loss_sum) / max(total_seen, 1),
        mechanism=planned,
        seconds=seconds,
        num_examples=n,
        optimizer=optimizer_name,
        grad_sample_mode=GRAD_SAMPLE_LINEAR if linear else GRAD_SAMPLE_BOOKKEEPING,
    )


def _call_hook(
    hook: Callable[[int, nn.Module, Any], None], at: int, module: nn.Module, step: Any, _params: Any
) -> None:
    hook(at, module, step)


def _empty_grad_samples(optimizer: torch.optim.Optimizer) -> None:
    """The per-sample gradients of an empty Poisson batch: (0, *shape) for every trained weight that has none yet
    (Opacus clips and sums nothing, then adds the step's noise), without running the model on 0 rows."""
    for p in getattr(optimizer, "params", ()):
        if getattr(p, "grad_sample", None) is None:
            p.grad_sample = p.new_zeros((0, *p.shape))


def _views(
    xs: list[torch.Tensor],
    y: torch.Tensor,
    views: int,
    augment: BatchAugment | None,
    generator: torch.Generator | None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch's K views: record i's views are rows i*K .. i*K+K-1, augmented (if asked) as one batch.

    Images and text go through here alike: an image batch's rows are augmented in place; a text model's rows
    are record numbers that ``augment`` turns into tokenised views (common/augment/text_batch.py), so it runs on
    an empty Poisson batch too (to give empty token tensors). The labels are only repeated, never augmented."""
    if views > 1:
        xs = [x.repeat_interleave(views, dim=0) for x in xs]
        y = y.repeat_interleave(views, dim=0)
    if augment is not None:
        assert generator is not None
        xs = augment(xs, generator)
    return xs, y


def _average_views(train_module: nn.Module, records: int, views: int) -> None:
    """Each record's per-sample gradient := the mean of its K views' (rows i*K .. i*K+K-1), before clipping.

    Opacus (loss_reduction="mean") stores per-view gradients of each view's own loss in ``p.grad_sample`` (it
    multiplies back the 1/(B K) of the mean loss); their mean over the K views is the record's gradient of its
    mean view loss, one row per sampled record, which the DPOptimizer then clips to the bound, sums and noises
    and scales by the expected batch size of records (n q), exactly as for K = 1.
    """
    for p in train_module.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if isinstance(gs, list):  # accumulation is forbidden (forbid_grad_accumulation): never more than one
            raise RuntimeError("per-sample gradients accumulated over two backward passes; cannot average views")
        p.grad_sample = gs.reshape(records, views, *gs.shape[1:]).mean(dim=1)  # type: ignore[attr-defined]  # Opacus sets it


def _strip_opacus(module: nn.Module) -> None:
    """Drop per-sample gradient buffers Opacus leaves on parameters."""
    for p in module.parameters():
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
