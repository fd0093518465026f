"""One-line reasons: what the server stores or prints about a failed or rejected client reply.

A simulated client's exception reaches the server as Flower's error reason, e.g.
``<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\\x1b[36mray::ClientAppActor.run()...``
followed by two tracebacks. Ledgers, run records and summaries want the innermost message on one line,
without terminal colour codes, Ray/Flower wrapper class names or file paths of the coordinator's machine.
"""

from __future__ import annotations

import re

DEFAULT_LIMIT = 300

# CSI sequences (colours, cursor moves), OSC sequences (titles, links) and lone escapes.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Flower's simulation engine: str(type(ex)) + ":<'" + str(ex) + "'>"
_FLOWER_WRAPPER = re.compile(r"<class '[^']*'>\s*:\s*<'(?P<body>.*)'>\s*$", re.S)
# flwr's ClientAppException: "\nException ClientAppException occurred. Message: <str of the original>"
_CLIENTAPP_MESSAGE = "occurred. Message:"
_RAY_FRAME = re.compile(r"ray::[\w.]+\(\)(?:\s*\((?:[^()]|\([^()]*\))*\))?")
_TRACE_LINE = re.compile(
    r"^\s*(Traceback \(most recent call last\):|File \".*\", line \d+.*|"
    r"The above exception was the direct cause of the following exception:|"
    r"During handling of the above exception, another exception occurred:)\s*$"
)
# A qualified or wrapper class name in front of a message: "ray.exceptions.RayTaskError(X): msg",
# "flwr.clientapp.client_app.ClientAppException: msg"; plain built-ins ("ValueError: msg") are kept.
_QUALIFIED_CLASS = re.compile(r"^(?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*(?:\([\w.]*\))?:\s*")
_WRAPPER_CLASS = re.compile(r"^(?:RayTaskError|RayActorError|ClientAppException)(?:\([\w.]*\))?:\s*")


def _strip_tracebacks(text: str) -> str:
    """Drop traceback headers, frames and their source lines; keep what the exceptions said."""
    lines = text.splitlines()
    kept: list[str] = []
    had_trace = False
    skip_source = False
    for line in lines:
        if _TRACE_LINE.match(line):
            had_trace = True
            skip_source = line.lstrip().startswith("File ")
            continue
        if skip_source and line.startswith("    "):
            skip_source = False
            continue  # the source line under a frame
        skip_source = False
        if line.strip():
            kept.append(line)
    if had_trace and kept:
        return kept[-1]  # the last exception line of a traceback: its message
    return "\n".join(kept)


def one_line(text: object, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` as one clean line of at most ``limit`` characters (innermost message, no colours)."""
    s = _ANSI.sub("", str(text))
    prefix = ""
    m = _FLOWER_WRAPPER.search(s)
    if m:  # keep what the caller put in front ("client error: ")
        prefix, s = " ".join(s[: m.start()].split()), m.group("body")
        prefix = f"{prefix} " if prefix else ""
    if _CLIENTAPP_MESSAGE in s:
        s = s.rsplit(_CLIENTAPP_MESSAGE, 1)[1]
    s = _RAY_FRAME.sub("", s)
    s = _strip_tracebacks(s)
    s = _CONTROL.sub(" ", s)
    s = " ".join(s.split())
    for _ in range(3):  # nested wrappers: "RayTaskError(ClientAppException): ClientAppException: ..."
        stripped = _WRAPPER_CLASS.sub("", _QUALIFIED_CLASS.sub("", s))
        if stripped == s:
            break
        s = stripped
    s = prefix + s if s else prefix + "no reason given"
    if limit > 0 and len(s) > limit:
        s = s[: max(limit - 1, 0)].rstrip() + "…"
    return s
