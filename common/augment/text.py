"""Offline text augmentation: EDA's four operations (Wei and Zou 2019) and token dropout, on one text at a time.

Pure and framework-free: an operation sees a text's whitespace-separated words, never its label, and draws
every choice from the ``numpy.random.Generator`` it is given, so a view is reproducible from the generator's
seed (at a site that seed comes from the site's own randomness). An operation's strength is in [0, 1]: for
EDA's operations it is alpha, the fraction of the words changed, ``n = max(1, round(alpha * len(words)))``
(0 changes nothing); for token dropout it is each token's drop probability. No operation empties a text.

Synonyms come from WordNet (:mod:`privatune.common.augment.wordnet`), at the site only: :meth:`TextOp.check`
(names and ranges, what the coordinator's run-config validation runs through :data:`TEXT_AUGMENT_OPS`) needs no
WordNet; :func:`text_site_problem` is the site's check before training for the two operations that need it.
Under DP, views are combined by augmentation multiplicity (each record's gradient averaged over its K views
before clipping), never added as new records: :func:`text_views` gives those K views, and
:mod:`privatune.common.augment.text_batch` draws and tokenises them per training step.
"""

from __future__ import annotations

import math
import numbers
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from privatune.common.augment import wordnet
from privatune.common.augment.spec import TEXT, AugmentOp, parse_augment

Words = list[str]

# Words EDA leaves alone when it picks words to replace with synonyms (its stop-word list, abridged).
_STOP_WORDS_TEXT = (
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself "
    "it its itself they them their theirs themselves what which who whom this that these those am is are was were "
    "be been being have has had having do does did doing a an the and but if or because as until while of at by "
    "for with about against between into through during before after above below to from up down in out on off "
    "over under again further then once here there when where why how all any both each few more most other some "
    "such no nor not only own same so than too very s t can will just don should now"
)
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019"


def _count(strength: float, words: Words) -> int:
    return max(1, round(strength * len(words)))


def _core(word: str) -> tuple[str, str, str]:
    """``(leading punctuation, the word, trailing punctuation)``: "good," looks up "good"."""
    core = word.strip(_PUNCT)
    if not core:
        return word, "", ""
    start = word.index(core)
    return word[:start], core, word[start + len(core) :]


def _synonym_of(word: str, rng: np.random.Generator) -> str | None:
    """A random WordNet synonym of ``word``, punctuation and a leading capital kept; None when it has none."""
    head, core, tail = _core(word)
    if not core or core.lower() in STOP_WORDS:
        return None
    found = wordnet.synonyms(core)
    if not found:
        return None
    pick = found[int(rng.integers(len(found)))]
    if core[0].isupper():
        pick = pick[0].upper() + pick[1:]
    return head + pick + tail


def random_swap(words: Words, strength: float, rng: np.random.Generator) -> Words:
    """Swap two random words, n times."""
    out = list(words)
    if strength == 0 or len(out) < 2:
        return out
    for _ in range(_count(strength, out)):
        i, j = rng.choice(len(out), size=2, replace=False)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Words, strength: float, rng: np.random.Generator) -> Words:
    """Delete n random words (never the last one)."""
    if strength == 0 or len(words) < 2:
        return list(words)
    drop = set(rng.choice(len(words), size=min(_count(strength, words), len(words) - 1), replace=False).tolist())
    return [w for i, w in enumerate(words) if i not in drop]


def random_insertion(words: Words, strength: float, rng: np.random.Generator) -> Words:
    """Insert a synonym of a random word of the text at a random position, n times (EDA's ten tries each)."""
    out = list(words)
    if strength == 0 or not out:
        return out
    for _ in range(_count(strength, words)):
        for _try in range(10):
            synonym = _synonym_of(out[int(rng.integers(len(out)))], rng)
            if synonym is not None:
                out.insert(int(rng.integers(len(out) + 1)), synonym.strip(_PUNCT) or synonym)
                break
    return out


def synonym_replacement(words: Words, strength: float, rng: np.random.Generator) -> Words:
    """Replace n distinct words that have WordNet synonyms (stop words excepted) each by a random synonym."""
    out = list(words)
    if strength == 0 or not out:
        return out
    budget = _count(strength, words)
    for i in rng.permutation(len(out)).tolist():
        if budget == 0:
            break
        synonym = _synonym_of(out[i], rng)
        if synonym is not None:
            out[i] = synonym
            budget -= 1
    return out


def token_dropout(words: Words, strength: float, rng: np.random.Generator) -> Words:
    """Drop each word independently with probability ``strength``; if all would go, one random word stays."""
    if strength == 0 or not words:
        return list(words)
    keep = rng.random(len(words)) >= strength
    if not keep.any():
        keep[int(rng.integers(len(words)))] = True
    return [w for w, k in zip(words, keep, strict=True) if k]


@dataclass(frozen=True)
class TextOp:
    """A named text operation: ``check`` says what is wrong with a strength (None when fine), ``apply`` runs it."""

    name: str
    transform: Callable[[Words, float, np.random.Generator], Words]
    needs_wordnet: bool = False

    def check(self, strength: float) -> str | None:
        """The name-and-range check, which needs no WordNet (the coordinator validates with it)."""
        if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not math.isfinite(strength):
            return f"augment: {self.name} strength must be a number in [0, 1], got {strength!r}"
        if not 0.0 <= strength <= 1.0:
            return f"augment: {self.name} strength must be in [0, 1], got {strength}"
        return None

    def site_problem(self, strength: float) -> str | None:
        """What this site lacks to run the operation (WordNet for ``synonym`` and ``insert``), or None."""
        if not self.needs_wordnet or strength == 0:
            return None
        problem = wordnet.wordnet_problem()
        if problem is None:
            return None
        return f"augment: {self.name} needs WordNet at this site: {problem}; or drop {self.name} from augment"

    def apply(self, words: Words, strength: float, rng: np.random.Generator) -> Words:
        problem = self.check(strength) or self.site_problem(strength)
        if problem is not None:
            raise ValueError(problem)
        out = self.transform(list(words), float(strength), rng)
        return out if out or not words else list(words)  # never empties a text


#: Every text operation by its run-config name.
TEXT_OPS: dict[str, TextOp] = {
    op.name: op
    for op in (
        TextOp("swap", random_swap),
        TextOp("delete", random_deletion),
        TextOp("insert", random_insertion, needs_wordnet=True),
        TextOp("synonym", synonym_replacement, needs_wordnet=True),
        TextOp("dropout", token_dropout),
    )
}


#: The run config's text operations (common/augment/spec.py's registry for text models): strength in (0, 1], as
#: for images 0 (a no-op) is refused as a typo. ``apply(words, strength, rng)`` is the operation's own.
TEXT_AUGMENT_OPS: dict[str, AugmentOp] = {
    name: AugmentOp(name, 0.0, 1.0, TEXT_OPS[name].apply, unit, doc)
    for name, unit, doc in (
        ("swap", "of the words", "swap two random words, alpha x words times"),
        ("delete", "of the words", "delete alpha x words random words (never the last)"),
        ("insert", "of the words", "insert a WordNet synonym of a random word, alpha x words times"),
        ("synonym", "of the words", "replace alpha x words words by WordNet synonyms"),
        ("dropout", "per word", "drop each word with this probability (one always stays)"),
    )
}


def text_op_problem(name: str, strength: float) -> str | None:
    """What is wrong with one ``name=strength`` item (unknown name, bad strength, missing WordNet), or None."""
    op = TEXT_OPS.get(name)
    if op is None:
        return f"augment: unknown text operation {name!r}; known: {', '.join(TEXT_OPS)}"
    return op.check(strength)


def check_text_ops(ops: Sequence[tuple[str, float]]) -> None:
    """Refuse a list of operations before training: ValueError naming the first bad item and the fix."""
    for name, strength in ops:
        problem = text_op_problem(name, strength) or TEXT_OPS[name].site_problem(strength)
        if problem is not None:
            raise ValueError(problem)


def text_site_problem(ops: Sequence[tuple[str, float]]) -> str | None:
    """At a site, before training: the first operation this site cannot run (WordNet missing), or None.

    One line naming the operation, the folder looked in and the fix (install wordnet-base, or drop the op)."""
    for name, strength in ops:
        op = TEXT_OPS.get(name)
        problem = op.site_problem(strength) if op is not None else None
        if problem is not None:
            return problem
    return None


def augment_site_problem(augment: str, kind: str | None) -> str | None:
    """What this site lacks to run the run config's ``augment`` on a model of ``kind`` (``privatune site check``
    and the round, before the spend), or None; a spec the run config would refuse raises AugmentSpecError."""
    if kind != TEXT:
        return None
    return text_site_problem([(s.op.name, s.strength) for s in parse_augment(augment, kind)])


def augment_text(text: str, ops: Sequence[tuple[str, float]], rng: np.random.Generator) -> str:
    """``text`` with ``ops`` applied in order; the text itself when nothing changed (its spacing kept)."""
    check_text_ops(ops)
    words = text.split()
    out = words
    for name, strength in ops:
        out = TEXT_OPS[name].apply(out, strength, rng)
    return text if out == words else " ".join(out)


def text_views(
    texts: Sequence[str], ops: Sequence[tuple[str, float]], k: int, rng: np.random.Generator
) -> list[list[str]]:
    """``k`` augmented views of each text, ``views[i][j]`` the j-th of ``texts[i]``, for augmentation
    multiplicity (every view of a record belongs to that record; labels stay with the record)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"augment-views must be a whole number >= 1, got {k!r}")
    check_text_ops(ops)
    return [[augment_text(text, ops, rng) for _ in range(k)] for text in texts]
