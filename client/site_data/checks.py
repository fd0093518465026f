"""The record-level checks every reader shares: labels (names or indices), files that exist and are not
empty, undecodable bytes, empty texts. Separate so each format reports the same faults in the same words.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from privatune.client.site_data.spec import SiteDataError
from privatune.common.datasets import MAX_TEXT_CHARS


class LabelParser:
    """Label values may be label names or integer indices into label_names (names win when both match)."""

    def __init__(self, label_names: Sequence[str], path: Path) -> None:
        self.names = tuple(label_names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.path = path

    def allowed(self) -> str:
        return f"allowed labels: {', '.join(self.names)} (or their indices 0..{len(self.names) - 1})"

    def parse(self, value: object, record: int, line: int | None = None) -> int:
        if isinstance(value, str):
            text = value.strip()
            if text in self.index:
                return self.index[text]
            try:
                number: object = int(text)
            except ValueError:
                number = None
        elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            number = int(value)
        else:
            number = None
        if isinstance(number, int) and 0 <= number < len(self.names):
            return number
        raise SiteDataError(
            self.path,
            f"unknown label {value!r}",
            f"Use one of the {self.allowed()}.",
            record=record,
            line=line,
        )


class LabelCollector(LabelParser):
    """Finds the label set instead of checking against one: every distinct label value becomes a label name
    (integers as their decimal text). ``sorted_labels`` then gives the names sorted (numerically when all are
    integers) and the records' labels as indices into them."""

    def __init__(self, path: Path) -> None:
        super().__init__((), path)

    def allowed(self) -> str:
        return "labels found so far: " + (", ".join(self.names) or "none")

    def parse(self, value: object, record: int, line: int | None = None) -> int:
        if isinstance(value, str):
            text = value.strip()
        elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            text = str(int(value))
        else:
            text = ""
        if not text:
            raise SiteDataError(
                self.path,
                f"label {value!r} is not a label name",
                "Give every record a label: a name or an integer.",
                record=record,
                line=line,
            )
        if text not in self.index:
            self.index[text] = len(self.names)
            self.names = (*self.names, text)
        return self.index[text]

    def sorted_labels(self, found: Sequence[int]) -> tuple[tuple[str, ...], list[int]]:
        """(label names sorted, each record's label as an index into them)."""
        numeric = all(re.fullmatch(r"-?[0-9]+", name) for name in self.names)
        order = sorted(self.names, key=int) if numeric else sorted(self.names)
        new_index = {name: i for i, name in enumerate(order)}
        remap = [new_index[name] for name in self.names]
        return tuple(order), [remap[y] for y in found]


def require_file(path: Path) -> None:
    if not path.exists():
        raise SiteDataError(path, missing_reason(path), "Check data-path in the site's node config.")
    if not path.is_file():
        raise SiteDataError(path, "is not a file", "Point the data path at a file, or use format 'image-folder'.")
    if path.stat().st_size == 0:
        raise SiteDataError(path, "the file is empty", "Export the data again; the file has no bytes.")


def undecodable(path: Path, bad_char: str, record: int | None, line: int | None) -> SiteDataError:
    byte = ord(bad_char) - 0xDC00  # surrogateescape maps an undecodable byte b to U+DC00 + b
    return SiteDataError(
        path,
        f"undecodable text: byte 0x{byte:02x} is not valid UTF-8",
        "Save the file as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet, or `iconv -f latin1 -t utf-8`).",
        record=record,
        line=line,
    )


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def first_escaped(text: str) -> str | None:
    """The first undecodable byte (as its surrogateescape character) in text, if any."""
    found = _ESCAPED_BYTE.search(text)
    return found.group() if found else None


def check_text(path: Path, text: object, column: str, record: int, line: int | None) -> str:
    if not isinstance(text, str):
        raise SiteDataError(
            path,
            f"column {column!r} holds {type(text).__name__}, not text",
            f"Put the text in {column!r} as a string.",
            record=record,
            line=line,
        )
    cleaned = text.strip()
    if not cleaned:
        raise SiteDataError(
            path, f"column {column!r} is empty", "Remove the record or fill in its text.", record=record, line=line
        )
    return cleaned[:MAX_TEXT_CHARS]


def missing_reason(path: Path, kind: str = "file") -> str:
    """Why ``path`` cannot be opened: a symlink loop, a dangling symlink, or nothing there."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (the path's links point back at each other)"
        if path.is_symlink():
            return "broken symlink (its target does not exist)"
    return f"{kind} not found"
