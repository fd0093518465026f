"""`privatune site ...`: what a partner site runs before it joins (check, ledger migration). Separate because
it is the only group a site operator needs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from privatune.cli.inputs import parse_kv
from privatune.cli.terminal import console, err_console


def site_check(
    node_config: str = typer.Option(..., "--node-config", help="the SuperNode's --node-config string"),
    run_config: str = typer.Option(
        "", "--run-config", help="the coordinator's run config, as for flwr: 'preset=\"digits\" batch-size=32'"
    ),
    he_fingerprint: str | None = typer.Option(
        None, "--he-fingerprint", help="the key fingerprint the coordinator published"
    ),
) -> None:
    """Check a site's data, ledger, budget, keys and device without connecting to anything."""
    from privatune.client.site_check import check_site

    rep = check_site(parse_kv(node_config, "--node-config"), parse_kv(run_config), he_fingerprint)
    table = Table(title="privatune site check")
    table.add_column("check")
    table.add_column("", justify="center")
    table.add_column("detail", overflow="fold")
    for c in rep.checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[bold red]FAIL[/]", c.detail)
    console.print(table)
    if rep.projection is not None and not rep.projection.fits:
        console.print(f"to fit the run: {rep.projection.advice()}", highlight=False)
    if not rep.ok:
        err_console.print("[bold red]site check failed[/]: fix the lines marked FAIL; this site would not train.")
        raise typer.Exit(1)
    console.print("[green]site ready[/]")


def site_migrate_ledger(
    path: Path = typer.Argument(..., help="a version 1 ledger file (stop the site first)"),
) -> None:
    """Rewrite a version 1 ledger as the current version; every row and hash is kept, the original is backed up."""
    from privatune.common.ledger import LedgerError, migrate_ledger

    try:
        backup = migrate_ledger(path)
    except LedgerError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(1) from None
    console.print(f"migrated {path}; the version 1 original is kept as {backup}")
