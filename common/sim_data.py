"""A user's own data for a simulation, as one canonical file the whole federation reads (run config `sim-data`).

`privatune simulate --data PATH` reads the user's file with the site readers (client/site_data) once, then
writes what they produced here, under the run folder (RUN/data/sim-data.npz): the records as model inputs,
their labels, the label set and where they came from (file name, format, record counts; no content in the
metadata). The ServerApp (central test split) and every simulated ClientApp (its partition) load this file,
so the user's file is parsed once, a rerun or `scripts/flwr_run_local.sh` reads the same records, and no reader
of a site's formats has to live on the server side.

The file is a plain .npz without pickles: texts as UTF-8 bytes with end offsets, images as float32
[N, 1, 28, 28] model inputs, labels as int64, metadata as JSON bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privatune.common.config import ConfigError
from privatune.common.datasets import LabelledData

FILE_NAME = "sim-data.npz"
FORMAT = "privatune-sim-data"
VERSION = 1


def write_sim_data(
    path: Path,
    data: LabelledData,
    test: LabelledData | None,
    source: Mapping[str, Any],
    test_source: Mapping[str, Any] | None = None,
) -> Path:
    """Write the canonical copy atomically (write, then rename); ``test`` is the user's own test file, if any.

    ``source``/``test_source`` describe the files (e.g. {"file": "reviews.csv", "format": "csv"}); they are
    recorded in the metadata and in summary.json, so they must hold no record content.
    """
    if test is not None and (test.kind != data.kind or test.label_names != data.label_names):
        raise ValueError("the test data must have the kind and label set of the data")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": data.kind,
        "label_names": list(data.label_names),
        "source": {**source, "records": len(data)},
        "test_source": None if test is None else {**(test_source or {}), "records": len(test)},
    }
    arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    arrays.update(_pack("", data))
    if test is not None:
        arrays.update(_pack("test_", test))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub types the kwargs as allow_pickle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _pack(prefix: str, data: LabelledData) -> dict[str, np.ndarray]:
    out = {f"{prefix}y": np.ascontiguousarray(data.labels, dtype=np.int64)}
    if data.kind == "text":
        encoded = [t.encode("utf-8") for t in data.inputs]
        out[f"{prefix}text_bytes"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        out[f"{prefix}text_ends"] = np.cumsum([len(e) for e in encoded], dtype=np.int64)
    else:
        out[f"{prefix}x"] = np.ascontiguousarray(data.inputs, dtype=np.float32)
    return out


def _unpack(archive: Any, prefix: str, kind: str, names: tuple[str, ...]) -> LabelledData:
    labels = np.asarray(archive[f"{prefix}y"], dtype=np.int64)
    inputs: list[str] | np.ndarray
    if kind == "text":
        raw = archive[f"{prefix}text_bytes"].tobytes()
        ends = archive[f"{prefix}text_ends"].tolist()
        starts = [0, *ends[:-1]]
        inputs = [raw[a:b].decode("utf-8") for a, b in zip(starts, ends, strict=True)]
    else:
        inputs = np.ascontiguousarray(archive[f"{prefix}x"], dtype=np.float32)
    return LabelledData("sim-data", kind, inputs, labels, names)  # type: ignore[arg-type]


def _unreadable(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"sim-data: cannot read {path} ({why}); it is the copy `privatune simulate --data FILE` writes to "
        f"RUN/data/{FILE_NAME}: run that command again, or point sim-data at such a copy"
    )


def _stat_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as err:
        raise _unreadable(path, err.strerror or "not found") from None
    if not path.is_file():
        raise _unreadable(path, "not a file")
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def sim_data_info(path: str | Path) -> dict[str, Any]:
    """The metadata only (kind, label set, source files and record counts): reads no records."""
    return dict(_read(*_stat_key(Path(path)))[0])


def load_sim_data(path: str | Path, label_names: Sequence[str]) -> tuple[LabelledData, LabelledData | None]:
    """(records, the user's own test records or None), labelled in the order of ``label_names``, which must be
    the file's label set (in any order); the arrays are read-only, shared by every caller in the process."""
    meta, data, test = _read(*_stat_key(Path(path)))
    have = tuple(meta["label_names"])
    want = tuple(label_names)
    if set(have) != set(want) or len(have) != len(want):
        raise ConfigError(
            f"labels: {path} holds the labels {','.join(have)}, not {','.join(want)}; "
            f'give labels="{",".join(have)}" (as in the run\'s config.json)'
        )
    if have == want:
        return data, test
    return _relabel(data, want), None if test is None else _relabel(test, want)


def _relabel(data: LabelledData, names: tuple[str, ...]) -> LabelledData:
    index = {name: i for i, name in enumerate(names)}
    remap = np.asarray([index[name] for name in data.label_names], dtype=np.int64)
    return LabelledData(data.name, data.kind, data.inputs, remap[data.labels], names)


@functools.lru_cache(maxsize=4)
def _read(path: str, _mtime_ns: int, _size: int) -> tuple[dict[str, Any], LabelledData, LabelledData | None]:
    """Parsed once per process and file version (every client message needs the records)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes().decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise _unreadable(Path(path), "not a privatune sim-data file")
            if meta.get("version") != VERSION:
                raise _unreadable(Path(path), f"version {meta.get('version')}, this privatune reads {VERSION}")
            kind, names = meta["kind"], tuple(meta["label_names"])
            data = _unpack(archive, "", kind, names)
            test = _unpack(archive, "test_", kind, names) if meta.get("test_source") else None
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise _unreadable(Path(path), str(err) or type(err).__name__) from None
    for part in (data, test):
        if part is not None:
            part.labels.setflags(write=False)
            if isinstance(part.inputs, np.ndarray):
                part.inputs.setflags(write=False)
    return meta, data, test


def model_kind_of(model: str) -> str:
    """``text`` or ``image``: what the run's model reads (own models by their prefix, presets by their spec)."""
    from privatune.common.models.names import model_kind

    kind = model_kind(model)
    if kind is not None:
        return kind
    from privatune.common.models import get_model_spec

    return get_model_spec(model).kind


def check_kind(path: str | Path, model: str, data_kind: str | None = None) -> None:
    """Refuse text data with an image model (and the reverse) before any training, naming the keys."""
    kind = data_kind or sim_data_info(path)["kind"]
    want = model_kind_of(model)
    if kind != want:
        hint = (
            "a text model (model=minilm, preset sms-spam or trec6, or model=hf:FOLDER)"
            if kind == "text"
            else ("an image model (model=digits-cnn, preset digits, or model=torch:module:function)")
        )
        raise ConfigError(
            f"model: {path} holds {kind} data but model '{model}' reads {want} data; {kind} data needs {hint}"
        )


def file_sha256(path: str | Path) -> str:
    """sha256 of the canonical copy's bytes: names the exact records a run trained and was scored on."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def summary_entry(path: str | Path, train_records: int, test_records: int) -> dict[str, Any]:
    """summary.json's ``data``: where the records came from, how many trained and were scored, the label set and
    the canonical copy's sha256 (simulation only: the data is the user's own, on their machine)."""
    meta = sim_data_info(path)
    source, test_source = meta.get("source") or {}, meta.get("test_source")
    return {
        "source": source.get("file"),
        "format": source.get("format"),
        "test_source": test_source.get("file") if test_source else None,
        "test_split": "the test file" if test_source else "held out of the source (test-fraction, stratified)",
        "records": {"train": int(train_records), "test": int(test_records)},
        "labels": list(meta["label_names"]),
        "sha256": file_sha256(path),
    }
