"""The feature cache outside the run folder (common/cache.py, common/features.py): where it lives (``cache-dir``,
``$XDG_CACHE_HOME``), its private folders and atomic files, what an entry is keyed on, and ``cached_features`` end
to end on the digits CNN: a hit reads the file, a changed backbone or input misses, a bad file is recomputed."""

from __future__ import annotations

import copy
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from privatune.common import cache as C
from privatune.common import features as F
from privatune.common.config import ConfigError, RunConfig
from privatune.common.datasets import LabelledData
from privatune.common.models import compute_features, get_model_spec


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def loose_umask():
    """umask 0: a folder or file privatune makes must be private whatever the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def cache_log(caplog, monkeypatch):
    """caplog for privatune.cache, even if a ClientApp import turned off propagation of the privatune logger."""
    monkeypatch.setattr(logging.getLogger("privatune"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="privatune.cache"):
        yield caplog


# -- where -----------------------------------------------------------------------------------------------------


def test_default_cache_dir_follows_an_absolute_xdg_cache_home_only(tmp_path):
    home = str(tmp_path / "home")
    xdg = str(tmp_path / "xdg")
    assert C.default_cache_dir({"XDG_CACHE_HOME": xdg, "HOME": home}) == Path(xdg) / "privatune"
    # The XDG rule: a relative XDG_CACHE_HOME is ignored, as is an unset or blank one.
    fallback = Path(home) / ".cache" / "privatune"
    assert C.default_cache_dir({"XDG_CACHE_HOME": "rel/cache", "HOME": home}) == fallback
    assert C.default_cache_dir({"HOME": home}) == fallback
    assert C.default_cache_dir({"XDG_CACHE_HOME": "  ", "HOME": home}) == fallback
    assert C.default_cache_dir({}) == Path.home() / ".cache" / "privatune"
    # No argument: the process environment, which tests/conftest.py points at a session folder.
    assert C.default_cache_dir() == Path(os.environ["XDG_CACHE_HOME"]) / "privatune"
    assert not str(C.default_cache_dir()).startswith(str(Path.home() / ".cache"))


def test_resolve_cache_dir_default_off_and_relative(tmp_path, monkeypatch):
    assert C.resolve_cache_dir("") == C.resolve_cache_dir(None) == C.resolve_cache_dir("  ") == C.default_cache_dir()
    for off in ("off", "none", "OFF", " None "):
        assert C.resolve_cache_dir(off) is None, off
    monkeypatch.chdir(tmp_path)
    rel = C.resolve_cache_dir("sub/cache")
    assert rel is not None and rel.is_absolute() and rel == tmp_path / "sub" / "cache"
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert C.resolve_cache_dir("~/c") == tmp_path / "h" / "c"
    assert C.resolve_cache_dir(tmp_path / "abs") == tmp_path / "abs"
    assert not (tmp_path / "sub").exists()  # resolving makes no folder


def test_run_config_cache_dir_accepts_default_off_and_absolute_but_refuses_relative(tmp_path):
    assert C.resolve_cache_dir(RunConfig.create(preset="digits", cache_dir="off").cache_dir) is None
    assert C.resolve_cache_dir(RunConfig.create(preset="digits").cache_dir) == C.default_cache_dir()
    cfg = RunConfig.create(preset="digits", cache_dir=str(tmp_path / "c"))
    assert C.resolve_cache_dir(cfg.cache_dir) == tmp_path / "c"
    with pytest.raises(ConfigError, match=r"cache-dir.*relative path"):
        RunConfig.create(preset="digits", cache_dir="relative/cache")


# -- private folders, atomic files ---------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], ids=["umask-000", "umask-022", "umask-277"])
def test_private_dir_makes_every_missing_folder_exactly_0700(tmp_path, umask):
    target = tmp_path / "a" / "b" / "c"
    old = os.umask(umask)  # loose: no more than 0700; strict (277): still 0700, so the folder can hold the next
    try:
        assert C.private_dir(target) == target
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert folder.is_dir() and mode_of(folder) == 0o700, (folder, oct(mode_of(folder)))
    assert C.private_dir(target) == target  # again: a no-op


def test_private_dir_leaves_an_open_folder_as_it_was_and_warns_once(tmp_path, cache_log):
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    C.private_dir(open_dir)
    C.private_dir(open_dir)
    assert mode_of(open_dir) == 0o755  # not chmodded: privatune did not make it
    warnings = [r.getMessage() for r in cache_log.records if "open to group or others" in r.getMessage()]
    assert len(warnings) == 1 and str(open_dir) in warnings[0]


def test_private_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        C.private_dir(tmp_path / "f")


def test_atomic_write_makes_a_0600_file_and_leaves_no_temporary(tmp_path, loose_umask):
    path = tmp_path / "entry.bin"
    C.atomic_write(path, lambda fh: fh.write(b"first"))
    assert path.read_bytes() == b"first" and mode_of(path) == 0o600
    # Replacing a file that was readable by others: the new one is 0600 too.
    os.chmod(path, 0o644)
    C.atomic_write(path, lambda fh: fh.write(b"second"))
    assert path.read_bytes() == b"second" and mode_of(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "entry.bin"
    C.atomic_write(path, lambda fh: fh.write(b"old content"))

    def half_then_fail(fh):
        fh.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        C.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]  # no .tmp left behind

    def interrupted(fh):
        fh.write(b"partial")
        raise KeyboardInterrupt  # BaseException too: Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        C.atomic_write(tmp_path / "new.bin", interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]


# -- keys and fingerprints --------------------------------------------------------------------------------------


def test_cache_key_is_stable_and_changes_with_every_part(monkeypatch):
    parts = {"model": "digits-cnn", "weights": "ab12", "inputs": "cd34", "records": 8, "max_length": None}
    key = C.cache_key("features", parts)
    assert len(key) == 40 and all(ch in "0123456789abcdef" for ch in key)
    assert C.cache_key("features", dict(reversed(list(parts.items())))) == key  # order of the parts does not matter
    assert C.cache_key("features", dict(parts)) == key
    changed = {
        "model": "minilm",
        "weights": "ab13",
        "inputs": "cd35",
        "records": 9,
        "max_length": 64,
    }
    keys = {key}
    for name, value in changed.items():
        other = C.cache_key("features", {**parts, name: value})
        assert other not in keys, name
        keys.add(other)
    assert C.cache_key("tokens", parts) != key
    assert C.cache_key("features", {**parts, "extra": 1}) != key
    monkeypatch.setattr(C, "CACHE_VERSION", C.CACHE_VERSION + 1)
    assert C.cache_key("features", parts) != key  # a new format never reads old files


def test_inputs_fingerprint_depends_on_the_inputs_in_order():
    texts = ["free prize, call now", "see you at 6", "ok"]
    fp = C.inputs_fingerprint(texts)
    assert C.inputs_fingerprint(list(texts)) == fp and len(fp) == 64
    assert C.inputs_fingerprint(texts[::-1]) != fp
    assert C.inputs_fingerprint([*texts[:2], "ok!"]) != fp
    assert C.inputs_fingerprint(texts[:2]) != fp
    assert C.inputs_fingerprint(["ab", "c"]) != C.inputs_fingerprint(["a", "bc"])  # record boundaries count

    images = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    fp_img = C.inputs_fingerprint(images)
    assert C.inputs_fingerprint(images.copy()) == fp_img
    assert C.inputs_fingerprint(np.asfortranarray(images)) == fp_img  # the values, not the memory layout
    changed = images.copy()
    changed[2, 0, 13, 7] += 1e-3
    assert C.inputs_fingerprint(changed) != fp_img
    assert C.inputs_fingerprint(images[::-1]) != fp_img
    assert C.inputs_fingerprint(images.astype(np.float64)) != fp_img
    assert C.inputs_fingerprint(images.reshape(2, 2, 28, 28)) != fp_img  # same bytes, another shape
    assert C.inputs_fingerprint(images) != fp


def test_weights_fingerprint_changes_with_one_weight_a_buffer_or_the_structure():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    fp = C.weights_fingerprint(module)
    twin = copy.deepcopy(module)
    assert C.weights_fingerprint(twin) == fp and len(fp) == 64
    for p in twin.parameters():
        p.requires_grad_(False)  # frozen or not, the same weights
    assert C.weights_fingerprint(twin) == fp
    with torch.no_grad():
        twin[3].weight[1, 2] += 1e-4
    assert C.weights_fingerprint(twin) != fp
    buffered = copy.deepcopy(module)
    buffered[1].running_mean[0] = 0.5  # a buffer, not a parameter
    assert C.weights_fingerprint(buffered) != fp
    restructured = copy.deepcopy(module)
    restructured[2] = nn.Tanh()  # same state dict, another forward pass
    assert C.weights_fingerprint(restructured) != fp
    assert C.weights_fingerprint(copy.deepcopy(module).double()) != fp  # dtype counts


class _SlowTokenizer:
    """A stand-in for a tokenizer without a fast backend: its vocabulary and settings are what counts."""

    def __init__(self, vocab: dict[str, int], **init_kwargs):
        self._vocab = vocab
        self.init_kwargs = init_kwargs

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


def test_tokenizer_fingerprint_depends_on_vocabulary_and_settings_not_the_path():
    vocab = {"[PAD]": 0, "hello": 1, "world": 2}
    fp = C.tokenizer_fingerprint(_SlowTokenizer(vocab, do_lower_case=True, name_or_path="/a"))
    assert C.tokenizer_fingerprint(_SlowTokenizer(dict(vocab), do_lower_case=True, name_or_path="/b")) == fp
    assert C.tokenizer_fingerprint(_SlowTokenizer({**vocab, "new": 3}, do_lower_case=True)) != fp
    assert C.tokenizer_fingerprint(_SlowTokenizer(vocab, do_lower_case=False)) != fp


# -- cached_features end to end (digits CNN, a few random images) ----------------------------------------------


@pytest.fixture(autouse=True)
def fresh_memory():
    F.clear_memory_cache()
    yield
    F.clear_memory_cache()


@pytest.fixture(scope="module")
def cnn():
    return get_model_spec("digits-cnn").build(10, 0)


def images(n: int = 6, seed: int = 0) -> LabelledData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return LabelledData("digits", "image", x, y, tuple(str(i) for i in range(10)))


class Counting:
    """compute_features, counting its calls (or refusing them: a hit must not run the backbone)."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls = 0
        self.refuse = refuse

    def __call__(self, model, encoded, *args, **kwargs):
        self.calls += 1
        if self.refuse:
            raise AssertionError("the backbone ran: the cache should have answered")
        return compute_features(model, encoded, *args, **kwargs)


@pytest.fixture
def counter(monkeypatch):
    c = Counting()
    monkeypatch.setattr(F, "compute_features", c)
    return c


def entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob(f"{F.FEATURES_PREFIX}*{F.FEATURES_SUFFIX}"))


def test_a_second_call_reads_the_file_instead_of_running_the_backbone(cnn, tmp_path, counter, loose_umask):
    cache_dir = tmp_path / "cache" / "privatune"  # does not exist yet
    data = images()
    first = F.cached_features(cnn, "digits-cnn", data, None, cache_dir)
    expected = compute_features(cnn, F.encode("digits-cnn", data, None))
    assert counter.calls == 1 and first.shape == (len(data), cnn.feature_dim) and first.dtype == torch.float32
    assert torch.equal(first, expected)
    (entry,) = entries(cache_dir)
    assert entry.name == f"features-{F.features_key(cnn, 'digits-cnn', data, None)}.npz"
    assert files_under(tmp_path) == [entry]  # no temporary left
    assert mode_of(entry) == 0o600 and mode_of(cache_dir) == 0o700 and mode_of(cache_dir.parent) == 0o700

    counter.refuse = True
    F.clear_memory_cache()  # what a fresh process (a deployed ClientApp) sees
    again = F.cached_features(cnn, "digits-cnn", data, None, cache_dir)
    assert torch.equal(again, first) and again is not first
    # Images ignore max_length, and the labels are not part of the key: both read the same entry.
    F.clear_memory_cache()
    relabelled = LabelledData(data.name, "image", data.inputs, (data.labels + 1) % 10, data.label_names)
    assert torch.equal(F.cached_features(cnn, "digits-cnn", relabelled, 128, cache_dir), first)
    assert counter.calls == 1 and len(entries(cache_dir)) == 1  # the backbone ran once, for the first call


def test_the_memory_cache_answers_without_the_disk(cnn, counter):
    data = images()
    first = F.cached_features(cnn, "digits-cnn", data, None, None)
    counter.refuse = True
    assert F.cached_features(cnn, "digits-cnn", data, None, None) is first
    assert counter.calls == 1


def test_another_backbone_weight_or_input_misses_but_a_new_head_does_not(cnn, tmp_path, counter):
    data = images()
    base = F.cached_features(cnn, "digits-cnn", data, None, tmp_path)
    assert counter.calls == 1

    other_head = copy.deepcopy(cnn)
    with torch.no_grad():
        other_head.head.weight.add_(1.0)  # head mode trains the head: its features stay valid
    F.clear_memory_cache()
    assert torch.equal(F.cached_features(other_head, "digits-cnn", data, None, tmp_path), base)
    assert counter.calls == 1

    changed = copy.deepcopy(cnn)
    with torch.no_grad():
        changed.backbone.fc_layers[0].bias.add_(1.0)
    F.clear_memory_cache()
    moved = F.cached_features(changed, "digits-cnn", data, None, tmp_path)
    assert counter.calls == 2 and not torch.equal(moved, base)
    assert torch.equal(moved, compute_features(changed, F.encode("digits-cnn", data, None)))

    pixel = images()
    pixel.inputs[3, 0, 10, 10] += 0.5
    F.clear_memory_cache()
    F.cached_features(cnn, "digits-cnn", pixel, None, tmp_path)
    assert counter.calls == 3
    fewer = data.subset(range(len(data) - 1))
    F.cached_features(cnn, "digits-cnn", fewer, None, tmp_path)
    assert counter.calls == 4
    assert len(entries(tmp_path)) == 4  # one entry each: base, changed backbone, changed pixel, fewer records


def _warnings(log) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == "privatune.cache" and r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b"not a zip file at all"), id="garbage"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), id="truncated"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
    ],
)
def test_a_corrupt_entry_is_logged_recomputed_and_rewritten(cnn, tmp_path, counter, cache_log, damage):
    data = images()
    first = F.cached_features(cnn, "digits-cnn", data, None, tmp_path)
    (entry,) = entries(tmp_path)
    damage(entry)
    F.clear_memory_cache()
    again = F.cached_features(cnn, "digits-cnn", data, None, tmp_path)
    assert counter.calls == 2 and torch.equal(again, first)
    (warning,) = _warnings(cache_log)
    assert str(entry) in warning and "unreadable" in warning and "computing the features again" in warning
    # The rewritten entry is whole again: the next fresh read needs no backbone.
    counter.refuse = True
    F.clear_memory_cache()
    assert torch.equal(F.cached_features(cnn, "digits-cnn", data, None, tmp_path), first)


def test_an_entry_for_other_inputs_or_with_bad_values_is_not_used(cnn, tmp_path, counter, cache_log):
    a, b = images(seed=1), images(seed=2)
    feats_a = F.cached_features(cnn, "digits-cnn", a, None, tmp_path)
    feats_b = F.cached_features(cnn, "digits-cnn", b, None, tmp_path)
    path_a = F.features_path(tmp_path, F.features_key(cnn, "digits-cnn", a, None))
    path_b = F.features_path(tmp_path, F.features_key(cnn, "digits-cnn", b, None))
    path_b.write_bytes(path_a.read_bytes())  # a's entry copied over b's name
    F.clear_memory_cache()
    assert torch.equal(F.cached_features(cnn, "digits-cnn", b, None, tmp_path), feats_b)
    assert counter.calls == 3
    (warning,) = _warnings(cache_log)
    assert "not usable" in warning and "other inputs or another backbone" in warning

    key_a = F.features_key(cnn, "digits-cnn", a, None)
    F._write_entry(path_a, key_a, "digits-cnn", torch.full_like(feats_a, float("nan")))
    F.clear_memory_cache()
    assert torch.equal(F.cached_features(cnn, "digits-cnn", a, None, tmp_path), feats_a)
    assert counter.calls == 4 and "NaN" in _warnings(cache_log)[-1]

    F._write_entry(path_a, key_a, "digits-cnn", feats_a[:, :10].contiguous())
    F.clear_memory_cache()
    assert torch.equal(F.cached_features(cnn, "digits-cnn", a, None, tmp_path), feats_a)
    assert counter.calls == 5 and f"expected float32 [{len(a)}, {cnn.feature_dim}]" in _warnings(cache_log)[-1]


def test_cache_dir_off_writes_nothing(cnn, tmp_path, counter, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = C.default_cache_dir()
    before = files_under(default)
    cache_dir = C.resolve_cache_dir(RunConfig.create(preset="digits", cache_dir="off").cache_dir)
    assert cache_dir is None
    data = images()
    first = F.cached_features(cnn, "digits-cnn", data, None, cache_dir)
    assert files_under(tmp_path) == [] and files_under(default) == before
    F.clear_memory_cache()
    assert torch.equal(F.cached_features(cnn, "digits-cnn", data, None, cache_dir), first)
    assert counter.calls == 2  # no disk: a fresh process computes again


def test_an_unwritable_cache_only_warns(cnn, tmp_path, counter, cache_log):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    feats = F.cached_features(cnn, "digits-cnn", images(), None, blocker / "cache")
    assert feats.shape == (6, cnn.feature_dim) and counter.calls == 1
    assert any("could not write" in w and "goes on without it" in w for w in _warnings(cache_log))
    assert files_under(tmp_path) == [blocker]
