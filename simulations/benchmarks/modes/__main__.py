"""``python -m privatune.simulations.benchmarks.modes``: the fine-tuning modes benchmark from the command line."""

from privatune.simulations.benchmarks.modes.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
