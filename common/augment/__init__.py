"""Data augmentation: named operations with strengths, configured in the run config (docs/augmentation.md)."""
