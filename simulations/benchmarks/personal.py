"""The personalisation benchmark (issue 15): per client, personalised against global accuracy at the same epsilon.

    python -m privatune.simulations.benchmarks.personal --out DIR
    python -m privatune.simulations.benchmarks.personal --quick --out DIR   # a smoke run: not for figures

Under Dirichlet(0.1) label skew (Fashion-MNIST, 10,000 records, the MNIST CNN's head, 10 clients):

1. a federation at ``--fed-epsilon``, then ``privatune personalise`` at ``--personal-epsilon`` (each site fine-tunes
   the final model on its own training split with DP and keeps it); the personalised model's figure per client,
   and the composed epsilon of each site's worst record over both (its ledger's ``epsilon_dataset``);
2. a federation alone at that composed total (the same total epsilon, all of it spent on the global model), whose
   global model is scored on every client's own validation split (read from a ``privatune personalise`` of that
   run, which scores the global model before it trains; its personalised figures are not used).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privatune.simulations.benchmarks.report import (
    bench_parser,
    environment,
    fmt_eps,
    fmt_pct,
    markdown_table,
    plan_from_options,
    print_flush,
    results_folder,
    run_header,
    write_results,
)
from privatune.simulations.benchmarks.tuning import step

NAME = "personal"


@dataclass(frozen=True)
class PersonalPlan:
    preset: str = "fashion-mnist"
    mode: str = "head"
    clients: int = 10
    alpha: float = 0.1
    rounds: int = 0  # 0 = the preset's
    fed_epsilon: float = 3.0
    personal_epsilon: float = 1.0
    personal_epochs: int = 3
    val_fraction: float = 0.2
    seed: int = 42
    max_records: int = 10000  # Fashion-MNIST's first 10,000 (stratified): about 800 training records per client

    def checked(self) -> PersonalPlan:
        for name in ("fed_epsilon", "personal_epsilon"):
            value = getattr(self, name)
            if not (0 < value < math.inf):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        if self.clients < 2 or self.personal_epochs < 1:
            raise ValueError("--clients must be at least 2 and --personal-epochs at least 1")
        return self

    def run_config(self) -> str:
        keys = f"partition=dirichlet alpha={self.alpha:g} val-fraction={self.val_fraction:g}"
        return keys + (f" max-records={self.max_records}" if self.max_records else "")


QUICK = {"preset": "digits", "clients": 2, "rounds": 1, "max_records": 300, "personal_epochs": 1}


def _simulate(plan: PersonalPlan, epsilon: float, out: Path, name: str) -> Path:
    run = out / name
    argv = ["simulate", "--preset", plan.preset, "--mode", plan.mode, "--clients", str(plan.clients)]
    argv += ["--epsilon", repr(epsilon)]
    argv += ["--seed", str(plan.seed), "--run-config", plan.run_config(), "--out", str(run)]
    if plan.rounds:
        argv += ["--rounds", str(plan.rounds)]
    step(argv, out, name, run / "summary.json")
    return run


def _personalise(plan: PersonalPlan, run: Path, out: Path, name: str, epochs: int, epsilon: float) -> dict[str, Any]:
    report = run / "personalisation" / "personalisation.json"
    argv = ["personalise", str(run), "--epochs", str(epochs), "--epsilon", repr(epsilon), "--mode", "run"]
    step(argv, out, name, report)
    return dict(json.loads(report.read_text()))


def run(plan: PersonalPlan, out: Path) -> dict[str, Any]:
    out = results_folder(out)
    result = run_header(NAME, plan, environment("torch", "flwr", "opacus"))
    fed = _simulate(plan, plan.fed_epsilon, out, "federated")
    personal = _personalise(plan, fed, out, "personalise", plan.personal_epochs, plan.personal_epsilon)
    total = max(float(c["epsilon_dataset"]) for c in personal["clients"])
    same = _simulate(plan, round(total, 3), out, "global-same-total")
    scored = _personalise(plan, same, out, "score-global", 1, plan.personal_epsilon)  # only its global column
    at_total = {c["site_id"]: c["global_accuracy"] for c in scored["clients"]}
    rows = []
    for c in personal["clients"]:
        rows.append(
            {
                "site": c["site_id"],
                "val_records": c["num_val"],
                "global_at_fed_epsilon": c["global_accuracy"],
                "global_at_same_total": at_total.get(c["site_id"]),
                "personalised": c["personal_accuracy"],
                "epsilon_total": c["epsilon_dataset"],
            }
        )
    result.update(
        rows=rows,
        composed_total_epsilon=total,
        same_total_run_epsilon=json.loads((same / "summary.json").read_text()).get("max_client_epsilon"),
        mean=_means(rows),
    )
    result["table"] = table(rows, result["mean"])
    write_results(out / "bench_personal.json", result)
    print_flush("\n" + result["table"])
    print_flush(f"\nresults in {out / 'bench_personal.json'}")
    return result


def _means(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    def mean(key: str) -> float | None:
        values = [float(r[key]) for r in rows if r[key] is not None]
        return sum(values) / len(values) if values else None

    out = {k: mean(k) for k in ("global_at_fed_epsilon", "global_at_same_total", "personalised")}
    p, g = out["personalised"], out["global_at_same_total"]
    out["gain_points"] = None if p is None or g is None else 100 * (p - g)
    return out


HEADERS = ("client", "val records", "global (fed eps)", "global (same total eps)", "personalised", "total epsilon")


def table(rows: Sequence[dict[str, Any]], mean: dict[str, float | None]) -> str:
    body = [
        [
            r["site"],
            str(r["val_records"]),
            fmt_pct(r["global_at_fed_epsilon"]),
            fmt_pct(r["global_at_same_total"]),
            fmt_pct(r["personalised"]),
            fmt_eps(r["epsilon_total"]),
        ]
        for r in rows
    ]
    body.append(
        [
            "**mean**",
            "",
            fmt_pct(mean["global_at_fed_epsilon"]),
            fmt_pct(mean["global_at_same_total"]),
            fmt_pct(mean["personalised"]),
            "",
        ]
    )
    return markdown_table(HEADERS, body)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(NAME, "Personalised vs global accuracy per client at the same total epsilon.")
    parser.add_argument("--fed-epsilon", type=float, default=3.0)
    parser.add_argument("--personal-epsilon", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--preset", default="fashion-mnist")
    parser.add_argument("--mode", default="head")
    parser.add_argument("--max-records", type=int, default=10000, help="0 = all")
    args = parser.parse_args(argv)

    plan = plan_from_options(
        parser,
        args,
        PersonalPlan,
        ["fed_epsilon", "personal_epsilon", "clients", "preset", "mode", "max_records"],
        QUICK,
    )
    run(plan, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
