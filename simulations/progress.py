"""Round-by-round progress on the terminal and the closing table of a simulation."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from privatune.common.config import RunConfig
from privatune.server.run_record import RoundReport


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            return x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


class RoundPrinter:
    """Observer the ServerApp calls after every round (it runs in this process under simulation)."""

    def __init__(self, console: Console, cfg: RunConfig, num_clients: int) -> None:
        self.console = console
        self.cfg = cfg
        self.num_clients = num_clients
        self.t0 = time.perf_counter()

    def header(self) -> None:
        c = self.cfg
        dp = f"DP target epsilon {c.target_epsilon:g}" if c.private else "no DP"
        self.console.print(
            f"[bold]privatune[/] {c.preset or 'no preset'}: {c.model} on {c.dataset}, mode={c.mode}, "
            f"{self.num_clients} clients, "
            f"{c.num_server_rounds} rounds, {c.partition}"
            + (f"(alpha={c.alpha:g})" if c.partition == "dirichlet" else "")
            + f", {dp}, aggregation={c.secure_aggregation}"
            + (", [bold yellow]seeded noise[/]" if c.reproducible_noise else "")
        )
        self.console.print("[dim]loading models and computing features on the first round...[/]")

    def __call__(self, report: RoundReport) -> None:
        eps = [e for e in (r.get("epsilon") for r in report.clients.values()) if isinstance(e, float)]
        parts = [f"round {report.round}/{self.cfg.num_server_rounds}"]  # kept under 80 columns
        if report.round > 0:
            parts.append(f"{len(report.clients)} trained")
            if report.clients and not report.aggregated:
                parts.append("[yellow]not aggregated[/]")
            if report.dropped:
                parts.append(f"[yellow]{len(report.dropped)} dropped[/]")
        if report.central:
            parts.append(f"test acc {_fmt(report.central.get('accuracy'))} F1 {_fmt(report.central.get('macro-f1'))}")
        if report.federated:
            parts.append(f"val acc {_fmt(report.federated.get('eval-accuracy'))} (noised)")
        if eps:
            parts.append(f"eps<={_fmt(max(eps), 2)}")
        parts.append(f"[dim]{time.perf_counter() - self.t0:.0f}s[/]")
        self.console.print("  " + " | ".join(parts))

    def final(self, summary: dict[str, Any], out: Path) -> None:
        t = Table(title="result", show_header=True)
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_row("rounds completed", str(summary.get("rounds_completed")))
        t.add_row("test accuracy", _fmt(summary.get("test_accuracy")))
        t.add_row("test macro-F1", _fmt(summary.get("test_macro_f1")))
        t.add_row("federated validation accuracy (noised)", _fmt(summary.get("federated_accuracy")))
        t.add_row("target epsilon", _fmt(summary.get("target_epsilon")))
        t.add_row("noise source", _fmt(summary.get("noise_source")))
        t.add_row("wall time (s)", _fmt(summary.get("simulation_seconds"), 1))
        self.console.print(t)
        eps = summary.get("per_client_epsilon") or {}
        if eps:
            te = Table(title="epsilon spent per client (composed over all rounds)")
            te.add_column("client")
            te.add_column("epsilon", justify="right")
            for cid, e in sorted(eps.items(), key=lambda kv: (len(kv[0]), kv[0])):
                te.add_row(cid, _fmt(e))
            self.console.print(te)
        if summary.get("stopped_reason"):
            self.console.print(f"[yellow]stopped early:[/] {escape(summary['stopped_reason'])}")
        for warning in summary.get("warnings") or []:
            self.console.print(f"[yellow]warning:[/] {escape(warning)}")
        reasons = summary.get("failure_reasons") or {}
        if summary.get("status") == "failed":
            self.console.print("[bold red]run failed:[/] no round aggregated an update; why each client did not train:")
        elif reasons:
            self.console.print("clients that did not train in the last rounds:")
        for cid, reason in sorted(reasons.items(), key=lambda kv: (len(kv[0]), kv[0])):
            self.console.print(f"  {escape(cid)}: {escape(reason)}", highlight=False)
        self.console.print(f"results in {out}/ (summary.json, metrics.jsonl, rounds.png, ledgers/)")
