"""Text augmentation per training step: a sampled batch's K views of each record, drawn and then tokenised.

What :func:`privatune.client.training.train_local` takes as ``augment`` for a text model. The loop's inputs are
the records' row numbers (one int64 tensor, client/round.py), which the loop's multiplicity function repeats K
times exactly as it repeats an image batch's rows (record i's views are rows i*K .. i*K+K-1); this turns them
into the model's token tensors: each row's text through the operations (common/augment/text.py), with a numpy
Generator seeded by one draw from the loop's torch generator (itself seeded from the round's randomness: the
site's CSPRNG, or a simulation's recorded seed), then the model's own encoder. So views are fresh at every step
and only the records the step sampled are augmented and tokenised. Labels never pass through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from privatune.common.augment.spec import AugmentStep
from privatune.common.augment.text import augment_text, check_text_ops, text_site_problem

#: A text model's encoder: texts to its input tensors (``ModelSpec.encode`` with the run's max-length bound).
TextEncoder = Callable[[Sequence[str]], tuple[torch.Tensor, ...]]


class TextAugmentSiteError(ValueError):
    """This site cannot run an operation the run asks for (WordNet missing); the message names the operation,
    the folder looked in and the fix. Raised before training, so the round spends nothing."""

    def __init__(self, message: str, op: str) -> None:
        super().__init__(message)
        self.op = op

    def for_server(self) -> str:
        """What the coordinator learns: which operation, not the site's folders (those stay in the site log)."""
        return (
            f"augment: {self.op} needs WordNet, which this site lacks; the site's log names the folder and the fix "
            "(apt-get install wordnet-base, or drop the operation)"
        )


def text_batch_augment(
    texts: Sequence[str] | np.ndarray, steps: Sequence[AugmentStep], encode: TextEncoder
) -> Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]]:
    """The ``augment`` of a text model's loop over ``texts`` (row i is ``texts[i]``); checks at once that this site
    can run every step (:class:`TextAugmentSiteError` otherwise)."""
    ops = [(s.op.name, s.strength) for s in steps]
    for name, strength in ops:
        problem = text_site_problem([(name, strength)])
        if problem is not None:
            raise TextAugmentSiteError(problem, name)
    check_text_ops(ops)
    records = [str(t) for t in texts]

    def apply(inputs: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        rows = inputs[0]
        views: list[str] = []
        if rows.numel():  # an empty Poisson batch draws nothing: it still needs empty token tensors
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
            views = [augment_text(records[i], ops, rng) for i in rows.tolist()]
        return [t.to(rows.device) for t in encode(views)]

    return apply
