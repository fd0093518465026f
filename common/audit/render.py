"""The audit report as people and programs read it: the console tables, ``audit.md`` and the JSON.

Rendering only: every verdict, violation and number here was decided by the checks (:mod:`.report` holds what
they produced); the plot is :mod:`.plots`. The CLI prints through these functions, so the terminal, the Markdown
and the JSON show one report one way.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import JustifyMethod, RenderableType
from rich.table import Table

from privatune.common.accounting import INDEPENDENT_REL_TOLERANCE
from privatune.common.audit.plots import PLOT_NAME, plot_epsilons
from privatune.common.audit.report import SEEDED_FLAG, SITE, AuditEntry, AuditReport, Violation
from privatune.common.audit.values import eps_text, short_fingerprint
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
    ("File", "left"),
)
_TOTAL_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("Site", "left"),
    ("Dataset", "left"),
    ("Runs", "right"),
    ("Spends", "right"),
    ("ε total", "right"),
    ("Budget", "right"),
    ("Left", "right"),
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
    ("Status", "left"),
)
#: What the totals mean, under both the console's and the Markdown's totals tables.
TOTALS_NOTE = (
    "ε total: a dataset's is the epsilon of its worst record, composed over every spend holding that record "
    "(never a sum of run epsilons); a site's (all datasets) is the worst record at the site. Runs of one dataset "
    "compose; different datasets do not add up unless they share records."
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
        d["ledger"] = report.name(e.file)
        entries.append(d)
    summaries = []
    for s in report.summaries:
        d = asdict(s)
        d["budget_left"] = s.budget_left
        d["name"] = report.name(s.file)
        summaries.append(d)
    datasets = [{**asdict(d), "budget_left": d.budget_left} for d in report.datasets]
    sites = [{**asdict(t), "budget_left": t.budget_left} for t in report.sites]
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
                "datasets": len(report.datasets),
                "sites": len(report.sites),
            },
            "files": [asdict(f) for f in report.files],
            "violations": [{**asdict(v), "ledger": report.name(v.file)} for v in report.violations],
            "notes": list(report.notes),
            "datasets": datasets,
            "sites": sites,
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


def _file_label(report: AuditReport, path: str) -> str:
    """A ledger's file as the console shows it beside its name: the file name, with its folder when another
    ledger has the same file name (three sites' ``ledger.sqlite``)."""
    p = Path(path)
    same = sum(Path(f.path).name == p.name for f in report.files)
    return f"{p.parent.name}/{p.name}" if same > 1 and p.parent.name else p.name


def total_rows(report: AuditReport) -> list[tuple[str, str, str, str, str, str, str]]:
    """The totals as the console shows them: each (site, dataset), then the site over all its datasets when it has
    more than one (or the site's total differs from its one dataset's: spends from before cohorts)."""
    rows = []
    for site in report.sites:
        mine = [d for d in report.datasets if d.file == site.file]
        for d in mine:
            rows.append(
                (
                    site.site,
                    short_fingerprint(d.dataset_fingerprint),
                    str(len(d.runs)),
                    str(d.spends),
                    eps_text(d.epsilon),
                    _fmt(d.max_epsilon),
                    eps_text(d.budget_left),
                )
            )
        if len(mine) != 1 or mine[0].epsilon != site.epsilon:
            rows.append(
                (
                    site.site,
                    f"all {len(site.datasets)}",
                    str(len({r for d in mine for r in d.runs})),
                    str(site.spends),
                    eps_text(site.epsilon),
                    _fmt(site.max_epsilon),
                    eps_text(site.budget_left),
                )
            )
    return rows


def render_table(report: AuditReport, entries: bool = False) -> RenderableType:
    """What ``privatune audit`` prints: by default a compact view that fits an 80-column terminal, with ``entries``
    every accounted row with its mechanism, reported and recomputed epsilons, and what is wrong with it.

    The compact view is three small tables: the ledgers (each by its site's name: kind, rows, chain intact or
    broken, file); the privacy spent per (site, dataset) and per site (the totals of :mod:`.report`, the same
    values the Markdown and the JSON show); and one row per site or client and ledger with its last run, that run's
    rounds and its epsilon after them (reported, recomputed with RDP, PRV and PLD) and a status. The JSON and Markdown reports always carry
    every field of every row.
    """
    from rich import box
    from rich.console import Group
    from rich.text import Text

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
                report.name(e.file),
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

    def small(title: str | None = None, caption: str | None = None) -> Table:
        return Table(
            title=title,
            caption=caption,
            box=box.SIMPLE_HEAD,
            title_justify="left",
            caption_justify="left",
            collapse_padding=True,
            pad_edge=False,
        )

    ledgers = small("Privacy ledger audit")
    for name, justify in _LEDGER_COLUMNS:
        ledgers.add_column(name, justify=justify, overflow="fold")
    for f in report.files:
        chain = "intact" if f.chain_ok else "[bold red]BROKEN[/]"
        ledgers.add_row(report.name(f.path), f.kind, str(f.rows), chain, _file_label(report, f.path))
    parts: list[RenderableType] = [ledgers]

    if report.sites:
        totals = small("Privacy spent per site and dataset")
        for name, justify in _TOTAL_COLUMNS:
            totals.add_column(name, justify=justify, no_wrap=name not in ("Site", "Dataset"), overflow="fold")
        for row in total_rows(report):
            totals.add_row(*row)
        parts += [totals, Text(TOTALS_NOTE, style="dim")]

    last: dict[tuple[str, str, str], AuditEntry] = {}
    run_rounds: Counter[tuple[str, str, str, str]] = Counter()
    for e in report.entries:
        if e.status == STATUS_TRAINED:
            last[(e.source, e.file, e.party)] = e  # entries are in ledger order: the last one wins
            run_rounds[(e.source, e.file, e.party, e.run_id)] += e.purpose == "train"
    clients = small("Last round of each site and client: epsilon of its run", caption + " · --entries: every row")
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

    for s in report.summaries:
        shown = last.get((s.source, s.file, s.party))
        run = shown.run_id if shown else (s.runs[0] if len(s.runs) == 1 else f"{len(s.runs)} runs")
        # the rounds of the run whose epsilon the row shows
        rounds = run_rounds[(s.source, s.file, s.party, shown.run_id)] if shown else s.rounds_trained
        status = []
        if s.violations:
            status.append(f"[bold red]FAIL {s.violations}[/]")
        if s.budget_exhausted:
            status.append(f"[yellow]{s.budget_exhausted} exhausted[/]")
        if s.dropped:
            status.append(f"[yellow]{s.dropped} dropped[/]")
        clients.add_row(
            s.source,
            s.party,
            run,
            str(rounds),
            eps_text(shown.epsilon_reported if shown else None),
            eps_text(shown.epsilon_rdp if shown else None),
            eps_text(shown.epsilon_prv if shown else None),
            eps_text(shown.epsilon_pld if shown else None),
            " ".join(status) or "[green]ok[/]",
        )
    parts.append(clients)
    seeded = [
        f"{s.party} ({s.seeded_rounds} of {s.rounds_trained})"
        for s in report.summaries
        if s.source == SITE and s.seeded_rounds
    ]
    if seeded:
        parts.append(
            Text.from_markup(f"[bold yellow]seeded noise[/] at site {', '.join(seeded)} round(s): {SEEDED_FLAG}")
        )
    return Group(*parts)


def render_violations(report: AuditReport) -> Table:
    """The violations, one per row, each naming the file and row."""
    table = Table(title="Violations" if report.violations else "Violations: none")
    for name in ("Kind", "Ledger", "Row", "Message"):
        table.add_column(name)
    for v in report.violations:
        table.add_row(f"[red]{v.kind}[/]", report.name(v.file), _row_label(v), v.message)
    return table


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_totals(report: AuditReport) -> list[str]:
    """The report's totals sections: per (site, dataset), then per site; the values the console shows."""
    if not report.sites:
        return []
    lines = [
        "",
        "## Privacy spent per site and dataset",
        "",
        TOTALS_NOTE + " Each total is composed at the delta and with the accountant of the latest spend it covers.",
        "",
        "| Site | Dataset | Runs | Spends | Trained rounds | Records | Shared records | Acc | δ | ε total | "
        "max-epsilon | Left |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for d in report.datasets:
        lines.append(
            f"| {_md_escape(d.site)} | {_md_escape(short_fingerprint(d.dataset_fingerprint))} | "
            f"{_md_escape(', '.join(d.runs))} | {d.spends} | {d.rounds_trained} | {_fmt(d.records)} | "
            f"{d.shared_records} | {d.accountant} | {_fmt(d.delta, 3)} | {eps_text(d.epsilon)} | "
            f"{_fmt(d.max_epsilon)} | {eps_text(d.budget_left)} |"
        )
    lines += [
        "",
        "## Privacy spent per site",
        "",
        "The worst record at each site over all its datasets: the largest of its datasets' totals, and at least the "
        "composition of all its spends from before cohorts (which records those touched is unknown).",
        "",
        "| Site | Datasets | Spends | Records | Acc | δ | ε total | max-epsilon | Left |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for t in report.sites:
        lines.append(
            f"| {_md_escape(t.site)} | {len(t.datasets)} | {t.spends} | {_fmt(t.records)} | {_fmt(t.accountant)} | "
            f"{_fmt(t.delta, 3)} | {eps_text(t.epsilon)} | {_fmt(t.max_epsilon)} | {eps_text(t.budget_left)} |"
        )
    return lines


def write_report(report: AuditReport, out_dir: Path) -> ReportFiles:
    """Write ``audit.md`` (verdict, ledgers, violations, notes, totals per site and dataset and per site, summaries,
    entries), ``epsilon_per_round.png``
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
    lines += ["## Ledgers", "", "| Ledger | File | Kind | Rows | Chain |", "|---|---|---|---:|---|"]
    lines += [
        f"| {_md_escape(report.name(f.path))} | {_md_escape(f.path)} | {f.kind} | {f.rows} | "
        f"{'intact' if f.chain_ok else 'BROKEN'} |"
        for f in report.files
    ]
    lines += ["", "## Violations", ""]
    if report.violations:
        lines += ["| Kind | File | Row | Message |", "|---|---|---|---|"]
        for v in report.violations:
            lines.append(
                f"| {v.kind} | {_md_escape(report.name(v.file))} | {_row_label(v)} | {_md_escape(v.message)} |"
            )
    else:
        lines.append("None.")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {_md_escape(n)}" for n in report.notes]
    lines += _markdown_totals(report)
    lines += [
        "",
        "## Per site and client",
        "",
        "Each party's rounds and its largest run epsilon; what its ledger adds up to is in the totals above.",
        "",
        "| Source | Party | Ledger | Runs | Trained | Budget exhausted | Dropped | Acc | ε run (max) | Violations |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for s in report.summaries:
        lines.append(
            f"| {s.source} | {_md_escape(s.party)} | {_md_escape(report.name(s.file))} | "
            f"{_md_escape(', '.join(s.runs))} | {s.rounds_trained} | {s.budget_exhausted} | {s.dropped} | "
            f"{_fmt(s.accountant)} | {eps_text(s.epsilon_run)} | {s.violations} |"
        )
    lines += [
        "",
        "## Noise sources",
        "",
        "Where each site's DP noise came from, as its ledger records it (`site-csprng`: a CSPRNG only the site "
        f"knows; `seeded`: {SEEDED_FLAG}).",
        "",
        "| Source | Party | Ledger | Noise | Flag |",
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
        lines.append(f"| {s.source} | {_md_escape(s.party)} | {_md_escape(report.name(s.file))} | {kinds} | {flag} |")
    lines += [
        "",
        f"![epsilon per round per client]({PLOT_NAME})",
        "",
        "## Rows",
        "",
        "| Src | Ledger | Seq | Run | Round | Party | Status | σ | q | Steps | C | δ | Acc | ε reported | "
        "ε RDP | ε PRV | ε PLD | Independent | ε reported / independent | ε dataset | max-epsilon | Check |",
        "|---|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for e in report.entries:
        lines.append(
            f"| {e.source} | {_md_escape(report.name(e.file))} | {e.seq} | {_md_escape(e.run_id)} | {e.round} | "
            f"{_md_escape(e.party)} | {e.status} | {_fmt(e.noise_multiplier)} | {_fmt(e.sample_rate)} | "
            f"{_fmt(e.steps)} | {_fmt(e.max_grad_norm)} | {_fmt(e.delta, 3)} | {_fmt(e.accountant)} | "
            f"{_fmt(e.epsilon_reported)} | {_fmt(e.epsilon_rdp)} | {_fmt(e.epsilon_prv)} | {_fmt(e.epsilon_pld)} | "
            f"{_fmt(e.independent_accountant)} | {_fmt(e.independent_ratio)} | "
            f"{_fmt(e.epsilon_dataset)} | {_fmt(e.max_epsilon)} | {', '.join(e.problems) or 'ok'} |"
        )
    files.markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files
