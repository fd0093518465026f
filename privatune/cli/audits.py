"""The audit commands: `audit` (ledgers) and the empirical privacy audits `canary-audit` and `whitebox-audit`.
Separate because they judge finished runs and never train a federation."""

from __future__ import annotations

from pathlib import Path

import typer

from privatune.cli.inputs import UsageError, check_output_file, describe_os_error
from privatune.cli.terminal import console, err_console
from privatune.common.models import FINE_TUNING_MODES


def audit(
    paths: list[Path] = typer.Argument(..., help="ledger files or folders holding them"),
    json_out: Path | None = typer.Option(None, "--json", help="write the machine-readable audit here"),
    report: Path | None = typer.Option(None, help="folder for the Markdown report and its PNG"),
    entries: bool = typer.Option(False, "--entries", help="print every ledger row (wide) instead of the summary"),
) -> None:
    """Verify ledgers, recompute every epsilon, cross-check server against sites; exit 1 on any violation."""
    from privatune.common.audit import audit_paths, json_text, render_table, render_violations, write_report

    if json_out:
        check_output_file(json_out, "--json")
    rep = audit_paths(paths)
    console.print(render_table(rep, entries=entries))
    if json_out:
        try:
            json_out.write_text(json_text(rep, sort_keys=False))
        except OSError as err:
            raise UsageError(f"--json {json_out}: cannot write ({describe_os_error(err)})") from None
    if report:
        files = write_report(rep, report)
        for p in (files.markdown, files.plot, files.json):
            console.print(f"wrote {p}")
    if not rep.ok:
        err_console.print(render_violations(rep))
        raise typer.Exit(1)
    console.print("[green]audit clean[/]")


def canary_audit(
    preset: str = typer.Option("digits", help="the preset whose client data the canaries join"),
    canaries: int = typer.Option(1000, help="m: canaries, each included with probability 1/2"),
    epsilon: float = typer.Option(8.0, help="target epsilon of the one training run"),
    no_dp: bool = typer.Option(False, "--no-dp", help="train without DP (the control: the bound should be high)"),
    mode: str = typer.Option(
        "",
        help=f"{' | '.join(FINE_TUNING_MODES)}; tuned here: head, partial (= last-k, k=1), full (default: partial for images, head for text)",
    ),
    epochs: int = typer.Option(0, help="local epochs (0 = the audit's default for the mode)"),
    lr: float = typer.Option(0.0, help="learning rate (0 = the audit's default for the mode)"),
    batch_size: int = typer.Option(0, "--batch-size", help="batch size (0 = the audit's default)"),
    k: int = typer.Option(0, help="guesses on each side (0 = canaries // 10)"),
    clients: int = typer.Option(3, help="simulated clients the preset is split into"),
    client: int = typer.Option(0, help="which of them trains"),
    seed: int = typer.Option(42),
    accountant: str = typer.Option("rdp", help="rdp | prv: the accountant whose epsilon is the claim"),
    json_out: Path | None = typer.Option(None, "--json", help="write the result here"),
) -> None:
    """Empirical privacy audit in one training run: canaries, the client's DP-SGD path, a 95 % epsilon lower
    bound beside the claimed epsilon; exit 1 if the bound exceeds the claim (a bug)."""
    from privatune.simulations.canary_audit import CanaryAuditError, CanarySettings, report, run_canary_audit

    settings = CanarySettings(
        preset=preset,
        canaries=canaries,
        dp=not no_dp,
        epsilon=epsilon,
        mode=mode,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        k=k,
        clients=clients,
        client=client,
        seed=seed,
        accountant=accountant,
    )
    try:
        res = run_canary_audit(settings)
    except CanaryAuditError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    raise typer.Exit(report(res, json_out, console))


def whitebox_audit(
    epsilon: float = typer.Option(2.0, help="target epsilon of the audited run (the noise is calibrated to it)"),
    canaries: int = typer.Option(5000, help="m: Dirac gradient canaries, each included with probability 1/2"),
    plant: str = typer.Option("none", help="none | noise-half | noise-seeded | no-clip: a known bug to catch"),
    adversary: str = typer.Option("informed", help="informed (replays noise seeded from the run config) | blind"),
    k_plus: int = typer.Option(-1, "--k-plus", help="'in' guesses (-1 = chosen from m and the claim)"),
    k_minus: int = typer.Option(0, "--k-minus", help="'out' guesses"),
    auditor_seed: int = typer.Option(0, "--auditor-seed", help="the auditor's coin flips and data"),
    json_out: Path | None = typer.Option(None, "--json", help="write the result here"),
) -> None:
    """White-box one-run audit through the real DP-SGD step: gradient canaries, per-step models, a 95 % epsilon
    lower bound beside the claim; exit 1 if the bound exceeds the claim (a bug), 2 on bad input."""
    from privatune.simulations.whitebox_audit import WhiteboxAuditError, WhiteboxSettings, report, run_whitebox_audit

    settings = WhiteboxSettings(
        epsilon=epsilon,
        canaries=canaries,
        plant=plant,
        adversary=adversary,
        k_plus=k_plus,
        k_minus=k_minus,
        auditor_seed=auditor_seed,
    )
    try:
        res = run_whitebox_audit(settings)
    except WhiteboxAuditError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    raise typer.Exit(report(res, json_out, console))
