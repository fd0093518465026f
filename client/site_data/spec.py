"""What a site's data is and how it fails: SiteDataSpec, the formats, and SiteDataError (which names the
file, record, line, reason and fix). Separate because the site config, the check and every reader share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Format = Literal["csv", "jsonl", "npz", "image-folder"]
FORMATS: tuple[str, ...] = ("csv", "jsonl", "npz", "image-folder")
TEXT_FORMATS = ("csv", "jsonl")
IMAGE_FORMATS = ("npz", "image-folder")


def guess_format(path: str | Path) -> str:
    """The format a data path's name suggests: .csv, .jsonl (or .ndjson), .npz, else an image folder."""
    p = str(path).lower()
    for ext, fmt in ((".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".npz", "npz")):
        if p.endswith(ext):
            return fmt
    return "image-folder"


@dataclass(frozen=True)
class SiteDataSpec:
    """Where a site's data lies and how to read it (columns apply to csv/jsonl only)."""

    path: Path
    format: Format
    text_column: str = "text"
    label_column: str = "label"


class SiteDataError(ValueError):
    """A site file cannot be used. `record` and `line` are 1-based; None when the whole file is at fault."""

    def __init__(
        self,
        path: Path | str,
        reason: str,
        fix: str,
        record: int | None = None,
        line: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.record = record
        self.line = line
        self.reason = reason
        self.fix = fix
        where = str(self.path)
        if record is not None:
            where += f", record {record}"
        if line is not None and line != record:
            where += f" (line {line})"
        super().__init__(f"{where}: {reason}. {fix}")

    def __reduce__(self):  # keep the fields when the error crosses a process boundary (Ray, multiprocessing)
        return (type(self), (self.path, self.reason, self.fix, self.record, self.line))
