"""`privatune site check`: everything a site can validate alone, before it ever connects.

Each check returns a line a site engineer can act on. Nothing here touches the network, and nothing
but aggregate counts is printed (no record content).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from privatune.client.budget import RunProjection
from privatune.client.site_config import SiteConfig, SiteConfigError
from privatune.client.site_data import SiteDataError, describe_site_data, load_site_data
from privatune.common.config import ConfigError, RunConfig
from privatune.common.ledger import LedgerError

if TYPE_CHECKING:
    from privatune.client.privacy_guard import PrivacyGuard


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class SiteReport:
    checks: list[Check] = field(default_factory=list)
    data_summary: dict[str, Any] = field(default_factory=dict)
    projection: RunProjection | None = None  # the announced run against the site's budget (client/budget.py)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok


def _project(
    rep: SiteReport, guard: PrivacyGuard, cfg: RunConfig, train_ids: list[bytes], val_ids: list[bytes]
) -> None:
    """The whole announced run against the budget, planned as the guard will plan each round (nothing written)."""
    from privatune.client.budget import project_run
    from privatune.common.accounting import AccountingError

    try:
        delta = guard.run_delta(cfg)
    except ValueError:
        return  # the "run delta" line already says the site would refuse this run
    try:
        proj = project_run(
            cfg,
            train_ids,
            guard.ledger.cohorts(),
            guard.spends(),
            max_epsilon=guard.max_epsilon,
            on_exhausted=guard.on_exhausted,
            delta=delta,
            val_ids=val_ids,
        )
    except AccountingError as err:
        rep.add("run budget", False, f"cannot plan this run's noise: {err}")
        return
    rep.projection = proj
    rep.add("run budget", proj.fits, proj.summary())


def check_site(
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    he_fingerprint: str | None = None,
) -> SiteReport:
    """Validate the node config against the run config the coordinator announced."""
    rep = SiteReport()
    try:
        cfg = RunConfig.from_flower(dict(run_config))
    except ConfigError as err:
        rep.add("run config", False, str(err))
        return rep
    task = f"preset {cfg.preset}, " if cfg.preset else ""  # a run may name its model and labels with no preset
    rep.add("run config", True, f"{task}model {cfg.model}, labels {', '.join(cfg.label_names)}")
    if "data-path" not in node_config:
        rep.add("node config", False, "no data-path: a partner site names its data file (see docs/deploy-site.md)")
        return rep
    try:
        site = SiteConfig.from_node_config(node_config, cfg)
    except (SiteConfigError, ValueError) as err:
        rep.add("node config", False, str(err))
        return rep
    rep.add("node config", True, f"site-id {site.site_id}, device {site.device}")

    from privatune.client.backbone_check import site_run_config
    from privatune.common.models import backbone_fingerprint, get_model_spec

    cfg = site_run_config(cfg, site)
    try:
        rep.add("model", True, f"{cfg.model}: backbone fingerprint {backbone_fingerprint(cfg.model)}")
    except (ValueError, OSError, RuntimeError) as err:
        rep.add("model", False, str(err))
        return rep
    if cfg.augment.strip():  # issue 16: WordNet for synonym/insert is the site's to provide, checked here
        from privatune.common.augment.text import augment_site_problem

        problem = augment_site_problem(cfg.augment, get_model_spec(cfg.model).kind)
        rep.add("augment", problem is None, problem or f"this site can run {cfg.augment} ({cfg.augment_views} views)")
    assert site.data is not None
    try:
        data = load_site_data(site.data, cfg.label_names, kind=get_model_spec(cfg.model).kind, name=site.site_id)
    except SiteDataError as err:
        rep.add("data", False, str(err))
        return rep
    summary = describe_site_data(data)
    rep.data_summary = summary
    counts = ", ".join(f"{k}: {v}" for k, v in summary["labels"].items())
    rep.add("data", True, f"{site.data.path}: {summary['records']} records ({counts})")
    for w in summary.get("warnings", []):
        rep.add("data warning", True, w)

    from privatune.client.privacy_guard import PrivacyGuard
    from privatune.client.record_ids import dataset_fingerprint, key_check, record_ids, validation_split
    from privatune.client.site_secret import SiteSecretError, key_for_ledger

    try:
        key = key_for_ledger(site.key_path, site.ledger_path)
    except (SiteSecretError, OSError) as err:
        rep.add("site key", False, str(err))
        return rep
    rep.add("site key", True, f"{site.key_path} (owner-only; back it up with the ledger)")
    ids = record_ids(key, data)
    summary["fingerprint"] = dataset_fingerprint(key, ids)
    train_idx, _ = validation_split(key, ids, cfg.val_fraction)
    n = len(train_idx)
    rep.add(
        "size",
        n >= cfg.batch_size,
        f"{n} training records for batch-size {cfg.batch_size}"
        + ("" if n >= cfg.batch_size else ": fewer records than one batch; DP-SGD needs many more"),
    )
    limit = 0.1 / len(data)
    rep.add(
        "delta",
        site.delta < limit,
        f"site delta {site.delta:.2g} vs 0.1/n = {limit:.2g}"
        + ("" if site.delta < limit else f": set node-config delta below {limit:.2g}"),
    )
    if cfg.delta > site.delta:
        rep.add(
            "run delta",
            False,
            f"the run's delta {cfg.delta:g} is looser than the site's {site.delta:g}: the site would refuse it",
        )

    try:
        guard = PrivacyGuard(
            site.ledger_path, site.site_id, site.max_epsilon, site.delta, site.on_exhausted, key_check(key)
        )
        eps = guard.epsilons(ids, cfg.accountant)
        worst = eps.worst
        if site.max_epsilon is None:
            rep.add("budget", True, f"worst record has spent {worst:.3f}; no max-epsilon set (consider one)")
        else:
            exhausted = sum(e >= site.max_epsilon - 1e-9 for e in eps.spent)
            rep.add(
                "budget",
                exhausted < len(ids),
                f"{len(ids) - exhausted} records with budget left, {exhausted} exhausted; worst record has spent "
                f"{worst:.3f} of max-epsilon {site.max_epsilon:g} ({max(site.max_epsilon - worst, 0):.3f} left)",
            )
        rep.add("ledger", True, f"{site.ledger_path} (chain verified)")
        train_set = set(train_idx)
        val_ids = [ids[i] for i in range(len(ids)) if i not in train_set]
        _project(rep, guard, cfg, [ids[i] for i in train_idx], val_ids)
    except LedgerError as err:  # empty, corrupt, foreign or tampered: it names the file and the recovery steps
        rep.add("ledger", False, str(err))
    except Exception as err:  # e.g. an unwritable folder must stop the site too
        rep.add("ledger", False, f"{site.ledger_path}: {err}")

    if site.he_secret_context is not None:
        from privatune.common import he

        try:
            ctx = he.load_context(site.he_secret_context, require_secret=True)
            match = he_fingerprint is None or ctx.fingerprint.startswith(he_fingerprint.strip())
            rep.add(
                "HE key",
                match,
                f"{site.he_secret_context}: fingerprint {ctx.fingerprint[:16]}..."
                + ("" if match else f" differs from the coordinator's {he_fingerprint}"),
            )
        except he.HEError as err:
            rep.add("HE key", False, str(err))
    elif cfg.secure_aggregation == "he":
        rep.add("HE key", False, "the run uses secure-aggregation=he but he-secret-context is not set")
    return rep
