"""Benchmarks: measured figures of the real code paths, apart from the simulation engine they drive.

Each runs as ``python -m privatune.simulations.benchmarks.<name>``: ``dp`` (DP-SGD time, federated DP accuracy),
``accounting`` (RDP vs PRV calibration), ``he`` (HE vs plaintext aggregation), ``he_micro`` (the CKKS core
alone) and ``whitebox`` (the white-box audit over planted bugs). ``report`` holds what they share: the run
header, tables, number formats, JSON output and the common flags. Figures and how to rerun them:
docs/benchmarks.md.
"""
