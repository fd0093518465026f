"""The peer comparison (issue 13): the same DP federation through plain Flower, as Flower's Opacus example writes
it, and through privatune, side by side: time per round, accuracy, reported and true composed epsilon.

    python -m privatune.simulations.benchmarks.peer --out DIR
"""
