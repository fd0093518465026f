"""The byte framing of the HE files: ``FORMAT_VERSION`` and the magic + length-prefixed JSON header.

Separate because two file formats (context files, ``context_file.py``; checkpoints, ``checkpoints.py``) and
the Flower records (``records.py``) share the version, and the two files share the way a header is framed;
each caller keeps its own magic, length width and error messages.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

__all__ = ["FORMAT_VERSION", "frame_header", "read_header"]

FORMAT_VERSION = 1


def frame_header(magic: bytes, length_format: str, header: Mapping[str, Any]) -> bytes:
    """``magic``, the header's length (``struct`` format ``length_format``) and the header as sorted JSON."""
    hb = json.dumps(header, sort_keys=True).encode()
    return magic + struct.pack(length_format, len(hb)) + hb


def read_header(data: bytes, magic: bytes, length_format: str) -> tuple[Any, int]:
    """The JSON header framed by ``frame_header`` and the offset where the body starts.

    The caller checks the magic first; malformed bytes raise ``struct.error`` or ``ValueError``, which the
    caller turns into its own ``HEFormatError``.
    """
    (hlen,) = struct.unpack_from(length_format, data, len(magic))
    start = len(magic) + struct.calcsize(length_format)
    return json.loads(data[start : start + hlen]), start + hlen
