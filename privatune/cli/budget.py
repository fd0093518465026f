"""`privatune budget` (also `privatune site budget`): a site's privacy budget per dataset, and what a run would
cost it. Reads the site ledger, never writes it; nothing is sent anywhere (client/budget.py)."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from privatune.cli.inputs import parse_kv
from privatune.cli.terminal import console


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def budget(
    node_config: str = typer.Option(..., "--node-config", help="the SuperNode's --node-config string"),
    run_config: str = typer.Option(
        "", "--run-config", help="a run to project against the budget, as for flwr: 'preset=\"digits\"'"
    ),
    accountant: str = typer.Option(
        "", "--accountant", help="compose with this accountant (default: the run config's, prv without one)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON on stdout (for scripts)"),
) -> None:
    """Epsilon spent and left per dataset in the site ledger, composed as the site's guard composes it; with
    --run-config, whether that whole run fits and what is left after it."""
    from privatune.client.budget import COMPOSITION_NOTE, site_budget
    from privatune.common.jsonsafe import jsonable

    runs = parse_kv(run_config) if run_config.strip() else None
    rep = site_budget(parse_kv(node_config, "--node-config"), runs, accountant or None)
    if json_out:
        typer.echo(json.dumps(jsonable(rep.as_dict()), indent=2))
        return
    limit = "no max-epsilon" if rep.max_epsilon is None else f"max-epsilon {rep.max_epsilon:g}"
    table = Table(
        title=f"privatune budget: site {rep.site_id} ({limit}, delta {rep.delta:g}, {rep.accountant})",
        caption=f"ledger {rep.ledger_path}",
    )
    columns = ("dataset", "rows", "records", "each run alone", "sum of runs", "its rows composed", "spent", "remaining")
    for col in columns:
        table.add_column(col, overflow="fold", justify="left" if col in ("dataset", "each run alone") else "right")
    for d in rep.datasets:
        name = d.fingerprint[:16] + (" (data-path)" if d.fingerprint == rep.current_fingerprint else "")
        per_run = ", ".join(f"{r[:12]} {_eps(e)}" for r, e in d.runs.items())
        table.add_row(
            name,
            str(d.rows),
            str(d.records),
            per_run,
            _eps(d.sum_of_runs),
            _eps(d.own),
            _eps(d.spent),
            _eps(d.remaining),
        )
    if not rep.datasets:
        table.add_row("(nothing spent yet)", "0", "0", "", "", "", _eps(0.0), _eps(rep.max_epsilon))
    console.print(table)
    console.print(
        f"note: {COMPOSITION_NOTE}. 'spent' is the worst record's epsilon over every spend holding it (a record "
        "also in another dataset carries that one's spends too); remaining = max-epsilon minus spent.",
        highlight=False,
    )
    proj = rep.projection
    if proj is None:
        return
    colour = "green" if proj.fits else "bold red"
    console.print(f"[{colour}]run projection[/]: {proj.summary()}", highlight=False)
    if not proj.fits:
        console.print(f"to fit: {proj.advice()}", highlight=False)
