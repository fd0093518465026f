"""Fine-tuning modes under DP (issue 11): accuracy, epsilon, time per local epoch and client peak memory per mode.

    python -m privatune.simulations.benchmarks.modes [--quick] [--cells lora-eps8,...] [--out DIR]

The package: ``plan`` (the grid and each cell's run config), ``child`` (one cell in its own process, its clients'
peak memory), ``records`` (figures read back from a run), ``tables`` (tables and plot), ``bench`` (the command).
"""
