"""Fault campaign against the ledgers: bit flips, truncations and lost journal files, each case classified.

    python -m privatune.simulations.ledger_campaign                      # 3,000 bit flips + truncations + lost-journal cases
    python -m privatune.simulations.ledger_campaign --flips 300 --seed 7
    python -m privatune.simulations.ledger_campaign --bench-appends 200  # also time one append, three durability designs

Every case starts from the same pair of intact ledgers (a site ledger and a server ledger, built here with fixed
contents), damages a copy and runs the verifier on it. A case is

- **detected** when ``verify_chain`` reports at least one problem;
- **benign** when it reports none and the damaged copy, reopened, holds exactly the rows of every table
  (``sqlite_master`` included, rowids included, text compared as raw bytes) of the original: the flip hit bytes
  that carry no data (free space in a page, unused header fields, the change counter);
- an **undetected change** when it reports none but some row differs (or can no longer be read) -- must be 0;
- a **verifier exception** when ``verify_chain`` raised instead of reporting -- must be 0.

Lost-journal cases append N spends through ``SiteLedger`` while another connection holds the file open, delete
the ``-wal``, ``-shm`` and ``-journal`` files, and reopen: **data lost** counts acknowledged spends that are gone
without the verifier reporting it (must be 0).

Bit positions are drawn (seeded) half uniformly over the whole file and half over the bytes that are not zero
(where the data is), so the campaign does not spend most of its cases on empty page space.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.ledger import (
    LEDGER_SUFFIX,
    SERVER_LEDGER_NAME,
    LedgerError,
    ServerLedger,
    SiteLedger,
    SpendEntry,
    site_ledger_filename,
    verify_chain,
)

OUTCOMES = ("detected", "benign", "undetected", "exception")


@dataclass
class CampaignResult:
    """Counts per outcome, and a few examples of the outcomes that must not happen."""

    cases: int = 0
    detected: int = 0
    benign: int = 0
    undetected: int = 0
    exceptions: int = 0
    data_lost: int = 0
    examples: list[str] = field(default_factory=list)

    def count(self, outcome: str, example: str = "") -> None:
        self.cases += 1
        key = {"exception": "exceptions"}.get(outcome, outcome)
        setattr(self, key, getattr(self, key) + 1)
        if outcome in ("undetected", "exception") and len(self.examples) < 10:
            self.examples.append(example)

    def merge(self, other: CampaignResult) -> None:
        for name in ("cases", "detected", "benign", "undetected", "exceptions", "data_lost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


def spend(run_id: str, rnd: int, eps: float, dataset: str = "ds-1", site: str = "s1") -> SpendEntry:
    """A valid spend row with fixed timestamps (the campaign's ledgers are reproducible but for created_at)."""
    stamp = f"2026-01-01T{rnd // 3600 % 24:02d}:{rnd // 60 % 60:02d}:{rnd % 60:02d}.000000+00:00"
    return SpendEntry(
        run_id=run_id,
        round=rnd,
        site_id=site,
        dataset_fingerprint=dataset,
        params_fingerprint="p-1",
        noise_multiplier=1.1,
        sample_rate=0.05,
        steps=20,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant="rdp",
        epsilon_run=0.5 * rnd,
        epsilon_dataset=eps,
        max_epsilon=8.0,
        started_at=stamp,
        recorded_at=stamp,
    )


def build_site_ledger(path: Path, rows: int = 20) -> Path:
    ledger = SiteLedger(path)
    for i in range(1, rows + 1):
        run = "run-a" if i <= rows // 2 else "run-b"
        ledger.append(spend(run, (i - 1) % max(1, rows // 2) + 1, 0.5 * i, dataset="ds-1" if i % 3 else "ds-2"))
    return path


def build_server_ledger(path: Path, rounds: int = 6) -> Path:
    ledger = ServerLedger(path)
    ledger.record_run("run-a", {"num-server-rounds": rounds, "dp": True}, "plain")
    for rnd in range(1, rounds + 1):
        for client in ("s1", "s2"):
            ledger.record_report(
                "run-a",
                rnd,
                client,
                7,
                status="trained",
                noise_multiplier=1.1,
                sample_rate=0.05,
                steps=20,
                max_grad_norm=1.0,
                delta=1e-5,
                accountant="rdp",
                epsilon_reported=0.5 * rnd,
                dataset_fingerprint="ds-1",
                recorded_at=f"2026-01-01T00:01:{rnd:02d}.000000+00:00",
            )
    return path


def dump_tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (``sqlite_master`` included, with rowids), text as raw bytes: what "no data
    changed" is checked against. Raises sqlite3.Error when the file cannot be read."""
    conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    conn.text_factory = bytes
    try:
        out = {
            "sqlite_master": conn.execute(
                "SELECT type, name, tbl_name, rootpage, sql FROM sqlite_master ORDER BY type, name"
            ).fetchall()
        }
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name").fetchall():
            label = name.decode("utf-8", "replace")
            quoted = '"' + label.replace('"', '""') + '"'
            out[label] = conn.execute(f"SELECT rowid, * FROM {quoted} ORDER BY rowid").fetchall()
        return out
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------------------------
# Cases


def classify(damaged: Path, original_dump: dict[str, list[tuple[Any, ...]]]) -> tuple[str, str]:
    """(outcome, why) for one damaged copy."""
    try:
        problems = verify_chain(damaged)
    except Exception as exc:
        return "exception", f"{type(exc).__name__}: {exc}"
    if problems:
        return "detected", problems[0].describe()
    try:
        same = dump_tables(damaged) == original_dump
    except sqlite3.Error as exc:
        return "undetected", f"verified clean but its rows cannot be read: {exc}"
    return ("benign", "") if same else ("undetected", "verified clean but some row differs from the original")


def flip_campaign(original: Path, flips: int, seed: int, workdir: Path) -> CampaignResult:
    """``flips`` single-bit flips of ``original``, each on a fresh copy, classified."""
    data = original.read_bytes()
    reference = dump_tables(original)
    nonzero = [i for i, b in enumerate(data) if b]
    rng = random.Random(seed)
    result = CampaignResult()
    target = workdir / ("flip-" + original.name)
    for case in range(flips):
        offset = rng.randrange(len(data)) if case % 2 == 0 else rng.choice(nonzero)
        bit = rng.randrange(8)
        damaged = bytearray(data)
        damaged[offset] ^= 1 << bit
        _write_fresh(target, bytes(damaged))
        outcome, why = classify(target, reference)
        result.count(outcome, f"{original.name} byte {offset} bit {bit}: {why}")
    return result


def truncation_campaign(original: Path, cases: int, seed: int, workdir: Path) -> CampaignResult:
    """The file cut at 0 bytes, at page boundaries and at random lengths."""
    data = original.read_bytes()
    reference = dump_tables(original)
    rng = random.Random(seed)
    lengths = [0, 1, 100, 4096] + [rng.randrange(len(data)) for _ in range(max(0, cases - 4))]
    result = CampaignResult()
    target = workdir / ("cut-" + original.name)
    for n in lengths[:cases]:
        _write_fresh(target, data[:n])
        outcome, why = classify(target, reference)
        result.count(outcome, f"{original.name} cut to {n} bytes: {why}")
        if outcome == "undetected":
            result.data_lost += 1
    return result


def lost_journal_campaign(cases: int, workdir: Path, seed: int) -> CampaignResult:
    """Append N spends while another connection holds the ledger open, delete its side files, reopen."""
    rng = random.Random(seed)
    result = CampaignResult()
    for case in range(cases):
        folder = workdir / f"journal-{case}"
        folder.mkdir()
        path = folder / site_ledger_filename("s1")
        ledger = SiteLedger(path)
        holder = sqlite3.connect(path)  # an open reader/writer, as a second process would be
        holder.execute("SELECT count(*) FROM spend").fetchone()
        n = rng.randint(1, 20)
        for i in range(1, n + 1):
            ledger.append(spend("run-a", i, 0.5 * i))
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(path) + suffix)
        holder.close()
        try:
            problems = verify_chain(path)
            kept = len(SiteLedger(path, verify=False).entries())
        except LedgerError as exc:
            result.count("detected", str(exc))
            continue
        except Exception as exc:
            result.count("exception", f"lost journal, {n} appends: {type(exc).__name__}: {exc}")
            continue
        if problems:
            result.count("detected", problems[0].describe())
        elif kept == n:
            result.count("benign")  # nothing acknowledged was lost
        else:
            result.count("undetected", f"lost journal: {n - kept} of {n} acknowledged spends gone, verified clean")
            result.data_lost += n - kept
        shutil.rmtree(folder)
    return result


def _write_fresh(target: Path, content: bytes) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(target) + suffix)
    target.write_bytes(content)


def run_campaign(
    flips: int = 3000, seed: int = 0, truncations: int = 40, journal_cases: int = 10, workdir: Path | None = None
) -> dict[str, CampaignResult]:
    """The whole campaign: results per part ("flips", "truncations", "lost journal") and "total"."""
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="privatune-ledger-campaign-")) if workdir is None else Path(workdir)
    try:
        site = build_site_ledger(work / site_ledger_filename("s1"))
        server = build_server_ledger(work / SERVER_LEDGER_NAME)
        parts = {
            "flips": CampaignResult(),
            "truncations": CampaignResult(),
            "lost journal": lost_journal_campaign(journal_cases, work, seed),
        }
        half = flips // 2
        parts["flips"].merge(flip_campaign(site, flips - half, seed, work))
        parts["flips"].merge(flip_campaign(server, half, seed + 1, work))
        parts["truncations"].merge(truncation_campaign(site, truncations - truncations // 2, seed, work))
        parts["truncations"].merge(truncation_campaign(server, truncations // 2, seed + 1, work))
        total = CampaignResult()
        for part in parts.values():
            total.merge(part)
        parts["total"] = total
        return parts
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Append cost of three durability designs


def bench_appends(n: int, workdir: Path) -> dict[str, float]:
    """Median milliseconds per append over ``n`` appends: ``SiteLedger.append`` (rollback journal,
    synchronous=FULL: what privatune does), and the same transaction in WAL mode with and without a checkpoint
    after every commit. The three designs take turns append by append, so drifting load on a shared machine
    (other processes' fsyncs) hits them alike."""
    ledger = SiteLedger(workdir / f"bench-delete{LEDGER_SUFFIX}")
    wal = {checkpoint: workdir / f"bench-wal-{checkpoint}{LEDGER_SUFFIX}" for checkpoint in (True, False)}
    for path in wal.values():
        SiteLedger(path)
    labels: dict[str | bool, str] = {  # "delete", or a WAL design: checkpoint after each append or not
        "delete": "rollback journal (privatune)",
        True: "WAL, checkpoint after each append",
        False: "WAL, no checkpoint (before)",
    }
    times: dict[str | bool, list[float]] = {key: [] for key in labels}
    for i in range(1, n + 1):
        for key in labels:
            t = time.perf_counter()
            if isinstance(key, bool):
                _wal_append(wal[key], key, i)
            else:
                ledger.append(spend("run-a", i, 0.5 * i))
            times[key].append(time.perf_counter() - t)
    return {labels[key]: 1000 * statistics.median(ts) for key, ts in times.items()}


def _wal_append(path: Path, checkpoint: bool, i: int) -> None:
    """The same transaction as SiteLedger.append, on a WAL-mode connection (for the timing comparison only)."""
    from dataclasses import asdict

    from privatune.common.ledger.storage import _insert_row

    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        _insert_row(conn, path, "privatune.site-ledger", "spend", asdict(spend("run-a", i, 0.5 * i)))
        conn.execute("COMMIT")
        if checkpoint:
            conn.execute("PRAGMA wal_checkpoint(FULL)")
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flips", type=int, default=3000)
    parser.add_argument("--truncations", type=int, default=40)
    parser.add_argument("--journal-cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bench-appends", type=int, default=0, metavar="N", help="also time N appends with each durability design"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    parts = run_campaign(args.flips, args.seed, args.truncations, args.journal_cases)
    print(f"{'part':<14}{'cases':>7}{'detected':>10}{'benign':>8}{'exceptions':>12}{'undetected':>12}{'lost':>6}")
    for name, r in parts.items():
        print(
            f"{name:<14}{r.cases:>7}{r.detected:>10}{r.benign:>8}{r.exceptions:>12}{r.undetected:>12}{r.data_lost:>6}"
        )
    total = parts["total"]
    print(
        f"cases tried {total.cases}, detected {total.detected}, benign {total.benign}, verifier exceptions "
        f"{total.exceptions}, undetected changes {total.undetected}, data lost {total.data_lost} "
        f"(seed {args.seed}, {time.perf_counter() - t0:.1f} s)"
    )
    for example in total.examples:
        print("  !", example)
    if args.bench_appends:
        with tempfile.TemporaryDirectory(prefix="privatune-ledger-bench-") as tmp:
            for label, ms in bench_appends(args.bench_appends, Path(tmp)).items():
                print(f"append, {label}: {ms:.2f} ms (median of {args.bench_appends})")
    return 0 if total.exceptions == 0 and total.undetected == 0 and total.data_lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
