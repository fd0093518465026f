"""``python -m privatune.simulations.benchmarks.he``: the HE benchmark from the command line."""

from privatune.simulations.benchmarks.he.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
