"""The HE error classes: one hierarchy under ``HEError`` that every module of the package raises.

Apart from the code so that each module (and the CLI's table of known errors, which looks up ``HEError`` on
``privatune.common.he``) can name them without importing the SEAL-heavy ones.
"""

from __future__ import annotations

__all__ = ["HEError", "HEFormatError", "HEInputError", "HEKeyError", "HEParamsError", "HEReplyError"]


class HEError(Exception):
    """Base class of every error raised by this package."""


class HEKeyError(HEError):
    """Wrong key material for the job: a secret key where only a public one belongs, or the reverse,
    or a fingerprint that does not match."""


class HEInputError(HEError, ValueError):
    """A client's plaintext cannot be encrypted (non-finite values, wrong dtype, out of range)."""


class HEParamsError(HEError, ValueError):
    """Encryption parameters that SEAL refuses or that break the precision/range budget."""


class HEFormatError(HEError):
    """A context file, checkpoint or record is malformed or corrupted."""


class HEReplyError(HEFormatError):
    """A client's encrypted reply fails the server's checks; ``reason`` says why (for the log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
