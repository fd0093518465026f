"""Fashion-MNIST from its idx files (common/fashion_mnist.py) and the ``fashion-mnist`` preset: the idx parser on
small files written here (plain and gzipped), where the files are looked for (``$PRIVATUNE_FASHION_MNIST_DIR``, then
Debian's folder), the message when they are missing, and, where the Debian package is installed, the real splits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from privatune.common import fashion_mnist as FM
from privatune.common.config import DATASET_LABELS, MODEL_KINDS, PRESETS, RunConfig
from privatune.common.datasets import DATASET_NAMES, OFFICIAL_TEST_SPLITS, pixels_to_model_input
from privatune.common.models.modes import recommended_hyperparameters


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) as an idx-ubyte file: magic 0x0000 08 <ndim>, big-endian uint32 dims, the data."""
    assert array.dtype == np.uint8
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool | None = None) -> Path:
    """Write ``array`` at ``path``; gzipped when the name ends in .gz (or ``gz`` says so)."""
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if (path.suffix == ".gz" if gz is None else gz) else raw)
    return path


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_release(folder: Path, gz: bool = True, n: dict[str, int] | None = None) -> dict[str, tuple]:
    """The four files of a (tiny) release in ``folder``; returns what each split holds."""
    folder.mkdir(parents=True, exist_ok=True)
    n = n or {"train": 12, "test": 5}
    written = {}
    for i, (split, (images_stem, labels_stem)) in enumerate(FM.FILES.items()):
        images, labels = fake_split(n[split], seed=i)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{images_stem}{suffix}", images)
        write_idx(folder / f"{labels_stem}{suffix}", labels)
        written[split] = (images, labels)
    return written


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """Debian's folder replaced by an empty one, so only $PRIVATUNE_FASHION_MNIST_DIR can supply the files."""
    empty = tmp_path / "no-debian"
    empty.mkdir()
    monkeypatch.setattr(FM, "DEBIAN_FASHION_MNIST_DIR", empty)
    monkeypatch.delenv(FM.FASHION_MNIST_ENV, raising=False)
    return empty


# -- read_idx -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_images_are_3d_uint8_and_labels_1d(tmp_path, name):
    images, labels = fake_split(7, seed=3)
    got = FM.read_idx(write_idx(tmp_path / name, images))
    assert got.dtype == np.uint8 and got.shape == (7, 28, 28) and np.array_equal(got, images)
    got_labels = FM.read_idx(write_idx(tmp_path / f"labels{Path(name).suffix}", labels))
    assert got_labels.dtype == np.uint8 and got_labels.shape == (7,) and np.array_equal(got_labels, labels)


def test_read_idx_knows_gzip_by_its_content_not_its_name(tmp_path):
    images, _ = fake_split(2, seed=0)
    plain_named_gz = write_idx(tmp_path / "a.gz", images, gz=False)
    gz_named_plain = write_idx(tmp_path / "b", images, gz=True)
    assert np.array_equal(FM.read_idx(plain_named_gz), images)
    assert np.array_equal(FM.read_idx(gz_named_plain), images)


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    images, _ = fake_split(3, seed=0)
    good = idx_bytes(images)
    gz = gzip.compress(good)
    cases = {
        "bad-magic": (b"\x08\x03" + good[2:], "bad magic number"),
        "empty": (b"", "bad magic number"),
        "float-data": (good[:2] + b"\x0d" + good[3:], r"data type 0x0d, expected unsigned bytes"),
        "header-cut": (good[:9], "header cut short"),
        "truncated-data": (good[:-100], r"header says \(3, 28, 28\) \(2352 bytes of data\), file has 2252"),
        "extra-data": (good + b"\0", "file has 2353"),
        "truncated-gzip": (gz[: len(gz) // 2], "not a readable gzip file"),
        "gzip-bad-crc": (gz[:-8] + b"\0" * 8, "not a readable gzip file"),
        "gzip-corrupt-stream": (gz[:10] + bytes(b ^ 0xFF for b in gz[10:-8]) + gz[-8:], "not a readable gzip file"),
    }
    out = {}
    for name, (blob, message) in cases.items():
        path = tmp_path / f"{name}-idx3-ubyte"
        path.write_bytes(blob)
        out[name] = (path, message)
    return out


@pytest.mark.parametrize(
    "case",
    [
        "bad-magic",
        "empty",
        "float-data",
        "header-cut",
        "truncated-data",
        "extra-data",
        "truncated-gzip",
        "gzip-bad-crc",
        "gzip-corrupt-stream",
    ],
)
def test_read_idx_refuses_a_bad_file_naming_it(tmp_path, case):
    path, message = _bad_files(tmp_path)[case]
    with pytest.raises(FM.IdxFormatError, match=message) as err:
        FM.read_idx(path)
    assert str(err.value).startswith(f"{path}: ")
    assert isinstance(err.value, ValueError)  # callers that catch ValueError see it too


# -- where the files are found --------------------------------------------------------------------------------


def test_candidate_dirs_put_the_environment_first(tmp_path, monkeypatch):
    monkeypatch.delenv(FM.FASHION_MNIST_ENV, raising=False)
    assert FM.candidate_dirs() == [FM.DEBIAN_FASHION_MNIST_DIR]
    monkeypatch.setenv(FM.FASHION_MNIST_ENV, "  ")
    assert FM.candidate_dirs() == [FM.DEBIAN_FASHION_MNIST_DIR]
    monkeypatch.setenv(FM.FASHION_MNIST_ENV, str(tmp_path))
    assert FM.candidate_dirs() == [tmp_path, FM.DEBIAN_FASHION_MNIST_DIR]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(FM.FASHION_MNIST_ENV, "~/fm")
    assert FM.candidate_dirs()[0] == tmp_path / "home" / "fm"


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_load_split_reads_the_folder_named_by_the_environment(tmp_path, monkeypatch, no_debian, gz):
    folder = tmp_path / "fm"
    written = write_release(folder, gz=gz)
    monkeypatch.setenv(FM.FASHION_MNIST_ENV, str(folder))
    suffix = ".gz" if gz else ""
    for split, (images_stem, labels_stem) in FM.FILES.items():
        assert FM.locate(split) == (folder / f"{images_stem}{suffix}", folder / f"{labels_stem}{suffix}")
        images, labels = FM.load_split(split)
        assert images.dtype == np.uint8 and images.shape == (len(written[split][0]), 28, 28)
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
        assert np.array_equal(images, written[split][0]) and np.array_equal(labels, written[split][1])


def test_locate_prefers_the_gzipped_file_and_needs_both_of_a_split(tmp_path, monkeypatch, no_debian):
    folder = tmp_path / "fm"
    written = write_release(folder, gz=True)
    images_stem, labels_stem = FM.FILES["train"]
    write_idx(folder / images_stem, fake_split(3, seed=9)[0])  # a plain copy beside the .gz
    monkeypatch.setenv(FM.FASHION_MNIST_ENV, str(folder))
    assert FM.locate("train")[0] == folder / f"{images_stem}.gz"
    assert np.array_equal(FM.load_split("train")[0], written["train"][0])
    # A folder holding the images but not the labels is passed over for the next one.
    (folder / f"{labels_stem}.gz").unlink()
    fallback = no_debian
    write_release(fallback, gz=False)
    assert FM.locate("train") == (fallback / images_stem, fallback / labels_stem)
    assert FM.locate("test")[0].parent == folder  # the test split is still whole in the first folder


def test_missing_files_say_where_they_were_looked_for_and_how_to_get_them(tmp_path, monkeypatch, no_debian):
    folder = tmp_path / "empty-fm"
    folder.mkdir()
    monkeypatch.setenv(FM.FASHION_MNIST_ENV, str(folder))
    for split in FM.FILES:
        with pytest.raises(FileNotFoundError) as err:
            FM.load_split(split)
        message = str(err.value)
        assert str(folder) in message and str(no_debian) in message
        assert "apt-get install dataset-fashion-mnist" in message  # the Debian package
        assert f"{FM.FASHION_MNIST_ENV}=" in message  # the environment variable
        assert FM.DOWNLOAD_URL in message
        for stem in (s for pair in FM.FILES.values() for s in pair):
            assert f"{stem}.gz" in message


@pytest.mark.parametrize(
    ("what", "images", "labels", "message"),
    [
        ("not-28x28", np.zeros((4, 28, 27), np.uint8), np.zeros(4, np.uint8), r"images of shape \[4, 28, 27\]"),
        ("flat-images", np.zeros((4, 784), np.uint8), np.zeros(4, np.uint8), r"expected \[N, 28, 28\]"),
        ("count-mismatch", np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.uint8), "3 labels for 4 images"),
        ("label-10", np.zeros((2, 28, 28), np.uint8), np.array([3, 10], np.uint8), r"label 10 outside 0\.\.9"),
    ],
)
def test_load_split_refuses_files_that_are_not_fashion_mnist(
    tmp_path, monkeypatch, no_debian, what, images, labels, message
):
    folder = tmp_path / what
    folder.mkdir()
    images_stem, labels_stem = FM.FILES["test"]
    write_idx(folder / images_stem, images)
    write_idx(folder / labels_stem, labels)
    monkeypatch.setenv(FM.FASHION_MNIST_ENV, str(folder))
    with pytest.raises(FM.IdxFormatError, match=message) as err:
        FM.load_split("test")
    assert str(folder) in str(err.value)


def test_pixels_from_the_files_become_model_input(tmp_path, monkeypatch, no_debian):
    from privatune.common.datasets import _fashion_mnist
    from privatune.common.models import get_model_spec

    folder = tmp_path / "fm"
    written = write_release(folder)
    monkeypatch.setenv(FM.FASHION_MNIST_ENV, str(folder))
    data = _fashion_mnist("test")
    images, labels = written["test"]
    assert data.name == "fashion-mnist" and data.kind == "image" and data.label_names == FM.FASHION_MNIST_LABELS
    assert np.array_equal(data.labels, labels.astype(np.int64))
    assert np.allclose(data.inputs, pixels_to_model_input(images / 255.0), atol=1e-6)
    (x,) = get_model_spec("digits-cnn").encode(data.inputs)
    assert tuple(x.shape) == (len(images), 1, 28, 28)


# -- the preset ---------------------------------------------------------------------------------------------------


def test_the_preset_resolves_to_the_digits_cnn_on_fashion_mnist():
    cfg = RunConfig.create(preset="fashion-mnist")
    preset = PRESETS["fashion-mnist"]
    assert cfg.model == "digits-cnn" and MODEL_KINDS[cfg.model] == "image"
    assert cfg.dataset == "fashion-mnist" and cfg.dataset in DATASET_NAMES and cfg.dataset in OFFICIAL_TEST_SPLITS
    assert (cfg.mode, cfg.lr, cfg.batch_size, cfg.local_epochs, cfg.num_server_rounds) == (
        preset.mode,
        preset.lr,
        preset.batch_size,
        preset.local_epochs,
        preset.num_server_rounds,
    )
    assert cfg.label_names == DATASET_LABELS["fashion-mnist"] == FM.FASHION_MNIST_LABELS
    assert len(cfg.label_names) == 10 and len(set(cfg.label_names)) == 10
    assert all("," not in name and name == name.strip() for name in cfg.label_names)  # fit the `labels` key
    # Another mode takes that mode's recommended values for an image model, as for any preset.
    head = RunConfig.create(preset="fashion-mnist", mode="head")
    rec = recommended_hyperparameters("head", "image")
    assert head.model == "digits-cnn" and (head.lr, head.batch_size, head.local_epochs) == (
        rec.lr,
        rec.batch_size,
        rec.local_epochs,
    )


def test_the_preset_model_takes_fashion_mnist_labels():
    from privatune.common.models import get_model_spec

    cfg = RunConfig.create(preset="fashion-mnist")
    spec = get_model_spec(cfg.model)
    assert spec.kind == "image"
    model = spec.build(len(cfg.label_names), cfg.seed)
    assert model.head.out_features == 10


# -- the real files (Debian's dataset-fashion-mnist) ------------------------------------------------------------


def _debian_has_the_files() -> bool:
    return all(
        any((FM.DEBIAN_FASHION_MNIST_DIR / f"{stem}{s}").is_file() for s in (".gz", ""))
        for pair in FM.FILES.values()
        for stem in pair
    )


@pytest.mark.skipif(
    not _debian_has_the_files(),
    reason=f"the Fashion-MNIST files are not in {FM.DEBIAN_FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_the_real_splits(monkeypatch, split, count):
    monkeypatch.delenv(FM.FASHION_MNIST_ENV, raising=False)
    images_path, _ = FM.locate(split)
    assert images_path.parent == FM.DEBIAN_FASHION_MNIST_DIR
    assert images_path.name.startswith(FM.FILES[split][0])  # test = the t10k files
    images, labels = FM.load_split(split)
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and set(np.unique(labels).tolist()) == set(range(10))
    assert np.bincount(labels).tolist() == [count // 10] * 10  # the release is balanced
    assert images.max() > 200 and images.min() == 0  # light clothes on a black background, like MNIST
