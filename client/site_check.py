"""`privatune site check`: everything a site can validate alone, before it ever connects.

Each check returns a line a site engineer can act on. Nothing here touches the network, and nothing
but aggregate counts is printed (no record content).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from client.site_config import SiteConfig, SiteConfigError
from client.site_data import SiteDataError, describe_site_data, load_site_data
from common.config import ConfigError, RunConfig
from common.ledger import LedgerError


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class SiteReport:
    checks: list[Check] = field(default_factory=list)
    data_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok


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
    rep.add("run config", True, f"preset {cfg.preset}, model {cfg.model}, labels {', '.join(cfg.label_names)}")
    if "data-path" not in node_config:
        rep.add("node config", False, "no data-path: a partner site names its data file (see docs/deploy-site.md)")
        return rep
    try:
        site = SiteConfig.from_node_config(node_config, cfg)
    except (SiteConfigError, ValueError) as err:
        rep.add("node config", False, str(err))
        return rep
    rep.add("node config", True, f"site-id {site.site_id}, device {site.device}")

    from common.models import get_model_spec

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

    from common.accounting import default_delta
    from common.datasets import train_val_split

    train, _ = train_val_split(data, cfg.val_fraction, seed=cfg.seed)
    n = len(train)
    rep.add(
        "size",
        n >= cfg.batch_size,
        f"{n} training records for batch-size {cfg.batch_size}"
        + ("" if n >= cfg.batch_size else ": fewer records than one batch; DP-SGD needs many more"),
    )
    delta = cfg.delta or default_delta(n)
    rep.add("delta", delta < 1.0 / n, f"delta {delta:.2g} vs 1/n = {1.0 / n:.2g}")

    try:
        from client.privacy_guard import PrivacyGuard

        guard = PrivacyGuard(site.ledger_path, site.site_id, site.max_epsilon)
        spent = guard.spent(data.fingerprint(), cfg.accountant, delta)
        if site.max_epsilon is None:
            rep.add("budget", True, f"spent {spent:.3f} on this data; no max-epsilon set (consider one)")
        else:
            left = site.max_epsilon - spent
            rep.add("budget", left > 0, f"spent {spent:.3f} of max-epsilon {site.max_epsilon:g} on this data; {max(left, 0):.3f} left")
        rep.add("ledger", True, f"{site.ledger_path} (chain verified)")
    except LedgerError as err:  # empty, corrupt, foreign or tampered: it names the file and the recovery steps
        rep.add("ledger", False, str(err))
    except Exception as err:  # e.g. an unwritable folder must stop the site too
        rep.add("ledger", False, f"{site.ledger_path}: {err}")

    if site.he_secret_context is not None:
        from common import he

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
