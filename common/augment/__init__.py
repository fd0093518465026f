"""Data augmentation under DP (issue 16): the run config's spec (spec.py), the operations (image.py,
text.py, wordnet.py) and a text model's per-step views (text_batch.py).

Augmentation multiplicity itself (K views per sampled record, their per-sample gradients averaged before
clipping) is in :func:`privatune.client.training.train_local`; docs/augmentation.md says why it keeps epsilon.
"""
