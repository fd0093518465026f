"""The signal stop's race: one signal reaches both the watcher thread and the main-thread handler.

CI once saw a SIGINT'd run exit 130 with summary.json still ``running``: the main-thread handler took
the watcher's sighting of the same signal for a second one and exited before the summary was marked.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import pytest

from privatune.simulations import stopping


class Exited(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class SlowRecorder:
    """Marks the run slowly, so the other path runs while the first is still marking."""

    def __init__(self) -> None:
        self.status = "running"
        self.started = threading.Event()

    def mark_ended(self, status: str, reason: str) -> None:
        self.started.set()
        time.sleep(0.3)
        self.status = status


@pytest.fixture
def stopper(tmp_path, monkeypatch):
    exits: list[tuple[int, str]] = []

    def fake_exit(code: int) -> None:
        exits.append((code, rec.status))
        raise Exited(code)

    monkeypatch.setattr(stopping.os, "_exit", fake_exit)
    monkeypatch.setattr(stopping, "descendants", lambda pid: [])
    rec = SlowRecorder()
    s = stopping.StopOnSignal(tmp_path, announce=lambda text: None)
    s.attach(rec)
    return s, rec, exits


def _watcher_stops(s: stopping.StopOnSignal) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(Exited):
            s.handle(signal.SIGINT, None)  # the watcher thread passes no frame

    t = threading.Thread(target=run)
    t.start()
    return t


def test_the_same_signal_seen_by_the_handler_waits_for_the_summary_to_be_marked(stopper):
    s, rec, exits = stopper
    t = _watcher_stops(s)
    assert rec.started.wait(5)
    s.handle(signal.SIGINT, object())  # the main thread's handler for the same signal: no early exit
    t.join(5)
    assert exits == [(128 + signal.SIGINT, "interrupted")]


def test_a_second_signal_exits_at_once_but_only_after_the_summary_is_marked(stopper):
    s, rec, exits = stopper
    t = _watcher_stops(s)
    assert rec.started.wait(5)
    s.handle(signal.SIGINT, object())  # first sighting on this path
    s.handle(signal.SIGINT, object())  # a second signal while still marking: not yet
    assert exits == []
    t.join(5)
    assert exits == [(128 + signal.SIGINT, "interrupted")]
    s2_exits: list[int] = []
    try:
        s.handle(signal.SIGINT, object())  # third, after the mark: go now
    except Exited as e:
        s2_exits.append(e.code)
    assert s2_exits == [128 + signal.SIGINT]
