"""`privatune personalise RUN_DIR`: each simulated site of a finished run fine-tunes the final global model on its
own records with DP, keeps the result, and the run folder gets a per-client table and plot (docs/personalisation.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from privatune.cli.terminal import console


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def personalise(
    run_dir: Path = typer.Argument(..., help="the --out folder of a finished `privatune simulate`"),
    epochs: int = typer.Option(3, "--epochs", help="local epochs of DP-SGD at each site"),
    epsilon: float = typer.Option(1.0, "--epsilon", help="the personalisation's own epsilon target per site"),
    mode: str = typer.Option("run", "--mode", help="run: train the run's trainable set; head: only the head"),
    noise_multiplier: float = typer.Option(
        0.0, "--noise-multiplier", help="explicit DP noise (0: calibrated to --epsilon)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON on stdout"),
) -> None:
    """Personalise every client of a simulation (DP spend in its ledger, model kept in its folder); report
    global vs personalised accuracy on each client's own validation split."""
    from privatune.client.personalise import PersonaliseSettings
    from privatune.common.jsonsafe import jsonable
    from privatune.common.offline import set_offline_env
    from privatune.simulations.personalise import REPORT_CSV, REPORT_DIR, REPORT_JSON, REPORT_PNG, personalise_run

    set_offline_env()
    settings = PersonaliseSettings(epochs=epochs, epsilon=epsilon, mode=mode, noise_multiplier=noise_multiplier)
    report = personalise_run(run_dir, settings)
    if as_json:
        typer.echo(json.dumps(jsonable(report), sort_keys=True))
        return
    table = Table(title=f"privatune personalise: run {report['run_id']} ({epochs} epochs, epsilon {epsilon:g}, {mode})")
    for col in ("client", "global acc", "personalised acc", "gain", "train", "val", "epsilon", "epsilon (ledger)"):
        table.add_column(col, justify="left" if col == "client" else "right")
    for c in report["clients"]:
        g, p = c["global_accuracy"], c["personal_accuracy"]
        gain = "-" if g is None or p is None else f"{p - g:+.4f}"
        table.add_row(
            c["site_id"],
            _acc(g),
            _acc(p),
            gain,
            str(c["num_train"]),
            str(c["num_val"]),
            f"{c['epsilon']:.3f}",
            f"{c['epsilon_dataset']:.3f}",
        )
    console.print(table)
    for site, reason in report["refused"].items():
        console.print(f"{site}: not personalised: {reason}", highlight=False, soft_wrap=True)
    if report["mean_gain"] is not None:
        console.print(
            f"mean accuracy: global {report['mean_global_accuracy']:.4f}, personalised "
            f"{report['mean_personal_accuracy']:.4f} ({report['mean_gain']:+.4f})"
        )
    out = Path(run_dir) / REPORT_DIR
    console.print(
        f"wrote {out / REPORT_JSON}, {out / REPORT_CSV} and {out / REPORT_PNG}; each personalised model stays in its "
        "site's folder (personal-<site>.safetensors beside its ledger)",
        highlight=False,
        soft_wrap=True,
    )
