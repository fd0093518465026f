"""``privatune personalise RUN_DIR``: every simulated site of a finished run personalises its final global model.

Each client opens its records as it did in the run (same partition, same keyed validation split, same ledger under
RUN/ledgers or the run's sim-ledger-dir), loads the run's final global model and fine-tunes it with DP through the
site path (client/personalise.py: the round's guard, ledger and DP-SGD). The personalised weights stay in the
site's folder (``personal-<site>.safetensors`` beside its ledger). Only because this is a simulation, where every
site is this machine, are the sites' validation figures collected here, into ``RUN/personalisation/``: a table
(JSON and CSV) and a bar chart of global vs personalised accuracy per client. Nothing goes to a server.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from privatune.client.personal_head import load_head
from privatune.client.personalise import (
    SIM_REPORT_DIR as REPORT_DIR,  # under the run folder (simulations/run_folder.py RUN_ENTRIES names it)
)
from privatune.client.personalise import (
    Personalised,
    PersonaliseSettings,
    personalise_at_site,
    settings_of,
)
from privatune.client.round import Refusal, open_run
from privatune.client.site_config import SiteConfig
from privatune.common.config import ConfigError, RunConfig
from privatune.common.jsonsafe import jsonable
from privatune.common.model_card import read_model_file
from privatune.common.models import load_trainable_state
from privatune.server.run_record import write_json_atomic

REPORT_JSON = "personalisation.json"
REPORT_CSV = "personalisation.csv"
REPORT_PNG = "personalisation.png"
CSV_FIELDS = ("site_id", "global_accuracy", "personal_accuracy", "num_train", "num_val", "epsilon", "epsilon_dataset")


def run_folder_inputs(run_dir: Path) -> tuple[RunConfig, int, Path]:
    """The finished run's config, number of clients and final plaintext model file; errors name the file."""
    run_dir = Path(os.path.abspath(run_dir))
    try:
        stored = json.loads((run_dir / "config.json").read_text())
        clients = int(json.loads((run_dir / "simulation.json").read_text())["num_clients"])
    except FileNotFoundError as err:
        raise ConfigError(
            f"personalise {run_dir}: {Path(str(err.filename)).name} is missing; give the --out folder of a finished "
            "`privatune simulate`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"personalise {run_dir}: its run record cannot be read ({err})") from None
    cfg = RunConfig.from_flower({**stored, "out-dir": str(run_dir)})
    names = ("global.decrypted.safetensors",) if cfg.secure_aggregation == "he" else ("global.safetensors",)
    model_file = run_dir / names[0]
    if not model_file.is_file():
        raise ConfigError(
            f"personalise {run_dir}: {model_file.name} is missing; the run did not finish (continue it with "
            "`privatune simulate --resume`)"
            + (" or decrypt its model with `privatune decrypt`" if cfg.secure_aggregation == "he" else "")
        )
    return cfg, clients, model_file


def personalise_run(run_dir: Path, settings: PersonaliseSettings) -> dict[str, Any]:
    """Personalise every simulated client of the run in ``run_dir``; write and return the report."""
    cfg, clients, model_file = run_folder_inputs(run_dir)
    card, weights = read_model_file(model_file)
    if card.fine_tuning.mode != cfg.fine_tuning.mode:
        raise ConfigError(
            f"personalise: {model_file.name} was trained in mode {card.fine_tuning.mode}, the run's "
            f"config.json says {cfg.mode}; the run folder is inconsistent"
        )
    run_id = card.run_id
    if not run_id:
        raise ConfigError(f"personalise: {model_file.name} names no run id in its model card; re-run the simulation")
    rows: list[Personalised] = []
    refused: dict[str, str] = {}
    for pid in range(clients):
        site = SiteConfig.from_node_config({"partition-id": pid, "num-partitions": clients}, cfg)
        run = open_run(cfg, site, run_id, cfg.num_server_rounds)
        load_trainable_state(run.model, weights, keep_head=cfg.personal_head)
        if cfg.personal_head:  # the file holds the body; each site's own head is in its folder
            load_head(run.model, site, run_id)
        outcome = personalise_at_site(run, settings)
        if isinstance(outcome, Refusal):
            refused[site.site_id] = outcome.reason
        else:
            rows.append(outcome)
    out = Path(cfg.out_dir) / REPORT_DIR
    report = build_report(run_id, settings, rows, refused)
    write_report(out, report, rows)
    return report


def collect_final_personalisation(cfg: RunConfig, run_id: str) -> dict[str, Any] | None:
    """After a simulation with personalise-epochs > 0: the simulated sites' outcomes (RUN/personalisation/<site>.json,
    client/personalise.py final_personalisation) as the report ``privatune personalise`` writes."""
    folder = Path(cfg.out_dir) / REPORT_DIR
    files = sorted(folder.glob("client-*.json"), key=lambda p: (len(p.stem), p.stem))
    rows = [Personalised(**json.loads(p.read_text())) for p in files]
    if not rows:
        return None
    report = build_report(run_id, settings_of(cfg), rows, {})
    write_report(folder, report, rows)
    return report


def summary_entry(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """summary.json's line on the final personalisation: the means and where the per-client report is."""
    if report is None:
        return None
    keys = ("mean_global_accuracy", "mean_personal_accuracy", "mean_gain")
    return {**{k: report[k] for k in keys}, "report": f"{REPORT_DIR}/{REPORT_JSON}", "clients": len(report["clients"])}


def mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def build_report(
    run_id: str, settings: PersonaliseSettings, rows: list[Personalised], refused: dict[str, str]
) -> dict[str, Any]:
    g = mean([r.global_accuracy for r in rows])
    p = mean([r.personal_accuracy for r in rows])
    return {
        "run_id": run_id,
        "settings": asdict(settings),
        "clients": [asdict(r) for r in rows],
        "refused": refused,
        "mean_global_accuracy": g,
        "mean_personal_accuracy": p,
        "mean_gain": (p - g) if g is not None and p is not None else None,
        "kept_at": "site (simulation: collected into this run folder; nothing was sent to the server)",
    }


def write_report(out: Path, report: dict[str, Any], rows: list[Personalised]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / REPORT_JSON, jsonable(report))
    with open(out / REPORT_CSV, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    plot_personalisation(rows, out / REPORT_PNG)


def plot_personalisation(rows: list[Personalised], path: Path) -> Path:
    """Bars per client: global vs personalised accuracy on the client's own validation split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    xs = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2.5), 4))
    width = 0.38
    nan = float("nan")
    ax.bar(
        xs - width / 2,
        [r.global_accuracy if r.global_accuracy is not None else nan for r in rows],
        width,
        label="global model",
    )
    ax.bar(
        xs + width / 2,
        [r.personal_accuracy if r.personal_accuracy is not None else nan for r in rows],
        width,
        label="personalised (DP)",
    )
    ax.set_xticks(xs, [r.site_id for r in rows], rotation=45 if len(rows) > 6 else 0)
    ax.set_ylabel("accuracy on the client's own validation split")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title("personalisation per client")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
