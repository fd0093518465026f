"""Offline text augmentation (common/augment/text.py) and its WordNet reader (common/augment/wordnet.py).

Most tests read a small WordNet folder written here in the database format (so they need no system package);
the tests against the real files of Debian's wordnet-base are skipped where it is not installed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from privatune.common.augment import text as T
from privatune.common.augment import wordnet as W

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
# (pos, words of one synset) -- "good(a)" carries an adjective's syntactic marker, as data.adj does.
SYNSETS = [
    ("noun", ["car", "auto", "automobile", "motorcar"]),
    ("noun", ["car", "railcar", "railway_car"]),
    ("noun", ["goose"]),
    ("noun", ["goose", "fathead"]),
    ("verb", ["drive", "motor"]),
    ("adj", ["good(a)", "beneficial"]),
    ("adj", ["fast", "quick", "speedy"]),
    ("adv", ["quickly", "speedily"]),
]
SENTENCE = "The fast car drives quickly and a good goose watches it"


def write_wordnet(folder: Path) -> Path:
    """A WordNet folder in the wndb(5WN) format: index lines pointing at synset lines by byte offset."""
    folder.mkdir(parents=True, exist_ok=True)
    for pos in W.POS_NAMES:
        data = HEADER.encode()
        index: dict[str, list[int]] = {}
        for p, words in SYNSETS:
            if p != pos:
                continue
            offset = len(data)
            fields = " ".join(f"{w} 0" for w in words)
            data += f"{offset:08d} 00 {pos[0]} {len(words):02x} {fields} 000 | a gloss\n".encode()
            for w in words:
                index.setdefault(W._MARKER.sub("", w), []).append(offset)
        (folder / f"data.{pos}").write_bytes(data)
        lines = [
            f"{lemma} {pos[0]} {len(offs)} 0 {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs)
            for lemma, offs in sorted(index.items())
        ]
        (folder / f"index.{pos}").write_text(HEADER + "".join(line + "  \n" for line in lines), encoding="utf-8")
    (folder / "noun.exc").write_text("geese goose\n", encoding="utf-8")
    return folder


@pytest.fixture
def mini_wordnet(tmp_path, monkeypatch) -> Path:
    folder = write_wordnet(tmp_path / "wordnet")
    monkeypatch.setenv(W.WORDNET_ENV, str(folder))
    return folder


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- the WordNet reader ----------------------------------------------------------------------------------------


def test_the_reader_follows_index_offsets_into_data_lines(mini_wordnet):
    assert W.synonyms("car") == ("auto", "automobile", "motorcar", "railcar", "railway car")
    assert W.synonyms("Good") == ("beneficial",)  # lowercased, the (a) marker stripped from the data line
    assert W.synonyms("cars") == W.synonyms("car")  # a detachment rule finds the base form
    assert W.synonyms("geese") == ("fathead",)  # the exception list does for irregular plurals
    assert W.synonyms("fast") == ("quick", "speedy")
    assert W.synonyms("xyzzy") == ()


def test_a_missing_wordnet_names_the_package_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(W.WORDNET_ENV, str(tmp_path / "nowhere"))
    problem = W.wordnet_problem()
    assert problem is not None and "apt-get install wordnet-base" in problem and W.WORDNET_ENV in problem
    with pytest.raises(W.WordNetMissingError, match="wordnet-base"):
        W.synonyms("car")
    for name in ("synonym", "insert"):  # the coordinator's check passes; the site's names the op, folder, fix
        assert T.TEXT_OPS[name].check(0.1) is None
        problem = T.text_site_problem([("swap", 0.1), (name, 0.1)])
        assert problem is not None and "\n" not in problem
        for part in (f"augment: {name} needs WordNet", str(tmp_path / "nowhere"), "apt-get install wordnet-base"):
            assert part in problem
        assert f"drop {name} from augment" in problem
        with pytest.raises(ValueError, match=f"{name}.*apt-get install wordnet-base"):
            T.check_text_ops([(name, 0.1)])
    for name in ("swap", "delete", "dropout"):  # these need no WordNet
        assert T.TEXT_OPS[name].check(0.5) is None and T.text_site_problem([(name, 0.5)]) is None
        assert T.augment_text(SENTENCE, [(name, 0.5)], rng()) != SENTENCE


def test_a_malformed_wordnet_file_is_named(mini_wordnet):
    data = mini_wordnet / "data.noun"
    data.write_bytes(data.read_bytes().replace(b"00 n 04", b"00 n zz"))
    with pytest.raises(W.WordNetMissingError, match=r"data\.noun, the synset at byte \d+, is not in WordNet"):
        W.synonyms("car")
    (mini_wordnet / "index.verb").write_text("drive v x\n", encoding="utf-8")
    with pytest.raises(W.WordNetMissingError, match=r"index\.verb, line 1, is not in WordNet's database format"):
        W.synonyms("motor")


# -- the operations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(T.TEXT_OPS))
@pytest.mark.parametrize("text", [SENTENCE, "car", "good goose", "the"])
def test_no_operation_empties_a_text(mini_wordnet, name, text):
    for seed in range(20):
        for strength in (0.1, 0.5, 1.0):
            out = T.augment_text(text, [(name, strength)], rng(seed))
            assert out.strip(), (name, text, strength)


@pytest.mark.parametrize("name", ["swap", "delete", "insert", "synonym"])
def test_strength_zero_changes_nothing(mini_wordnet, name):
    words = SENTENCE.split()
    assert T.TEXT_OPS[name].apply(words, 0.0, rng()) == words
    spaced = "  The fast   car  "
    assert T.augment_text(spaced, [(name, 0.0)], rng()) == spaced  # not even the spacing


@pytest.mark.parametrize("name", sorted(T.TEXT_OPS))
def test_the_same_seed_gives_the_same_view_and_another_seed_another(mini_wordnet, name):
    first = [T.augment_text(SENTENCE, [(name, 0.4)], rng(7)) for _ in range(2)]
    assert first[0] == first[1]
    others = {T.augment_text(SENTENCE, [(name, 0.4)], rng(seed)) for seed in range(8, 16)}
    assert others - {first[0]}, f"{name} ignores its generator"


def test_each_eda_operation_changes_n_words(mini_wordnet):
    words = SENTENCE.split()  # 11 words; alpha 0.2 -> n = round(2.2) = 2
    n = max(1, round(0.2 * len(words)))
    for seed in range(10):
        assert len(T.random_deletion(words, 0.2, rng(seed))) == len(words) - n
        assert len(T.random_insertion(words, 0.2, rng(seed))) == len(words) + n
        swapped = T.random_swap(words, 0.2, rng(seed))
        assert sorted(swapped) == sorted(words)  # a permutation, at most 2 n positions moved
        assert sum(a != b for a, b in zip(swapped, words, strict=True)) <= 2 * n
        replaced = T.synonym_replacement(words, 0.2, rng(seed))
        assert len(replaced) == len(words) and sum(a != b for a, b in zip(replaced, words, strict=True)) == n
    assert len(T.random_deletion(["one"], 1.0, rng())) == 1  # never the last word
    assert len(T.random_deletion(words, 1.0, rng())) == 1


def test_synonym_replacement_uses_wordnet_synonyms(mini_wordnet):
    words = ["car"]
    for seed in range(10):
        (out,) = T.synonym_replacement(words, 1.0, rng(seed))
        assert out in W.synonyms("car")
    pair = T.synonym_replacement(["The", "car,"], 1.0, rng())
    assert pair[0] == "The" and pair[1].endswith(",") and pair[1][:-1] in W.synonyms("car")  # stop word kept
    assert T.synonym_replacement(["Fast"], 1.0, rng())[0] in ("Quick", "Speedy")  # the capital kept
    inserted = T.random_insertion(["good", "car"], 0.5, rng())
    assert len(inserted) == 3 and set(inserted) - {"good", "car"} <= set(W.synonyms("good") + W.synonyms("car"))


def test_token_dropout_drops_about_p_and_never_all():
    words = [f"w{i}" for i in range(2000)]
    kept = T.token_dropout(words, 0.3, rng())
    assert abs(len(kept) / len(words) - 0.7) < 0.05
    assert kept == [w for w in words if w in set(kept)]  # order kept
    assert len(T.token_dropout(words[:3], 1.0, rng())) == 1


def test_operations_see_the_text_alone_and_labels_stay(mini_wordnet):
    texts = [SENTENCE, "good car", "fast goose"]
    labels = np.array([2, 0, 1])
    views = T.text_views(texts, [("synonym", 0.3), ("swap", 0.2)], 4, rng())
    assert len(views) == len(texts) and all(len(v) == 4 for v in views)
    assert labels.tolist() == [2, 0, 1]  # views are per record: record i's label is labels[i] for all its views
    assert views[0] != [SENTENCE] * 4


def test_text_views_gives_k_views_of_each_text(mini_wordnet):
    texts = ["the fast car", "a good goose", "quickly"]
    views = T.text_views(texts, [("dropout", 0.3)], 3, rng(1))
    assert [len(v) for v in views] == [3, 3, 3]
    assert all(set(" ".join(v).split()) <= set(t.split()) for t, v in zip(texts, views, strict=True))
    assert T.text_views(texts, [], 2, rng()) == [[t, t] for t in texts]  # no operation: the texts themselves
    assert T.text_views(texts, [("dropout", 0.3)], 3, rng(1)) == views  # deterministic
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="augment-views"):
            T.text_views(texts, [], k, rng())  # type: ignore[arg-type]


# -- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [-0.1, 1.5, math.nan, math.inf, "0.2", None])
@pytest.mark.parametrize("name", sorted(T.TEXT_OPS))
def test_a_bad_strength_is_refused_naming_the_op_and_the_range(mini_wordnet, name, strength):
    problem = T.text_op_problem(name, strength)
    assert problem is not None and name in problem and "[0, 1]" in problem
    with pytest.raises(ValueError, match=rf"{name}.*\[0, 1\]"):
        T.augment_text(SENTENCE, [(name, strength)], rng())


def test_numpy_strengths_are_numbers(mini_wordnet):
    assert T.text_op_problem("swap", np.float32(0.5)) is None  # type: ignore[arg-type]
    assert T.augment_text(SENTENCE, [("swap", np.float64(0.5))], rng()) != SENTENCE
    assert T.text_op_problem("swap", True) is not None  # a bool is not a strength


def test_an_unknown_operation_is_refused_naming_it_and_the_known_ones():
    problem = T.text_op_problem("random-shuffle", 0.1)
    assert problem is not None and "random-shuffle" in problem and "swap" in problem
    with pytest.raises(ValueError, match="unknown text operation 'random-shuffle'"):
        T.augment_text(SENTENCE, [("swap", 0.1), ("random-shuffle", 0.1)], rng())


# -- the real WordNet (Debian's wordnet-base) ---------------------------------------------------------------------


@pytest.mark.skipif(
    W.wordnet_problem(Path(W.DEFAULT_WORDNET_DIR)) is not None,
    reason=f"WordNet is not in {W.DEFAULT_WORDNET_DIR} (apt-get install wordnet-base)",
)
def test_the_real_wordnet_gives_known_synonyms(monkeypatch):
    monkeypatch.delenv(W.WORDNET_ENV, raising=False)
    assert {"auto", "automobile", "motorcar"} <= set(W.synonyms("car"))
    assert {"beneficial", "estimable"} <= set(W.synonyms("good"))
    data = (Path(W.DEFAULT_WORDNET_DIR) / "data.noun").read_text(encoding="utf-8")
    for seed in range(5):
        (out,) = T.synonym_replacement(["car"], 1.0, rng(seed))
        assert out != "car" and f" {out.replace(' ', '_')} " in data  # a word the WordNet files hold
