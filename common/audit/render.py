"""The audit report as people and programs read it: the console tables, ``audit.md`` and the JSON.

Rendering only: every verdict, violation and number here was decided by the checks (:mod:`.report` holds what
they produced); the plot is :mod:`.plots`. The CLI prints through these functions, so the terminal, the Markdown
and the JSON show one report one way.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import JustifyMethod, RenderableType
from rich.table import Table

from privatune.common.accounting import INDEPENDENT_REL_TOLERANCE
from privatune.common.audit.plots import PLOT_NAME, plot_epsilons
from privatune.common.audit.report import SEEDED_FLAG, SITE, AuditEntry, AuditReport, Violation
from privatune.common.audit.values import fmt as _fmt
from privatune.common.jsonsafe import jsonable
from privatune.common.ledger import STATUS_TRAINED

MARKDOWN_NAME = "audit.md"
JSON_NAME = "audit.json"


# Console columns and how each is justified: every row (--entries), the ledgers, one row per site or client.
_ENTRY_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("Src", "left"),
    ("Ledger", "left"),
    ("Seq", "right"),
    ("Run", "left"),
    ("Rnd", "right"),
    ("Site/client", "left"),
    ("Status", "left"),
    ("σ", "right"),
    ("q", "right"),
    ("Steps", "right"),
    ("C", "right"),
    ("δ", "right"),
    ("Acc", "left"),
    ("ε reported", "right"),
    ("ε RDP", "right"),
    ("ε PRV", "right"),
    ("ε PLD", "right"),
    ("rep/ind", "right"),
    ("ε dataset", "right"),
    ("Budget", "right"),
    ("Check", "left"),
)
_LEDGER_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("Ledger", "left"),
    ("Kind", "left"),
    ("Rows", "right"),
    ("Chain", "left"),
)
_PARTY_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("Src", "left"),
    ("Party", "left"),
    ("Run", "left"),
    ("Rnds", "right"),
    ("ε rep.", "right"),
    ("ε RDP", "right"),
    ("ε PRV", "right"),
    ("ε PLD", "right"),
    ("Budget", "right"),
    ("Status", "left"),
)


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plot: Path
    json: Path


def report_to_json(report: AuditReport) -> dict[str, Any]:
    """The whole report as plain JSON types; entries carry the mechanism fields and the recomputed epsilons."""
    entries = []
    for e in report.entries:
        d = asdict(e)
        d["epsilon_recomputed"] = e.epsilon_recomputed
        d["independent_ratio"] = e.independent_ratio
        entries.append(d)
    summaries = []
    for s in report.summaries:
        d = asdict(s)
        d["budget_left"] = s.budget_left
        summaries.append(d)
    return jsonable(
        {
            "ok": report.ok,
            "tolerance": report.tolerance,
            "independent_rel_tolerance": INDEPENDENT_REL_TOLERANCE,
            "counts": {
                "files": len(report.files),
                "entries": len(report.entries),
                "violations": len(report.violations),
                "notes": len(report.notes),
            },
            "files": [asdict(f) for f in report.files],
            "violations": [asdict(v) for v in report.violations],
            "notes": list(report.notes),
            "summaries": summaries,
            "entries": entries,
        }
    )


def json_text(report: AuditReport, sort_keys: bool = True) -> str:
    """The report as indented JSON text: ``audit.json`` sorts its keys, ``privatune audit --json`` keeps the
    report's own order (``sort_keys=False``), as each always has."""
    return json.dumps(report_to_json(report), indent=2, sort_keys=sort_keys, default=str)


def _row_label(v: Violation) -> str:
    """Where a violation is: the file as a whole (—), a chain's head, or the table and row."""
    return "—" if v.seq is None else ("head" if v.seq == 0 else f"{v.table or ''} {v.seq}".strip())


def render_table(report: AuditReport, entries: bool = False) -> RenderableType:
    """What ``privatune audit`` prints: by default a compact view that fits an 80-column terminal, with ``entries``
    every accounted row with its mechanism, reported and recomputed epsilons, and what is wrong with it.

    The compact view is two small tables: the ledgers (kind, rows, chain intact or broken) and one row per site or
    client and ledger: its run(s), trained rounds, the last epsilon (reported, recomputed with RDP, PRV and PLD),
    the site budget and a status. The JSON and Markdown reports always carry every field of every row.
    """
    from rich import box
    from rich.console import Group

    verdict = "[bold green]PASS[/]" if report.ok else f"[bold red]FAIL[/]: {len(report.violations)} violation(s)"
    caption = f"{verdict} · {len(report.files)} ledger(s) · tolerance {report.tolerance:g}"
    if entries:
        table = Table(title="Privacy ledger audit", caption=caption)
        for name, justify in _ENTRY_COLUMNS:
            table.add_column(name, justify=justify)
        for e in report.entries:
            check = "[green]ok[/]" if not e.problems else "[red]" + ", ".join(e.problems) + "[/]"
            table.add_row(
                e.source,
                Path(e.file).name,
                str(e.seq),
                e.run_id,
                str(e.round),
                e.party,
                e.status,
                _fmt(e.noise_multiplier),
                _fmt(e.sample_rate),
                _fmt(e.steps),
                _fmt(e.max_grad_norm),
                _fmt(e.delta, 3),
                _fmt(e.accountant),
                _fmt(e.epsilon_reported),
                _fmt(e.epsilon_rdp),
                _fmt(e.epsilon_prv),
                _fmt(e.epsilon_pld),
                _fmt(e.independent_ratio),
                _fmt(e.epsilon_dataset),
                _fmt(e.max_epsilon),
                check,
            )
        return table

    ledgers = Table(
        title="Privacy ledger audit", box=box.SIMPLE_HEAD, title_justify="left", collapse_padding=True, pad_edge=False
    )
    for name, justify in _LEDGER_COLUMNS:
        ledgers.add_column(name, justify=justify, overflow="fold")
    for f in report.files:
        ledgers.add_row(Path(f.path).name, f.kind, str(f.rows), "intact" if f.chain_ok else "[bold red]BROKEN[/]")

    last: dict[tuple[str, str, str], AuditEntry] = {}
    for e in report.entries:
        if e.status == STATUS_TRAINED:
            last[(e.source, e.file, e.party)] = e  # entries are in ledger order: the last one wins
    clients = Table(
        box=box.SIMPLE_HEAD,
        caption=caption + " · --entries: every row",
        caption_justify="left",
        collapse_padding=True,
        pad_edge=False,
    )
    for name, justify in _PARTY_COLUMNS:
        # Numbers never wrap; a long run id is cut with an ellipsis before anything else gives way.
        wraps = name in ("Party", "Status")
        clients.add_column(
            name,
            justify=justify,
            no_wrap=not wraps,
            overflow="ellipsis" if name == "Run" else "fold",
            min_width=8 if name == "Party" else len(name),  # "client-9" stays on one line
            max_width=10 if name == "Run" else None,
        )

    def eps(x: Any) -> str:  # fixed decimals keep the columns aligned; violations are in Status
        return f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else _fmt(x)

    for s in report.summaries:
        shown = last.get((s.source, s.file, s.party))
        run = s.runs[0] if len(s.runs) == 1 else f"{len(s.runs)} runs"
        status = []
        if s.violations:
            status.append(f"[bold red]FAIL {s.violations}[/]")
        if s.budget_exhausted:
            status.append(f"[yellow]{s.budget_exhausted} exhausted[/]")
        if s.dropped:
            status.append(f"[yellow]{s.dropped} dropped[/]")
        budget = "—" if s.max_epsilon is None else f"{_fmt(s.max_epsilon)}"
        clients.add_row(
            s.source,
            s.party,
            run,
            str(s.rounds_trained),
            eps(shown.epsilon_reported if shown else None),
            eps(shown.epsilon_rdp if shown else None),
            eps(shown.epsilon_prv if shown else None),
            eps(shown.epsilon_pld if shown else None),
            budget,
            " ".join(status) or "[green]ok[/]",
        )
    seeded = [
        f"{s.party} ({s.seeded_rounds} of {s.rounds_trained})"
        for s in report.summaries
        if s.source == SITE and s.seeded_rounds
    ]
    if not seeded:
        return Group(ledgers, clients)
    from rich.text import Text

    flag = Text.from_markup(f"[bold yellow]seeded noise[/] at site {', '.join(seeded)} round(s): {SEEDED_FLAG}")
    return Group(ledgers, clients, flag)


def render_violations(report: AuditReport) -> Table:
    """The violations, one per row, each naming the file and row."""
    table = Table(title="Violations" if report.violations else "Violations: none")
    for name in ("Kind", "Ledger", "Row", "Message"):
        table.add_column(name)
    for v in report.violations:
        table.add_row(f"[red]{v.kind}[/]", Path(v.file).name, _row_label(v), v.message)
    return table


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(report: AuditReport, out_dir: Path) -> ReportFiles:
    """Write ``audit.md`` (verdict, ledgers, violations, notes, summaries, entries), ``epsilon_per_round.png``
    and ``audit.json`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(markdown=out / MARKDOWN_NAME, plot=out / PLOT_NAME, json=out / JSON_NAME)
    plot_epsilons(report, files.plot)
    files.json.write_text(json_text(report) + "\n", encoding="utf-8")
    lines = ["# Privacy ledger audit", ""]
    verdict = "**PASS**: no violations" if report.ok else f"**FAIL**: {len(report.violations)} violation(s)"
    lines += [
        f"{verdict}. {len(report.files)} ledger(s), {len(report.entries)} row(s), tolerance "
        f"{report.tolerance:g}. Every epsilon below was recomputed from the recorded mechanisms with Opacus' "
        "RDP and PRV accountants and, independently of Opacus, with dp-accounting's PLD (rows accounted with "
        f"PLD are checked against Opacus' PRV); a recorded epsilon more than "
        f"{100 * INDEPENDENT_REL_TOLERANCE:g} % below the independent value is a violation.",
        "",
    ]
    lines += ["## Ledgers", "", "| File | Kind | Rows | Chain |", "|---|---|---:|---|"]
    lines += [
        f"| {_md_escape(f.path)} | {f.kind} | {f.rows} | {'intact' if f.chain_ok else 'BROKEN'} |" for f in report.files
    ]
    lines += ["", "## Violations", ""]
    if report.violations:
        lines += ["| Kind | File | Row | Message |", "|---|---|---|---|"]
        for v in report.violations:
            lines.append(f"| {v.kind} | {_md_escape(Path(v.file).name)} | {_row_label(v)} | {_md_escape(v.message)} |")
    else:
        lines.append("None.")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {_md_escape(n)}" for n in report.notes]
    lines += [
        "",
        "## Per site and client",
        "",
        "| Source | Party | File | Runs | Trained | Budget exhausted | Dropped | Acc | ε run (max) | "
        "ε dataset | max-epsilon | Left | Violations |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in report.summaries:
        lines.append(
            f"| {s.source} | {_md_escape(s.party)} | {_md_escape(Path(s.file).name)} | "
            f"{_md_escape(', '.join(s.runs))} | {s.rounds_trained} | {s.budget_exhausted} | {s.dropped} | "
            f"{_fmt(s.accountant)} | {_fmt(s.epsilon_run)} | {_fmt(s.epsilon_dataset)} | "
            f"{_fmt(s.max_epsilon)} | {_fmt(s.budget_left)} | {s.violations} |"
        )
    lines += [
        "",
        "## Noise sources",
        "",
        "Where each site's DP noise came from, as its ledger records it (`site-csprng`: a CSPRNG only the site "
        f"knows; `seeded`: {SEEDED_FLAG}).",
        "",
        "| Source | Party | File | Noise | Flag |",
        "|---|---|---|---|---|",
    ]
    for s in report.summaries:
        mine = [
            e
            for e in report.entries
            if (e.source, e.file, e.party) == (s.source, s.file, s.party) and e.status == STATUS_TRAINED
        ]
        kinds = ", ".join(sorted({e.noise_source or "not reported" for e in mine})) or "—"
        flag = SEEDED_FLAG if s.seeded_rounds else ""
        lines.append(f"| {s.source} | {_md_escape(s.party)} | {_md_escape(Path(s.file).name)} | {kinds} | {flag} |")
    lines += [
        "",
        f"![epsilon per round per client]({PLOT_NAME})",
        "",
        "## Rows",
        "",
        "| Src | File | Seq | Run | Round | Party | Status | σ | q | Steps | C | δ | Acc | ε reported | "
        "ε RDP | ε PRV | ε PLD | Independent | ε reported / independent | ε dataset | max-epsilon | Check |",
        "|---|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for e in report.entries:
        lines.append(
            f"| {e.source} | {_md_escape(Path(e.file).name)} | {e.seq} | {_md_escape(e.run_id)} | {e.round} | "
            f"{_md_escape(e.party)} | {e.status} | {_fmt(e.noise_multiplier)} | {_fmt(e.sample_rate)} | "
            f"{_fmt(e.steps)} | {_fmt(e.max_grad_norm)} | {_fmt(e.delta, 3)} | {_fmt(e.accountant)} | "
            f"{_fmt(e.epsilon_reported)} | {_fmt(e.epsilon_rdp)} | {_fmt(e.epsilon_prv)} | {_fmt(e.epsilon_pld)} | "
            f"{_fmt(e.independent_accountant)} | {_fmt(e.independent_ratio)} | "
            f"{_fmt(e.epsilon_dataset)} | {_fmt(e.max_epsilon)} | {', '.join(e.problems) or 'ok'} |"
        )
    files.markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files
