"""The site secret: 32 random bytes that key every record id and fingerprint this site computes.

Created on first use (``os.urandom``, written to a private temporary file and linked into place, so the key
appears whole or not at all and two processes racing to create it agree on one), kept beside the ledger as
``<ledger stem>.key`` unless node-config ``site-key-path`` names another file. It never leaves the site and is
never logged. Without it the ledger's record ids cannot be matched to records again, so it is backed up with the
ledger, and a missing key next to a ledger that already holds keyed spends is refused rather than replaced.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

KEY_BYTES = 32


class SiteSecretError(ValueError):
    """The site key cannot be used; the message says which file and what to do."""


def default_key_path(ledger_path: Path) -> Path:
    """``site-a.ledger.sqlite`` -> ``site-a.ledger.key``, in the ledger's folder."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(ledger_path.stem + ".key")


def key_for_ledger(key_path: Path, ledger_path: Path) -> bytes:
    """The site key for a ledger; a missing one is created unless the ledger already holds keyed spends (their
    record ids could never be matched again) or cannot be read (never guess)."""
    from privatune.common.ledger import read_rows

    key_path, ledger_path = Path(key_path), Path(ledger_path)
    may_create = True
    if not key_path.exists() and ledger_path.exists():
        try:
            may_create = not any(r.get("cohort_id") for r in read_rows(ledger_path, "spend"))
        except Exception:
            may_create = ledger_path.stat().st_size == 0  # a broken ledger: its own check says why
    return load_site_key(key_path, may_create=may_create)


def load_site_key(path: Path, *, may_create: bool = True) -> bytes:
    """The site key at ``path``, created when absent and ``may_create`` (False: a ledger already holds spends keyed
    by a key that must not be replaced)."""
    path = Path(path)
    if not path.exists():
        if not may_create:
            raise SiteSecretError(
                f"site key {path} is missing but the ledger beside it holds spends keyed by it: restore the key "
                "from the backup made with the ledger (a new key would restart every record's budget at zero)"
            )
        _create(path)
    return _read(path)


def write_site_key(path: Path, key: bytes) -> None:
    """Install a given key (a reproducible simulation's, derived from its seed); an existing key is kept."""
    if len(key) != KEY_BYTES:
        raise SiteSecretError(f"a site key is {KEY_BYTES} bytes, got {len(key)}")
    _create(Path(path), key)


def _create(path: Path, key: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(KEY_BYTES) if key is None else key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if another process created the key first: then use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _read(path: Path) -> bytes:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise SiteSecretError(f"site key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise SiteSecretError(
            f"site key {path} is readable or writable by group/others (mode {stat.S_IMODE(st.st_mode):o}): "
            f"run `chmod 600 {path}`"
        )
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise SiteSecretError(
            f"site key {path} holds {len(key)} bytes, not {KEY_BYTES}: restore it from the ledger's backup"
        )
    return key
