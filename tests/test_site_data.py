"""A site's own files: every format loads like the presets, and every bad file fails naming file and record."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from privatune.client.site_data import SiteDataError, SiteDataSpec, describe_site_data, load_site_data
from privatune.common.datasets import MAX_TEXT_CHARS, MNIST_MEAN, MNIST_STD, load_dataset

SMS = ("ham", "spam")
DIGITS = tuple(str(i) for i in range(10))


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _load_text(path: Path, fmt: str = "csv", **kw: str):
    return load_site_data(SiteDataSpec(path, fmt, **kw), SMS, "text")  # type: ignore[arg-type]


def _load_images(path: Path, fmt: str = "npz"):
    return load_site_data(SiteDataSpec(path, fmt), DIGITS, "image")  # type: ignore[arg-type]


def _error(fn, *args, **kw) -> SiteDataError:
    with pytest.raises(SiteDataError) as info:
        fn(*args, **kw)
    return info.value


# ------------------------------------------------------------------------------------------ csv/jsonl


def test_csv_with_names_and_indices(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "site.csv",
        'id,text,label\n1,"Hello, are we meeting?",ham\n2,WIN a prize now,1\n\n3,"multi\nline text",spam\n',
    )
    data = _load_text(path)
    assert data.kind == "text" and data.name == "site"
    assert data.inputs == ["Hello, are we meeting?", "WIN a prize now", "multi\nline text"]
    assert data.labels.tolist() == [0, 1, 1]
    assert data.label_names == SMS


def test_csv_custom_columns_bom_and_truncation(tmp_path: Path) -> None:
    long_text = "x" * (MAX_TEXT_CHARS + 500)
    path = tmp_path / "site.csv"
    path.write_bytes((f"\ufeffmessage,kind\n{long_text},ham\n").encode())
    data = _load_text(path, text_column="message", label_column="kind")
    assert len(data.inputs[0]) == MAX_TEXT_CHARS


@pytest.mark.parametrize("sep", [";", "\t"])
def test_csv_semicolon_and_tab_separated(tmp_path: Path, sep: str) -> None:
    path = _write(tmp_path / "site.csv", f"text{sep}label\nhello, friend{sep}ham\n")
    data = _load_text(path)
    assert data.inputs == ["hello, friend"] and data.labels.tolist() == [0]


def test_jsonl(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "hi there", "label": "ham"}), "", json.dumps({"text": "free money", "label": 1})]
    data = _load_text(_write(tmp_path / "site.jsonl", "\n".join(lines) + "\n"), "jsonl")
    assert data.inputs == ["hi there", "free money"]
    assert data.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("content", "record", "line", "reason"),
    [
        ("text,label\nok,ham\nbad,hamm\n", 2, 3, r"unknown label 'hamm'.*allowed labels: ham, spam"),
        ("text,label\nok,ham\nbad,7\n", 2, 3, "unknown label '7'"),
        ("text,label\nok,ham\n   ,spam\n", 2, 3, "column 'text' is empty"),
        ("text,label\nok,ham\nonly one field\n", 2, 3, "1 field"),
        ('text,label\n"a\nb",ham\nc,nope\n', 2, 4, "unknown label 'nope'"),
    ],
)
def test_csv_bad_record_is_named(tmp_path: Path, content: str, record: int, line: int, reason: str) -> None:
    path = _write(tmp_path / "bad.csv", content)
    err = _error(_load_text, path)
    assert err.path == path
    assert err.record == record and err.line == line
    assert str(path) in str(err) and f"record {record}" in str(err)
    assert err.reason and err.fix
    assert re.search(reason, str(err))


def test_csv_missing_column_lists_the_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "cols.csv", "message,label\nhi,ham\n")
    err = _error(_load_text, path)
    assert err.record is None and err.line == 1
    assert "missing column 'text'" in str(err) and "'message', 'label'" in str(err)
    assert "text-column" in str(err) and "text_column" not in str(err)


def test_undecodable_csv_names_the_record_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nfine,ham\n\nstill fine,spam\ncaf\u00e9 tonight,ham\n".encode("latin-1"))
    err = _error(_load_text, path)
    assert (err.record, err.line) == (3, 5)
    assert "byte 0xe9 is not valid UTF-8" in str(err) and "UTF-8" in err.fix
    assert f"{path}, record 3 (line 5)" in str(err)


def test_undecodable_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "ham"}\n{"text": "caf\xe9", "label": "ham"}\n')
    err = _error(_load_text, path, "jsonl")
    assert err.record == 2 and "not valid UTF-8" in str(err) and str(path) in str(err)


@pytest.mark.parametrize(
    ("content", "record", "reason"),
    [
        ('{"text": "ok", "label": "ham"}\n{"text": "x", "label": "spa"}\n', 2, "unknown label 'spa'"),
        ('{"text": "ok", "label": "ham"}\n{"text": "x", "label": 1.0}\n', 2, "unknown label 1.0"),
        ('{"text": "ok", "label": "ham"}\n{"text": "x", "label": true}\n', 2, "unknown label True"),
        ('{"text": "ok", "label": "ham"}\n{"txt": "x", "label": "ham"}\n', 2, "missing key 'text'"),
        ('{"text": "ok", "label": "ham"}\n\n{"text": "x", "label": "ham"\n', 3, "not valid JSON"),
        ('["ok", "ham"]\n', 1, "expected a JSON object"),
        ('{"text": 5, "label": "ham"}\n', 1, "holds int, not text"),
    ],
)
def test_jsonl_bad_record_is_named(tmp_path: Path, content: str, record: int, reason: str) -> None:
    path = _write(tmp_path / "bad.jsonl", content)
    err = _error(_load_text, path, "jsonl")
    assert err.path == path and err.record == record
    assert reason in str(err) and str(path) in str(err)


@pytest.mark.parametrize(
    ("fmt", "content", "reason"),
    [
        ("csv", "", "the file is empty"),
        ("csv", " \n\n", "only whitespace"),
        ("csv", "text,label\n", "no records"),
        ("jsonl", "\n\n", "no records"),
    ],
)
def test_empty_files(tmp_path: Path, fmt: str, content: str, reason: str) -> None:
    path = _write(tmp_path / f"empty.{fmt}", content)
    err = _error(_load_text, path, fmt)
    assert reason in str(err) and str(path) in str(err) and err.record is None


def test_error_survives_pickling(tmp_path: Path) -> None:
    import pickle

    err = SiteDataError(tmp_path / "x.csv", "unknown label 'q'", "Use ham or spam.", record=4, line=6)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.record, back.line, back.reason, str(back)) == (err.path, 4, 6, err.reason, str(err))


def test_missing_file_and_wrong_format(tmp_path: Path) -> None:
    err = _error(_load_text, tmp_path / "nope.csv")
    assert "file not found" in str(err) and "nope.csv" in str(err)
    err = _error(_load_images, tmp_path / "nope.npz")
    assert "file not found" in str(err)
    err = _error(_load_images, tmp_path / "nowhere", "image-folder")
    assert "folder not found" in str(err)
    path = _write(tmp_path / "a.csv", "text,label\nhi,ham\n")
    err = _error(load_site_data, SiteDataSpec(path, "csv"), DIGITS, "image")
    assert "does not hold image data" in str(err) and "npz, image-folder" in str(err)
    err = _error(load_site_data, SiteDataSpec(path, "xlsx"), SMS, "text")  # type: ignore[arg-type]
    assert "unknown format 'xlsx'" in str(err)


# ----------------------------------------------------------------------------------------------- npz


def test_npz_raw_digits_match_the_preset_exactly(tmp_path: Path) -> None:
    bunch = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, x=bunch.images[:40], y=bunch.target[:40])
    site = _load_images(path)
    preset = load_dataset("digits").subset(np.arange(40))
    assert site.inputs.shape == (40, 1, 28, 28) and site.inputs.dtype == np.float32
    assert np.array_equal(site.labels, preset.labels)
    assert np.abs(site.inputs - preset.inputs).max() < 1e-5


@pytest.mark.parametrize("layout", ["uint8", "float01", "float255", "channel", "names"])
def test_npz_28x28_layouts_normalise_like_the_preset(tmp_path: Path, layout: str) -> None:
    preset = load_dataset("digits").subset(np.arange(12))
    pixels01 = preset.inputs[:, 0] * MNIST_STD + MNIST_MEAN  # back to [0, 1]
    x: np.ndarray = {
        "uint8": np.round(pixels01 * 255).astype(np.uint8),
        "float01": pixels01.astype(np.float32),
        "float255": (pixels01 * 255).astype(np.float64),
        "channel": pixels01[:, None].astype(np.float32),
        "names": pixels01.astype(np.float32),
    }[layout]
    y = np.array([str(v) for v in preset.labels]) if layout == "names" else preset.labels
    np.savez(tmp_path / "x.npz", x=x, y=y)
    site = _load_images(tmp_path / "x.npz")
    tolerance = 0.5 / 255 / MNIST_STD + 1e-6 if layout == "uint8" else 1e-5
    assert np.abs(site.inputs - preset.inputs).max() <= tolerance
    assert np.array_equal(site.labels, preset.labels)


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def test_npz_errors_name_the_first_bad_record(tmp_path: Path) -> None:
    good = np.zeros((5, 28, 28), dtype=np.float32)
    labels = np.arange(5)

    x = good.copy()
    x[3, 1, 1] = np.nan
    x[4, 1, 1] = np.inf
    err = _error(_load_images, _npz(tmp_path, x=x, y=labels))
    assert err.record == 4 and "NaN or infinite" in str(err) and "bad.npz, record 4" in str(err)

    err = _error(_load_images, _npz(tmp_path, x=good, y=np.array([0, 1, 12, 3, 99])))
    assert err.record == 3 and "unknown label 12" in str(err) and "0..9" in str(err)

    err = _error(_load_images, _npz(tmp_path, x=np.zeros((5, 32, 32)), y=labels))
    assert "shape [32, 32]" in str(err) and "28x28" in str(err)

    err = _error(_load_images, _npz(tmp_path, x=np.zeros((5, 3, 28, 28)), y=labels))
    assert "shape [3, 28, 28]" in str(err)

    x = good.copy()
    x[2] -= 0.4242
    err = _error(_load_images, _npz(tmp_path, x=x, y=labels))
    assert err.record == 3 and "negative pixel" in str(err) and "not normalised" in str(err)

    x = good.copy()
    x[1, 0, 0] = 300
    err = _error(_load_images, _npz(tmp_path, x=x, y=labels))
    assert err.record == 2 and "above 255" in str(err)

    err = _error(_load_images, _npz(tmp_path, x=np.full((2, 8, 8), 20.0), y=np.arange(2)))
    assert err.record == 1 and "0..16" in str(err)


def test_npz_file_level_errors(tmp_path: Path) -> None:
    err = _error(_load_images, _npz(tmp_path, images=np.zeros((2, 28, 28)), y=np.arange(2)))
    assert "missing array 'x'" in str(err) and "'images'" in str(err) and err.record is None
    err = _error(_load_images, _npz(tmp_path, x=np.zeros((3, 28, 28)), y=np.arange(2)))
    assert "3 images" in str(err)
    err = _error(_load_images, _npz(tmp_path, x=np.zeros((0, 28, 28)), y=np.zeros(0, dtype=np.int64)))
    assert "no images" in str(err)
    err = _error(_load_images, _npz(tmp_path, x=np.zeros((2, 28, 28)), y=np.array([0.0, 1.0])))
    assert "dtype float64" in str(err)
    path = _write(tmp_path / "junk.npz", "this is not a zip archive")
    err = _error(_load_images, path)
    assert "not a readable .npz" in str(err) and "junk.npz" in str(err)


# --------------------------------------------------------------------------------------- image folder


def _save_png(path: Path, pixels01: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(pixels01 * 255).astype(np.uint8), mode="L").save(path)


def test_image_folder_png_and_npy(tmp_path: Path) -> None:
    preset = load_dataset("digits")
    root = tmp_path / "images"
    pixels01 = preset.inputs[:, 0] * MNIST_STD + MNIST_MEAN
    zero, one = int(np.flatnonzero(preset.labels == 0)[0]), int(np.flatnonzero(preset.labels == 1)[0])
    _save_png(root / "0" / "a.png", pixels01[zero])
    (root / "1").mkdir()
    np.save(root / "1" / "b.npy", pixels01[one].astype(np.float32))
    np.save(root / "1" / "c.npy", load_digits().images[one])  # raw 8x8 digit
    (root / "README.txt").write_text("scanned at site A")
    (root / "0" / ".DS_Store").write_bytes(b"\0")
    data = _load_images(root, "image-folder")
    assert data.labels.tolist() == [0, 1, 1]
    assert np.abs(data.inputs[0] - preset.inputs[zero]).max() <= 0.5 / 255 / MNIST_STD + 1e-6
    assert np.abs(data.inputs[1] - preset.inputs[one]).max() < 1e-5
    assert np.abs(data.inputs[2] - preset.inputs[one]).max() < 1e-5


def test_image_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _save_png(root / "3" / "a.png", np.zeros((28, 28)))
    _save_png(root / "3" / "b.png", np.zeros((30, 28)))
    err = _error(_load_images, root, "image-folder")
    assert err.path == root / "3" / "b.png" and err.record == 2 and "shape [30, 28]" in str(err)

    (root / "3" / "b.png").unlink()
    _save_png(root / "cat" / "c.png", np.zeros((28, 28)))
    err = _error(_load_images, root, "image-folder")
    assert "folder name 'cat' is not a label" in str(err) and "0, 1, 2" in str(err)

    (root / "cat" / "c.png").unlink()
    (root / "cat").rmdir()
    (root / "3" / "notes.txt").write_text("hi")
    err = _error(_load_images, root, "image-folder")
    assert "notes.txt" in str(err) and "not an image file" in str(err)

    (root / "3" / "notes.txt").unlink()
    (root / "3" / "broken.png").write_bytes(b"not a png")
    err = _error(_load_images, root, "image-folder")
    assert err.path.name == "broken.png" and err.record == 2 and "cannot read the image" in str(err)

    (root / "3" / "broken.png").unlink()
    bad = np.zeros((28, 28))
    bad[5, 5] = np.nan
    np.save(root / "3" / "nan.npy", bad)
    err = _error(_load_images, root, "image-folder")
    assert err.path.name == "nan.npy" and err.record == 2 and "NaN" in str(err)

    _save_png(root / "loose.png", np.zeros((28, 28)))
    err = _error(_load_images, root, "image-folder")
    assert "outside a label folder" in str(err)


def test_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "images" / "4").mkdir(parents=True)
    err = _error(_load_images, tmp_path / "images", "image-folder")
    assert "no images found" in str(err)


# -------------------------------------------------------------------------------------------- describe


def test_describe_text(tmp_path: Path) -> None:
    path = _write(tmp_path / "site.csv", "text,label\nhello,ham\nhi there,ham\nwin,ham\n")
    summary = describe_site_data(_load_text(path))
    assert summary["records"] == 3
    assert summary["labels"] == {"ham": 3, "spam": 0}
    assert summary["missing_labels"] == ["spam"]
    assert summary["text_chars"] == {"min": 3, "median": 5.0, "max": 8}
    assert any("no records for label(s): spam" in w for w in summary["warnings"])
    assert any("fewer than 5" in w for w in summary["warnings"])
    json.dumps(summary)  # ready for `privatune site check --json`


def test_describe_images_warns_about_light_backgrounds(tmp_path: Path) -> None:
    bunch = load_digits()
    np.savez(tmp_path / "ok.npz", x=bunch.images[:50], y=bunch.target[:50])
    summary = describe_site_data(_load_images(tmp_path / "ok.npz"))
    assert summary["records"] == 50 and sum(summary["labels"].values()) == 50
    assert summary["background_mean"] < 0.3
    assert not any("invert" in w for w in summary["warnings"])
    np.savez(tmp_path / "inverted.npz", x=16 - bunch.images[:50], y=bunch.target[:50])
    summary = describe_site_data(_load_images(tmp_path / "inverted.npz"))
    assert any("invert" in w for w in summary["warnings"])
    light = np.full((3, 28, 28), 250, dtype=np.uint8)
    light[:, 10:18, 12:16] = 0  # a dark stroke on white paper
    np.savez(tmp_path / "paper.npz", x=light, y=np.arange(3))
    assert any("invert" in w for w in describe_site_data(_load_images(tmp_path / "paper.npz"))["warnings"])
