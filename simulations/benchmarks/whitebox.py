"""Benchmark of the white-box audit: lower bound against claim for the real code and every planted bug.

    python -m privatune.simulations.benchmarks.whitebox --epsilons 1 2 4 8 --canaries 10000 --json bench.json

One run per (epsilon, canary count, plant), the site's own CSPRNG for the real code and ``noise-half``, the
informed adversary and the default sizes of :class:`privatune.simulations.whitebox_audit.WhiteboxSettings`. Prints a
Markdown table (docs/benchmarks.md): each cell is the 95 % lower bound, its ratio to the claim, and "BUG" where the
bound exceeds the claim; "most m allows" is the bound perfect guessing would give.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from privatune.simulations.benchmarks.report import prog, write_json
from privatune.simulations.whitebox_audit import PLANTS, WhiteboxResult, WhiteboxSettings, run_whitebox_audit


def cell(res: WhiteboxResult) -> str:
    ratio = res.epsilon_lower_bound / res.epsilon_claimed
    mark = " **BUG**" if res.violation else ""
    return f"{res.epsilon_lower_bound:.2f} ({ratio:.2f}){mark}"


def bench(epsilons: Sequence[float], canaries: Sequence[int], auditor_seed: int = 0) -> list[WhiteboxResult]:
    out = []
    for m in canaries:
        for eps in epsilons:
            for plant in PLANTS:
                res = run_whitebox_audit(
                    WhiteboxSettings(epsilon=eps, canaries=m, plant=plant, auditor_seed=auditor_seed)
                )
                print(
                    f"# eps {eps:g} m {m} {plant}: bound {res.epsilon_lower_bound:.3f} claim "
                    f"{res.epsilon_claimed:.3f} ({res.total_seconds:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                out.append(res)
    return out


def table(results: Sequence[WhiteboxResult]) -> str:
    rows = [
        "| target eps | claim (RDP) | m (guesses) | most m allows | " + " | ".join(PLANTS) + " |",
        "|---|---|---|---|" + "---|" * len(PLANTS),
    ]
    groups: dict[tuple[float, int], dict[str, WhiteboxResult]] = {}
    for r in results:
        groups.setdefault((r.settings["epsilon"], r.settings["canaries"]), {})[r.settings["plant"]] = r
    for (eps, m), by_plant in groups.items():
        first = next(iter(by_plant.values()))
        rows.append(
            f"| {eps:g} | {first.epsilon_claimed:.2f} | {m} ({first.guesses}) | "
            f"{first.epsilon_max_for_m:.2f} | "
            + " | ".join(cell(by_plant[p]) if p in by_plant else "" for p in PLANTS)
            + " |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("whitebox"), description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--canaries", type=int, nargs="+", default=[10_000])
    p.add_argument("--auditor-seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    results = bench(a.epsilons, a.canaries, a.auditor_seed)
    print(table(results))
    print(f"\n{len(results)} runs in {time.perf_counter() - t0:.0f} s")
    if a.json:
        write_json(a.json, [r.to_json() for r in results], make_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
