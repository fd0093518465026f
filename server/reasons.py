"""One readable line from a failure's text: what a ledger, a summary and a terminal show.

A client that raises inside a simulation reaches the server as a string such as
``<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() ... Traceback ...
ValueError: noise-multiplier must be finite'>`` with colour codes. Only the innermost message helps an
operator, so that is what we keep.
"""

from __future__ import annotations

import re

MAX_REASON_CHARS = 400

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
_CLASS_PREFIX = re.compile(r"<class '[^']*'>\s*:?\s*")
# "pkg.mod.SomeError: message" or "SomeError(Wrapped): message" at the start of a line.
_EXC_LINE = re.compile(
    r"^\s*(?P<cls>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure|Stopped)(?:\([\w.]*\))?)\s*:\s?(?P<msg>.*)$"
)
_RAY_NAMES = re.compile(
    r"ray::[\w.]+\(\)\s*(\(pid=[^)]*\))?|\bray\.exceptions\.\w+(\([\w.]*\))?|\bRay\w*Error(\([\w.]*\))?"
    r"|\bClientAppActor\b(\.run\(\))?"
)
_FLOWER_WRAPPER = re.compile(r"Exception ClientAppException occurred\.\s*Message:\s*")
# Classes whose name adds nothing to their message.
_QUIET_CLASSES = {
    "Exception",
    "ValueError",
    "RuntimeError",
    "ClientAppException",
    "ConfigError",
    "SiteConfigError",
    "SiteDataError",
    "HEError",
    "FederationStopped",
}


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def one_line(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """The innermost message of ``text`` (a string, an exception, None) on one line (at most ``limit``
    characters), without colour codes or Ray's class names."""
    text = strip_ansi(str(text or ""))
    text = _CLASS_PREFIX.sub("", text)
    text = _FLOWER_WRAPPER.sub("", text)
    text = text.strip().removeprefix(":<'").removesuffix("'>").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    chosen = ""
    for idx in range(len(lines) - 1, -1, -1):  # the last exception line of the last traceback: the innermost cause
        m = _EXC_LINE.match(lines[idx])
        if m:
            cls = m.group("cls")
            base = re.sub(r"\(.*\)$", "", cls).rsplit(".", 1)[-1]
            inner = re.search(r"\(([\w.]*)\)$", cls)
            msg = m.group("msg").strip()
            if base.startswith("Ray") and inner:
                base = inner.group(1).rsplit(".", 1)[-1]
            if not msg:  # the message may follow on the next lines (Flower's ClientAppException does that)
                msg = " ".join(ln.strip() for ln in lines[idx + 1 :]).strip()
            if not msg:
                chosen = base
            elif base in _QUIET_CLASSES or base.startswith("Ray"):
                chosen = msg
            else:
                chosen = f"{base}: {msg}"
            break
    if not chosen:
        # No exception line: drop traceback frames and keep the last meaningful line.
        body = [ln for ln in lines if not ln.lstrip().startswith(("File ", "Traceback", "^", "~"))]
        chosen = body[-1] if body else ""
    chosen = _RAY_NAMES.sub("", chosen)
    chosen = re.sub(r"\s+", " ", chosen).strip(" :'\"")
    if len(chosen) > limit:
        chosen = chosen[: limit - 3] + "..."
    return chosen or "unknown error (no message)"
