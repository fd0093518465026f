"""The on-disk cache of derived inputs (backbone features, tokenised texts): where it lives, how a file is named
after what determines its content, and how it is written (private folders, atomic files).

One cache serves every run of a user, so a second simulation on the same data and backbone reads what the first
computed. It lives outside the run folder: ``cache-dir`` in the run config, a site's ``cache-dir`` node-config key,
or by default ``$XDG_CACHE_HOME/privatune`` (``~/.cache/privatune``). At a site it holds features of private records,
so every folder privatune makes in it is mode 0700 and every file 0600. A file's name is a hash of everything its
content depends on (the records' inputs, the model, its weights and tokenizer, the length, the pooling), so a
changed backbone or dataset never reads a stale file: it misses and computes afresh.

Framework-light: torch is only touched through the modules handed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

log = logging.getLogger("privatune.cache")

#: The cache folder's name under the user's cache home.
CACHE_NAME = "privatune"
#: ``cache-dir`` values that turn the disk cache off (features are still kept in memory for the process).
CACHE_OFF = ("off", "none")
#: Bumped when a cached file's format or meaning changes: old files are then simply never read again.
CACHE_VERSION = 1
_WARNED: set[str] = set()


# -- where -----------------------------------------------------------------------------------------------------


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/privatune`` when XDG_CACHE_HOME is an absolute path (the XDG rule), else
    ``~/.cache/privatune``."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / CACHE_NAME


def resolve_cache_dir(setting: str | os.PathLike[str] | None) -> Path | None:
    """A ``cache-dir`` value as a folder: "" = the default, ``off``/``none`` = no disk cache (None)."""
    text = "" if setting is None else str(setting).strip()
    if text.lower() in CACHE_OFF:
        return None
    if not text:
        return default_cache_dir()
    return Path(os.path.abspath(Path(text).expanduser()))


def private_dir(path: Path) -> Path:
    """Make ``path`` and any missing parents with mode 0700 (never loosening or changing a folder that was there).

    A folder that was there and is open to group or others is used, with a warning once per process: privatune
    does not chmod a folder it did not make (``cache-dir`` may point anywhere)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another process made it between the check and here
        os.chmod(folder, 0o700)  # exactly 0700 whatever the umask
    if not path.is_dir():
        raise NotADirectoryError(f"cache-dir: {path} is not a folder")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077 and str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning(
            "cache folder %s is open to group or others (mode %o): it holds features of the data it was "
            "computed from; chmod 700 it or set cache-dir to a private folder",
            path,
            mode,
        )
    return path


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` (mode 0600) through a temporary file in its folder, fsync it, rename it into place: a reader
    sees the old file or the whole new one, never a part; a crash leaves at most a ``.tmp`` file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- what a file is named after ----------------------------------------------------------------------------------


def cache_key(kind: str, parts: Mapping[str, Any]) -> str:
    """The file name stem for a ``kind`` of entry: sha256 of the version, the kind and the sorted parts."""
    payload = json.dumps({"v": CACHE_VERSION, "kind": kind, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


def inputs_fingerprint(inputs: list[str] | np.ndarray) -> str:
    """sha256 over the ordered inputs alone (UTF-8 texts, or the image array's dtype, shape and bytes): the
    features and tokens of a record set depend on its inputs and their order, not on its labels or name."""
    h = hashlib.sha256(b"privatune-inputs-v1\0")
    if isinstance(inputs, np.ndarray):
        arr = np.ascontiguousarray(inputs)
        h.update(f"{arr.dtype.str}|{arr.shape}\0".encode())
        h.update(arr.tobytes())
    else:
        h.update(b"texts\0")
        for text in inputs:
            encoded = text.encode("utf-8")
            h.update(len(encoded).to_bytes(8, "little") + encoded)
    return h.hexdigest()


def weights_fingerprint(module: Any) -> str:
    """sha256 over a torch module's structure (each submodule's name and class) and its whole state (every
    parameter and buffer: name, dtype, shape, bytes), trainable or not: what a frozen feature pass depends on."""
    import torch

    h = hashlib.sha256(b"privatune-weights-v1\0")
    for name, sub in module.named_modules():
        h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}\n".encode())
    for name, tensor in module.state_dict(keep_vars=False).items():
        data = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        h.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()).cast("B"))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a Hugging Face tokenizer's full definition: a fast tokenizer's serialised JSON (vocabulary,
    normaliser, pre-tokeniser, post-processor), else its vocabulary; with its class and settings."""
    h = hashlib.sha256(b"privatune-tokenizer-v1\0")
    h.update(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}\n".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k != "name_or_path"}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()
