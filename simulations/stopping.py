"""Stop a simulation on SIGINT or SIGTERM within seconds, and leave nothing behind.

Flower's in-process simulation runs the ServerApp in a non-daemon thread that waits up to
``round-timeout`` for replies, so a plain KeyboardInterrupt leaves the process alive for minutes
with ``status: running``. Instead the handler marks the run ``interrupted`` in summary.json, ends
every process the run started (Ray's GCS, raylet and workers are descendants of this process), and
exits at once. Ledger appends are SQLite transactions, so a ledger is never left half-written.

Python runs signal handlers in the main thread only, and only between bytecodes. When the kernel
delivers the signal to one of Ray's native threads, the main thread (blocked joining Flower's worker
threads) never wakes to run it. So the signal's number also goes to a wakeup pipe
(``signal.set_wakeup_fd``) that a watcher thread reads: whichever sees the signal first stops the run.
One signal therefore usually reaches both paths; only a second signal (a path seeing its second one) skips
the clean stop, and never before summary.json says ``interrupted``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; an empty list elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def end_processes(pids: list[int], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class StopOnSignal:
    """Installed by ``run_simulation`` in the main thread; re-installed after Ray sets its own SIGTERM handler."""

    def __init__(
        self, out_dir: Path, cleanup_dirs: list[str] | None = None, announce: Callable[[str], None] | None = None
    ) -> None:
        self.out_dir = out_dir
        self.cleanup_dirs = cleanup_dirs or []
        self.announce = announce or (lambda text: print(text, file=sys.stderr, flush=True))
        self.recorder: Any = None
        self.previous: dict[int, Any] = {}
        self.stopping = False
        self._lock = threading.Lock()
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup_fd: int | None = None
        self.marked = False  # summary.json says "interrupted" (or could not be written)
        self._seen = {"handler": 0, "pipe": 0}  # signals each path saw: the same signal reaches both

    def attach(self, recorder: Any) -> None:
        """The ServerApp hands over its RunRecorder (server.app.make_server_app(on_recorder=...))."""
        self.recorder = recorder

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the first install (main thread) still holds
        for sig in STOP_SIGNALS:
            handler = signal.getsignal(sig)
            if handler != self.handle:
                self.previous.setdefault(sig, handler)
                signal.signal(sig, self.handle)
        if self._pipe is None:
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._pipe = (r, w)
            self._previous_wakeup_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            threading.Thread(target=self._watch, args=(r,), name="privatune-stop-watcher", daemon=True).start()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd if self._previous_wakeup_fd is not None else -1)
            _, w = self._pipe
            self._pipe = None
            os.close(w)  # the watcher reads EOF and ends

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                os.close(fd)
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    self.handle(signum, None)

    def handle(self, signum: int, frame: object) -> None:
        path = "pipe" if frame is None else "handler"
        self._seen[path] += 1
        if not self._lock.acquire(blocking=False):
            # The other path is already stopping. The same signal seen here is no reason to hurry; a second
            # one means "go now", but only once the summary is marked.
            if self._seen[path] >= 2 and self.marked:
                os._exit(128 + signum)
            return
        self.stopping = True
        name = signal.Signals(signum).name
        self.announce(f"{name} received: stopping the simulation")
        procs = descendants(os.getpid())
        self._mark_interrupted(name)
        self.marked = True
        end_processes(procs)
        for d in self.cleanup_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.announce(f"interrupted: partial results in {self.out_dir}/ (summary.json status 'interrupted')")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    def _mark_interrupted(self, name: str) -> None:
        reason = f"stopped by {name}"
        rec = self.recorder
        try:
            if rec is not None:
                rec.mark_ended("interrupted", reason)
                return
            from privatune.server.run_record import write_json_atomic

            write_json_atomic(
                self.out_dir / "summary.json",
                {"status": "interrupted", "stopped_reason": reason, "rounds_completed": 0},
            )
        except Exception as err:  # the exit must happen even if the disk is full
            self.announce(f"could not write summary.json: {err}")
