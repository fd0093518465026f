"""``python -m privatune.simulations.benchmarks.dp``: the DP benchmark from the command line."""

from privatune.simulations.benchmarks.dp.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
