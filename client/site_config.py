"""What a site (a SuperNode) brings: its identity, its data, its ledger, its keys, its device.

In deployment these come from the SuperNode's ``--node-config`` (kebab-case keys, see
docs/deploy-site.md). In simulation Flower only sets ``partition-id``/``num-partitions``, and every
other path is derived from the run's output folder, so one machine holds the whole federation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privatune.client.privacy_guard import DEFAULT_SITE_DELTA, ON_EXHAUSTED
from privatune.client.site_data import SiteDataSpec, guess_format
from privatune.client.site_secret import default_key_path
from privatune.common.cache import CACHE_OFF, resolve_cache_dir
from privatune.common.config import RunConfig
from privatune.common.ledger import LEDGER_SUFFIX, SITE_LEDGER_PREFIX

SITE_KEYS = (
    "site-id",
    "data-path",
    "data-format",
    "text-column",
    "label-column",
    "ledger-path",
    "max-epsilon",
    "he-secret-context",
    "device",
    "cache-dir",
    "partition-id",
    "num-partitions",
    "delta",
    "on-exhausted",
    "site-key-path",
    "allow-reproducible-noise",
    "model-path",
)
ALLOW_REPRODUCIBLE_NOISE = "allow-reproducible-noise"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class SiteConfigError(ValueError):
    """A node config that cannot work; says which key and what to do."""


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    ledger_path: Path
    cache_dir: Path | None
    max_epsilon: float | None
    he_secret_context: Path | None
    device: str
    partition_id: int | None = None
    num_partitions: int | None = None
    data: SiteDataSpec | None = None
    delta: float = DEFAULT_SITE_DELTA  # the site's own: every budget epsilon is computed at it
    on_exhausted: str = "exclude"  # records over budget: leave them out ("exclude") or refuse the round
    site_key_path: Path | None = None  # None: beside the ledger (client/site_secret.py)
    # This site's copy of an hf: model's folder (or the folder a torch: backbone is imported from); None: the
    # run config's path (docs/own-model.md). Presets ignore it.
    model_path: Path | None = None

    @property
    def key_path(self) -> Path:
        return self.site_key_path or default_key_path(self.ledger_path)

    # Whether this site accepts a run config with reproducible-noise=true (seeded, predictable noise). A partner
    # site defaults to no; a simulated client to yes (the whole federation is one machine).
    allow_reproducible_noise: bool = False

    @property
    def simulated(self) -> bool:
        return self.data is None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], cfg: RunConfig) -> SiteConfig:
        unknown = sorted(set(node_config) - set(SITE_KEYS))
        if unknown:
            raise SiteConfigError(f"unknown node-config key(s) {unknown}; known keys: {', '.join(SITE_KEYS)}")
        device = resolve_device(str(node_config.get("device", "auto")))
        max_epsilon = parse_max_epsilon(node_config.get("max-epsilon", ""))
        out = Path(cfg.out_dir) if cfg.out_dir else None
        on_exhausted = str(node_config.get("on-exhausted", "exclude")).strip() or "exclude"
        if on_exhausted not in ON_EXHAUSTED:
            raise SiteConfigError(f"on-exhausted must be one of {', '.join(ON_EXHAUSTED)}, got '{on_exhausted}'")
        key = node_config.get("site-key-path")
        model_path = str(node_config.get("model-path", "")).strip()
        budget: dict[str, Any] = dict(
            on_exhausted=on_exhausted,
            site_key_path=Path(str(key)).expanduser() if key else None,
            model_path=Path(model_path).expanduser() if model_path else None,
        )
        if "data-path" in node_config:
            budget["delta"] = _site_delta(node_config.get("delta", DEFAULT_SITE_DELTA))
        real_site = "data-path" in node_config
        allow_seeded = _flag(node_config, ALLOW_REPRODUCIBLE_NOISE, default=not real_site)
        if cfg.reproducible_noise and not allow_seeded:
            raise SiteConfigError(
                "the run config asks for reproducible-noise=true (DP noise from a seed the coordinator knows, so "
                f"no protection against it) and this site's node config does not set {ALLOW_REPRODUCIBLE_NOISE}"
                "=true; this site refuses such runs (set it only for test data)"
            )
        if real_site:
            site_id = str(node_config.get("site-id", "")).strip()
            if not site_id:
                raise SiteConfigError("site-id is required with data-path: a short name such as 'hospital-a'")
            fmt = str(node_config.get("data-format", "")).strip() or guess_format(str(node_config["data-path"]))
            spec = SiteDataSpec(
                path=Path(str(node_config["data-path"])).expanduser(),
                format=fmt,  # type: ignore[arg-type]
                text_column=str(node_config.get("text-column", "text")),
                label_column=str(node_config.get("label-column", "label")),
            )
            ledger = node_config.get("ledger-path")
            if not ledger:
                raise SiteConfigError(
                    "ledger-path is required at a site: the privacy ledger must survive restarts "
                    '(e.g. ledger-path="/var/lib/privatune/site.ledger.sqlite")'
                )
            secret = node_config.get("he-secret-context")
            if secret:
                check_secret_context(Path(str(secret)).expanduser())
            cache = node_config.get("cache-dir")
            return cls(
                site_id=site_id,
                ledger_path=Path(str(ledger)).expanduser(),
                cache_dir=site_cache_dir(cache, Path(str(ledger)).expanduser()),
                max_epsilon=max_epsilon,
                he_secret_context=Path(str(secret)).expanduser() if secret else None,
                device=device,
                data=spec,
                **budget,
                allow_reproducible_noise=allow_seeded,
            )
        if "partition-id" not in node_config:
            raise SiteConfigError(
                "node config has neither data-path (a partner site) nor partition-id (a simulated "
                "client); set data-path, data-format and site-id for a site"
            )
        if out is None:
            raise SiteConfigError("a simulated client needs the run's out-dir in the run config")
        if max_epsilon is None and cfg.sim_max_epsilon > 0:
            max_epsilon = cfg.sim_max_epsilon
        pid = int(node_config["partition-id"])
        num = int(node_config.get("num-partitions", 0))
        site_id = str(node_config.get("site-id", f"client-{pid}"))
        secret = None
        if cfg.secure_aggregation == "he":
            # One machine holds the whole simulated federation: the clients' secret context sits
            # beside the server's public one (keygen writes both into one folder).
            secret = (
                Path(cfg.he_public_context).parent / "secret.ctx"
                if cfg.he_public_context
                else out / "keys" / "secret.ctx"
            )
        return cls(
            site_id=site_id,
            ledger_path=sim_ledger_dir(cfg) / f"{SITE_LEDGER_PREFIX}{site_id}{LEDGER_SUFFIX}",
            cache_dir=resolve_cache_dir(cfg.cache_dir),  # the run's: simulations on the same data share it
            max_epsilon=max_epsilon,
            he_secret_context=secret,
            device=device,
            partition_id=pid,
            num_partitions=num,
            delta=cfg.delta or DEFAULT_SITE_DELTA,  # simulation: the run's delta is every simulated site's
            **budget,
            allow_reproducible_noise=allow_seeded,
        )


def sim_ledger_dir(cfg: RunConfig) -> Path:
    """Where the simulated sites keep their ledgers: sim-ledger-dir (a tuning study's, shared by its trials) or
    the run folder's ledgers/."""
    return Path(cfg.sim_ledger_dir).expanduser() if cfg.sim_ledger_dir else Path(cfg.out_dir) / "ledgers"


def site_cache_dir(raw: Any, ledger: Path) -> Path | None:
    """A real site's feature cache: its node-config ``cache-dir`` (``off``/``none`` = none), by default next to its
    ledger. Never the run config's ``cache-dir``: the cache holds features of the site's private records, so where
    they are written is the site's decision, not the coordinator's."""
    text = "" if raw is None else str(raw).strip()
    if text.lower() in CACHE_OFF:
        return None
    return Path(text).expanduser() if text else ledger.parent / "cache"


def _site_delta(raw: Any) -> float:
    try:
        delta = float(raw)
    except (TypeError, ValueError):
        raise SiteConfigError(f"delta must be a number such as 1e-5, got '{raw}'") from None
    if not 0.0 < delta < 0.1:
        raise SiteConfigError(f"delta must be in (0, 0.1) and below 0.1/n for the site's n records, got {delta}")
    return delta


def _flag(node_config: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean node-config value (TOML bool or a string such as "true")."""
    if key not in node_config:
        return default
    value = node_config[key]
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise SiteConfigError(f"{key} must be true or false, got {value!r}")


def parse_max_epsilon(raw: Any) -> float | None:
    """The site's lifetime budget: a finite number > 0, or empty/0/none for no budget."""
    text = str(raw).strip()
    if text.lower() in ("", "0", "0.0", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise SiteConfigError(
            f"max-epsilon: {text!r} is not a number; give the site's lifetime budget, e.g. max-epsilon=10 "
            "(or leave it out for no budget)"
        ) from None
    if math.isnan(value) or value <= 0:
        raise SiteConfigError(f"max-epsilon must be a number > 0, got {text!r}")
    return value


def check_secret_context(path: Path) -> None:
    """he-secret-context names the secret.ctx file, not its folder."""
    if path.is_dir():
        raise SiteConfigError(
            f"he-secret-context: {path} is a folder; point it at the secret.ctx file `privatune keygen` wrote "
            f'(e.g. he-secret-context="{path / "secret.ctx"}")'
        )


def resolve_device(requested: str) -> str:
    """``auto`` picks the GPU when there is one; an explicit CUDA device must exist."""
    requested = requested.strip().lower() or "auto"
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SiteConfigError(
                f"device={requested} but this host has no CUDA GPU visible to torch; use device=cpu or auto"
            )
        if ":" in requested:
            idx = int(requested.split(":", 1)[1])
            if idx >= torch.cuda.device_count():
                raise SiteConfigError(f"device={requested} but only {torch.cuda.device_count()} GPU(s) are visible")
        return requested
    raise SiteConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{requested}'")
