"""Synonyms from the WordNet 3.0 database files, read directly (no nltk).

The files come from the Debian package ``wordnet-base`` (``/usr/share/wordnet``; another folder through
``PRIVATUNE_WORDNET``). nltk's WordNet reader is not used because it needs a ``lexnames`` file that Debian's
package does not ship; the database format (wndb(5WN)) is simple enough to read here:

* ``index.<pos>``: one line per lemma, ``lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offset...``
  (the last ``synset_cnt`` fields are byte offsets into ``data.<pos>``);
* ``data.<pos>``: at each offset a line ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] ...``
  (``w_cnt`` in hex); adjectives may carry a syntactic marker such as ``(a)`` after the word;
* ``<pos>.exc``: irregular inflections (``geese goose``), used with the standard detachment rules to find the
  base form of an inflected word, as WordNet's own ``morphy`` does.

Lines of the licence header start with two spaces. Everything is loaded lazily and cached per folder.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

#: The environment variable naming the WordNet folder, and its default (Debian's wordnet-base).
WORDNET_ENV = "PRIVATUNE_WORDNET"
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
POS_NAMES = ("noun", "verb", "adj", "adv")

# WordNet's morphological detachment rules (suffix, replacement) per part of speech.
_DETACH = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}
_MARKER = re.compile(r"\([a-z]+\)$")
_COMPLETE: set[str] = set()  # folders found complete (checked once: the ops ask for every word they look up)


class WordNetMissingError(RuntimeError):
    """The WordNet files the synonym augmentations need are not there."""


def wordnet_dir() -> Path:
    return Path(_folder())


def _folder() -> str:
    return os.environ.get(WORDNET_ENV) or DEFAULT_WORDNET_DIR


def wordnet_problem(folder: Path | None = None) -> str | None:
    """Why WordNet cannot be read from ``folder`` (default: :func:`wordnet_dir`), or None when it can."""
    if (str(folder) if folder is not None else _folder()) in _COMPLETE:
        return None
    folder = folder if folder is not None else wordnet_dir()
    missing = [
        f"{kind}.{pos}" for pos in POS_NAMES for kind in ("index", "data") if not (folder / f"{kind}.{pos}").is_file()
    ]
    if not missing:
        _COMPLETE.add(str(folder))
        return None
    return (
        f"WordNet not found: {folder} has no {missing[0]}: "
        f"install the Debian package (apt-get install wordnet-base) or set {WORDNET_ENV} to a folder holding "
        "WordNet 3.0's index.* and data.* files"
    )


def require_wordnet() -> Path:
    """The WordNet folder, or :class:`WordNetMissingError` saying how to install it."""
    problem = wordnet_problem()
    if problem is not None:
        raise WordNetMissingError(problem)
    return wordnet_dir()


@functools.lru_cache(maxsize=16)
def _index(folder: str, pos: str) -> dict[str, tuple[int, ...]]:
    """``lemma -> synset offsets`` of one ``index.<pos>`` file."""
    table: dict[str, tuple[int, ...]] = {}
    path = Path(folder) / f"index.{pos}"
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.startswith("  "):
                continue
            fields = line.split()
            try:
                synset_cnt = int(fields[2])
                table[fields[0]] = tuple(int(f) for f in fields[len(fields) - synset_cnt :])
            except (IndexError, ValueError):
                raise _malformed(path, f"line {number}") from None
    return table


def _malformed(path: Path, where: str) -> WordNetMissingError:
    return WordNetMissingError(
        f"{path}, {where}, is not in WordNet's database format; reinstall it (apt-get install --reinstall "
        f"wordnet-base) or point {WORDNET_ENV} at a WordNet 3.0 folder"
    )


@functools.lru_cache(maxsize=16)
def _exceptions(folder: str, pos: str) -> dict[str, tuple[str, ...]]:
    path = Path(folder) / f"{pos}.exc"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        return {f[0]: tuple(f[1:]) for f in (line.split() for line in fh) if len(f) > 1}


def _synset_words(folder: str, pos: str, offset: int) -> list[str]:
    path = Path(folder) / f"data.{pos}"
    with open(path, "rb") as fh:
        fh.seek(offset)
        fields = fh.readline().decode("utf-8", errors="replace").split()
    try:
        if int(fields[0]) != offset:  # an index offset that does not land on a synset line
            raise ValueError(offset)
        return [_MARKER.sub("", fields[4 + 2 * i]) for i in range(int(fields[3], 16))]
    except (IndexError, ValueError):
        raise _malformed(path, f"the synset at byte {offset}") from None


def _base_forms(folder: str, pos: str, word: str) -> list[str]:
    """``word`` itself when it is a lemma, else its base forms (exception list, then detachment rules)."""
    index = _index(folder, pos)
    if word in index:
        return [word]
    candidates = list(_exceptions(folder, pos).get(word, ()))
    candidates += [
        word[: -len(suffix)] + repl
        for suffix, repl in _DETACH[pos]
        if word.endswith(suffix) and len(word) > len(suffix)
    ]
    return [c for c in dict.fromkeys(candidates) if c in index]


@functools.lru_cache(maxsize=65536)
def _synonyms_in(folder: str, word: str) -> tuple[str, ...]:
    key = word.strip().lower().replace(" ", "_")
    found: dict[str, None] = {}
    for pos in POS_NAMES:
        for lemma in _base_forms(folder, pos, key):
            for offset in _index(folder, pos)[lemma]:
                for name in _synset_words(folder, pos, offset):
                    name = name.lower()
                    if name not in (key, lemma):
                        found[name.replace("_", " ")] = None
    return tuple(found)


def synonyms(word: str) -> tuple[str, ...]:
    """The WordNet synonyms of ``word`` (lowercase, multi-word ones with spaces), in the database's order,
    without the word itself; ``()`` for a word WordNet does not know. Raises :class:`WordNetMissingError`."""
    folder = _folder()
    return _synonyms_in(folder if folder in _COMPLETE else str(require_wordnet()), word)
