"""`privatune simulate --data FILE`: the user's own records read with the site readers, so the formats, options
and error messages are a site's, then kept as the canonical copy the whole simulated federation reads
(RUN/data/sim-data.npz, common/sim_data.py). Separate so the simulate command stays a list of options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privatune.cli.inputs import UsageError
from privatune.common.config import ConfigError
from privatune.common.datasets import LabelledData

TEXT_FORMATS = ("csv", "jsonl")
# The site loaders' fixes name the site's node config; on this command the same fix is an option.
_FIX_FOR_CLI = {
    "set text-column/label-column in the site's node config": "pass --text-column/--label-column",
    "Check data-path in the site's node config.": "Check the path given to {option}.",
}


@dataclass(frozen=True)
class OwnData:
    """What --data (and --test-data) gave: the records, the label set and where they came from (no content)."""

    data: LabelledData
    test: LabelledData | None
    source: dict[str, Any]
    test_source: dict[str, Any] | None
    labels_found: bool  # True: the label set was found in the data (no --labels)


def parse_labels(text: str) -> tuple[str, ...] | None:
    """--labels "neg,pos" (or '["neg","pos"]') -> ("neg", "pos"); "" -> None (find them in the data)."""
    from privatune.common.config import parse_labels as parse_label_set

    if not text.strip():
        return None
    names = parse_label_set(text, key="--labels")
    if len(set(names)) != len(names) or len(names) < 2:
        raise UsageError(
            f'--labels must name at least 2 distinct labels, comma-separated (e.g. "neg,pos"), got {text!r}'
        )
    return names


def data_format(path: Path, given: str, option: str) -> str:
    """The format --data-format names, else the one the name suggests (a folder is an image folder)."""
    from privatune.client.site_data import FORMATS, guess_format

    if given:
        if given not in FORMATS:
            raise UsageError(f"--data-format must be one of {', '.join(FORMATS)}, got {given!r}")
        return given
    fmt = guess_format(path)
    if fmt == "image-folder" and path.is_file():
        raise UsageError(
            f"{option} {path}: cannot tell the format from the file name; name it .csv, .jsonl, .npz, or pass "
            f"--data-format ({', '.join(FORMATS)})"
        )
    return fmt


def load_own_data(
    data: Path,
    test_data: Path | None,
    *,
    fmt: str,
    text_column: str,
    label_column: str,
    labels: str,
    model: str,
    model_option: str,
) -> OwnData:
    """Read --data and --test-data as a site would, for a model of ``model``'s kind; every error names the file
    (and record) and the option that fixes it."""
    from privatune.client.site_data import SiteDataError, SiteDataSpec, load_site_data
    from privatune.common.sim_data import model_kind_of

    want = model_kind_of(model)
    names = parse_labels(labels)
    parts: list[tuple[LabelledData, dict[str, Any]]] = []
    for path, option in ((data, "--data"), (test_data, "--test-data")):
        if path is None:
            continue
        f = data_format(path, fmt, option)
        kind = "text" if f in TEXT_FORMATS else "image"
        if kind != want:
            other = "a text model (--model minilm or --model hf:FOLDER, or --preset sms-spam or trec6)"
            if kind == "image":
                other = "an image model (--model digits-cnn or --model torch:module:function, or --preset digits)"
            raise ConfigError(
                f"{option} {path} holds {kind} data ({f}) but the model '{model}' ({model_option}) reads {want} "
                f"data; choose {other}"
            )
        spec = SiteDataSpec(path, f, text_column, label_column)  # type: ignore[arg-type]
        try:
            loaded = load_site_data(spec, names, kind=want, name=path.name)  # type: ignore[arg-type]
        except SiteDataError as err:
            fix = err.fix
            for site_words, cli_words in _FIX_FOR_CLI.items():
                fix = fix.replace(site_words, cli_words.format(option=option))
            raise SiteDataError(err.path, err.reason, fix, err.record, err.line) from None
        # The test file is read against the data's label set, found or given (an unknown label names its record).
        names = loaded.label_names
        parts.append((loaded, {"file": path.name, "format": f}))
    (train, source), test = parts[0], parts[1] if len(parts) > 1 else None
    return OwnData(train, test[0] if test else None, source, test[1] if test else None, labels_found=not labels.strip())


def describe(own: OwnData) -> str:
    """One line for the terminal: the file, its records and the label set (said to be found, when it was)."""
    line = f"data: {own.source['file']} ({own.source['format']}, {len(own.data)} records"
    if own.test is not None and own.test_source is not None:
        line += f"; test: {own.test_source['file']}, {len(own.test)} records"
    how = "found in the data (sorted; give --labels to set the order)" if own.labels_found else "as given"
    return line + f"); labels {','.join(own.data.label_names)} {how}"


def write_copy(own: OwnData, out: Path) -> Path:
    """RUN/data/sim-data.npz: the canonical copy every simulated client and the server read."""
    from privatune.common.sim_data import FILE_NAME, write_sim_data

    return write_sim_data(out / "data" / FILE_NAME, own.data, own.test, own.source, own.test_source).resolve()


def load_test_file(
    path: Path, *, fmt: str, text_column: str, label_column: str, label_names: tuple[str, ...], kind: str, model: str
) -> tuple[LabelledData, str]:
    """`privatune evaluate`'s test file, read as a site would against the model's label set: (records, format).
    A label the model does not know names the file, the record, the label and the model's labels."""
    from privatune.client.site_data import SiteDataError, SiteDataSpec, load_site_data

    f = data_format(path, fmt, "TEST_FILE")
    have = "text" if f in TEXT_FORMATS else "image"
    if have != kind:
        raise UsageError(
            f"{path} holds {have} data ({f}), but the model '{model}' reads {kind} data; give a test file of "
            f"{'text (csv, jsonl)' if kind == 'text' else 'images (npz, an image folder)'}"
        )
    spec = SiteDataSpec(path, f, text_column, label_column)  # type: ignore[arg-type]
    try:
        return load_site_data(spec, label_names, kind=kind, name=path.name), f  # type: ignore[arg-type]
    except SiteDataError as err:
        fix = err.fix
        if err.reason.startswith("unknown label"):
            fix = (
                f"The model knows only the labels {', '.join(label_names)} (or their indices "
                f"0..{len(label_names) - 1}); relabel or drop the record."
            )
        for site_words, cli_words in _FIX_FOR_CLI.items():
            fix = fix.replace(site_words, cli_words.format(option="TEST_FILE"))
        raise SiteDataError(err.path, err.reason, fix, err.record, err.line) from None
