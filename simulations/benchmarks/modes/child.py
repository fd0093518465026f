"""One configuration of the modes benchmark, in a process of its own (so its peak memory is its own).

    python -m privatune.simulations.benchmarks.modes.child SPEC.json

``SPEC.json`` holds ``run_config`` (kebab-case values, as ``privatune simulate`` builds them), ``clients`` and
``out`` (the run folder). The run goes through :func:`privatune.simulations.simulate.run_simulation`, the code
behind ``privatune simulate``, with ``verbose`` on so that the sites' log lines (their training time per round)
reach this process's output, which the parent keeps. At the end ``OUT/child.json`` gets the summary's status,
``ru_maxrss`` of this process and of its reaped children, and the peak resident memory (``VmHWM``) of every
descendant process seen while the run went on, by process title (the simulated clients are
``ray::ClientAppActor``), and the highest total resident memory of the whole process tree at one sample.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def descendants(root: int) -> list[int]:
    """Every process under ``root`` (Linux ``/proc``); empty where there is no ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in PROC.glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def rss_kib(pid: int) -> int:
    """A process's resident memory now (``VmRSS``, KiB); 0 once it is gone."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def peak_kib(pid: int) -> tuple[str, int] | None:
    """A process's title and its peak resident memory so far (``VmHWM``, KiB), or None once it is gone."""
    try:
        title = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return title, int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemoryWatch:
    """Polls this process's descendants every ``interval`` seconds and keeps each one's highest ``VmHWM``."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root, self.interval = root, interval
        self.peaks: dict[int, tuple[str, int]] = {}
        #: The highest sum of resident memory over this process and all its descendants at one sample (KiB):
        #: the whole tree's peak, which no per-process figure gives (Ray's workers are the raylet's children).
        self.tree_peak = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        pids = descendants(self.root)
        for pid in pids:
            got = peak_kib(pid)
            if got is not None and got[1] >= self.peaks.get(pid, ("", -1))[1]:
                self.peaks[pid] = got
        self.tree_peak = max(self.tree_peak, sum(rss_kib(pid) for pid in [self.root, *pids]))
        self.max_processes = max(self.max_processes, len(pids))

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def by_title(self) -> dict[str, int]:
        """The highest peak (KiB) among the processes of each title."""
        out: dict[str, int] = {}
        for title, kib in self.peaks.values():
            out[title] = max(kib, out.get(title, 0))
        return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import os

    from privatune.common.config import RunConfig
    from privatune.simulations.simulate import run_simulation

    out = Path(spec["out"])
    cfg = RunConfig.from_flower(spec["run_config"])
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    with MemoryWatch(os.getpid()) as watch:
        try:
            summary = run_simulation(cfg, int(spec["clients"]), out, verbose=True)
            result["status"] = summary.get("status")
        except Exception as err:  # the parent records the failure and goes on with the next config
            result["status"] = "failed"
            result["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
    result["seconds"] = time.perf_counter() - t0
    result["ru_maxrss_self_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["ru_maxrss_children_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_kib_by_title"] = watch.by_title()
    result["tree_peak_rss_kib"] = watch.tree_peak
    result["max_descendants"] = watch.max_processes
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m privatune.simulations.benchmarks.modes.child SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    result = run(spec)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "child.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
