"""The text readers: CSV (comma, semicolon or tab, with a header) and JSON Lines. Each stops at the first bad
record with a SiteDataError naming it.
"""

from __future__ import annotations

import csv
import io
import json
import sys

from privatune.client.site_data.checks import LabelParser, check_text, first_escaped, require_file, undecodable
from privatune.client.site_data.spec import SiteDataError, SiteDataSpec
from privatune.common.datasets import MAX_TEXT_CHARS


def _oversized_field_bytes(content: str, start_line: int, delimiter: str) -> int:
    """Size in bytes of the largest field of the record that starts at ``start_line`` (read without the limit)."""
    rest = content.split("\n", start_line - 1)[-1] if start_line > 1 else content
    old = csv.field_size_limit()
    try:
        csv.field_size_limit(sys.maxsize)
        row = next(csv.reader(io.StringIO(rest, newline=""), delimiter=delimiter), [])
    except csv.Error:
        row = [rest]
    finally:
        csv.field_size_limit(old)
    return max((len(cell.encode("utf-8", errors="surrogateescape")) for cell in row), default=0)


def load_csv(spec: SiteDataSpec, labels: LabelParser) -> tuple[list[str], list[int]]:
    """Comma-, semicolon- or tab-separated, with a header row; the header's first separator decides.

    `record` counts data rows after the header (blank lines skipped); `line` is where the record starts.
    """
    path = spec.path
    require_file(path)
    # surrogateescape keeps bad bytes in place, so the CSV parser can tell us which record holds them.
    content = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if not content.strip():
        raise SiteDataError(path, "the file holds only whitespace", "Export the data again with a header row.")
    first_line = content.lstrip("\r\n").split("\n", 1)[0]
    # Spreadsheets in many locales export ';' (or tabs); accept them when the header has no comma.
    delimiter = "," if "," in first_line else ";" if ";" in first_line else "\t" if "\t" in first_line else ","
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as err:
        raise SiteDataError(path, f"the header row is not valid CSV ({err})", "Fix the first line.", line=1) from None
    bad = first_escaped("".join(header))
    if bad is not None:
        raise undecodable(path, bad, None, 1)
    for column in (spec.text_column, spec.label_column):
        if column not in header:
            raise SiteDataError(
                path,
                f"missing column {column!r}; the header has {', '.join(repr(h) for h in header)}",
                "Rename the column, or set text-column/label-column in the site's node config.",
                line=1,
            )
    text_at, label_at = header.index(spec.text_column), header.index(spec.label_column)
    texts: list[str] = []
    ys: list[int] = []
    record = 0
    while True:
        start_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            if "field larger than field limit" in str(err):
                size = _oversized_field_bytes(content, start_line, delimiter)
                raise SiteDataError(
                    path,
                    f"field too large ({size} bytes), limit {csv.field_size_limit()}",
                    "Shorten the text (privatune reads at most the first "
                    f"{MAX_TEXT_CHARS} characters) or fix a quote that is never closed.",
                    record=record + 1,
                    line=start_line,
                ) from None
            raise SiteDataError(
                path, f"not valid CSV ({err})", "Check the quoting on this record.", record=record + 1, line=start_line
            ) from None
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        record += 1
        bad = first_escaped("".join(row))
        if bad is not None:
            raise undecodable(path, bad, record, start_line)
        if len(row) <= max(text_at, label_at):
            raise SiteDataError(
                path,
                f"the record has {len(row)} field(s) but the header has {len(header)}",
                "Quote texts that contain commas, and give every record all columns.",
                record=record,
                line=start_line,
            )
        texts.append(check_text(path, row[text_at], spec.text_column, record, start_line))
        ys.append(labels.parse(row[label_at], record, start_line))
    if not texts:
        raise SiteDataError(path, "the file has a header but no records", "Add labelled records below the header.")
    return texts, ys


def load_jsonl(spec: SiteDataSpec, labels: LabelParser) -> tuple[list[str], list[int]]:
    """One JSON object per line; `record` is the line number (blank lines are skipped)."""
    path = spec.path
    require_file(path)
    texts: list[str] = []
    ys: list[int] = []
    raw_lines = path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n")
    for number, raw_line in enumerate(raw_lines, start=1):
        line = raw_line.decode("utf-8", errors="surrogateescape")
        bad = first_escaped(line)
        if bad is not None:
            raise undecodable(path, bad, number, number)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise SiteDataError(
                path, f"not valid JSON ({err.msg})", "Write one JSON object per line.", record=number
            ) from None
        if not isinstance(obj, dict):
            raise SiteDataError(
                path, f"expected a JSON object, got {type(obj).__name__}", "Write one object per line.", record=number
            )
        for column in (spec.text_column, spec.label_column):
            if column not in obj:
                raise SiteDataError(
                    path,
                    f"missing key {column!r}; the record has {', '.join(repr(k) for k in obj) or 'no keys'}",
                    "Add the key, or set text-column/label-column in the site's node config.",
                    record=number,
                )
        texts.append(check_text(path, obj[spec.text_column], spec.text_column, number, None))
        ys.append(labels.parse(obj[spec.label_column], number))
    if not texts:
        raise SiteDataError(path, "the file holds no records", "Write one JSON object per line.")
    return texts, ys
