"""How long one round takes at a partner site, per fine-tuning mode, on this machine's CPU.

A site's engineer needs it to set the coordinator's ``round-timeout`` (default 900 s) and to know what a run
costs. The round is the real one: the ClientApp's ``train`` on a message as the coordinator sends it, the site
reading its own CSV/npz file, writing its ledger, extracting features or running DP-SGD over the encoder, and
encoding its reply. Round 1 includes what a site does once (loading the backbone, the head's feature pass);
round 2 reuses it, as every later round of a run does. Each (preset, mode) runs in a fresh process, so round 1
pays the backbone's loading as a site's first round does.

    python -m privatune.simulations.benchmarks.site_round [--records 500] [--modes head,last-k,lora,full]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privatune.common.config import RunConfig
from privatune.common.datasets import load_dataset
from privatune.simulations.benchmarks.report import (
    PACKAGE,
    aligned_table,
    bench_parser,
    environment,
    markdown_table,
    print_flush,
    results_folder,
    run_header,
    write_json,
)

NAME = "site_round"
PRESETS = ("sms-spam", "digits")
MODES = ("head", "last-k", "lora", "full")


@dataclass(frozen=True)
class Plan:
    records: int
    rounds: int
    presets: tuple[str, ...]
    modes: tuple[str, ...]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


@dataclass
class RoundTime:
    preset: str
    model: str
    mode: str
    records: int
    local_epochs: int
    batch_size: int
    round_s: list[float]  # round 1, round 2, ...
    status: list[str]

    @property
    def per_1000_epoch_s(self) -> float:
        """The last round's seconds per 1,000 records per local epoch: how a round scales with a site's data."""
        return self.round_s[-1] / self.local_epochs * 1000.0 / self.records


def write_site_file(preset: str, records: int, folder: Path) -> tuple[Path, str]:
    """The preset's first ``records`` records as the site file a partner would hold (csv for text, npz)."""
    data = load_dataset(preset, max_records=records, seed=0)
    if data.kind == "text":
        path = folder / f"{preset}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for text, label in zip(data.inputs, data.labels, strict=True):
                writer.writerow([text, data.label_names[int(label)]])
        return path, "csv"
    path = folder / f"{preset}.npz"
    pixels = np.clip(np.asarray(data.inputs)[:, 0] * 0.3081 + 0.1307, 0.0, 1.0)  # back to [0, 1] grayscale
    np.savez(path, x=(pixels * 255).round().astype(np.uint8), y=data.labels)
    return path, "npz"


def _message(cfg: RunConfig, server_round: int) -> Any:
    """The train message the coordinator's strategy sends (its run config, backbone fingerprint, weights)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from privatune.common.protocol import (
        KEY_BACKBONE_FINGERPRINT,
        KEY_RUN_ID,
        KEY_SERVER_ROUND,
        RECORD_ARRAYS,
        RECORD_CONFIG,
    )
    from privatune.server.app import initial_weights

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # we play the SuperLink
    start = initial_weights(cfg, "site-round-bench")
    values = {**cfg.to_flower(), KEY_RUN_ID: "site-round-bench", KEY_SERVER_ROUND: server_round}
    values[KEY_BACKBONE_FINGERPRINT] = start.backbone_fingerprint
    content = RecordDict({RECORD_CONFIG: ConfigRecord(values), RECORD_ARRAYS: start.arrays})
    return Message(content=content, dst_node_id=1, message_type="train")


def time_rounds(preset: str, mode: str, records: int, rounds: int, work: Path) -> RoundTime:
    """``rounds`` real site rounds of one (preset, mode); the site's data, ledger and cache live in ``work``."""
    from flwr.app import Context, RecordDict

    from privatune.client.app import train
    from privatune.common.protocol import KEY_STATUS, RECORD_STATUS

    folder = work / f"{preset}-{mode}"
    folder.mkdir(parents=True)
    path, fmt = write_site_file(preset, records, folder)
    cfg = RunConfig(preset=preset, mode=mode, num_server_rounds=rounds, target_epsilon=8.0).resolved()
    node: dict[str, bool | float | int | str] = {
        "site-id": "bench",
        "data-path": str(path),
        "data-format": fmt,
        "ledger-path": str(folder / "ledger.sqlite"),
        "cache-dir": str(folder / "cache"),
        "device": "cpu",
    }
    times, status = [], []
    for r in range(1, rounds + 1):
        msg = _message(cfg, r)
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        t0 = time.perf_counter()
        reply = train(msg, context)
        times.append(time.perf_counter() - t0)
        status.append(str(reply.content[RECORD_STATUS][KEY_STATUS]))
    return RoundTime(preset, cfg.model, cfg.mode, records, cfg.local_epochs, cfg.batch_size, times, status)


CHILD_MARK = "site-round-result: "


def _in_child(preset: str, mode: str, plan: Plan) -> RoundTime:
    cmd = [sys.executable, "-m", f"{PACKAGE}.{NAME}", "--child", preset, mode]
    cmd += ["--records", str(plan.records), "--rounds", str(plan.rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return RoundTime(**json.loads(line[len(CHILD_MARK) :]))
    raise RuntimeError(f"{preset} {mode}: no result (exit {proc.returncode}): {proc.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(NAME, __doc__ or "")
    parser.add_argument("--records", type=int, default=500, help="records at the site (default 500)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds timed per mode (default 2)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args: argparse.Namespace = parser.parse_args(argv)
    if args.child:  # one (preset, mode) in this fresh process; the parent reads its JSON line
        with tempfile.TemporaryDirectory(prefix="privatune-site-round-") as tmp:
            row = time_rounds(args.child[0], args.child[1], args.records, args.rounds, Path(tmp))
        print(CHILD_MARK + json.dumps(asdict(row)), flush=True)
        return 0
    plan = Plan(args.records, args.rounds, tuple(args.presets.split(",")), tuple(args.modes.split(",")))
    if args.quick:  # the same pipeline, small: 60 records, one round, the cheap modes unless others are named
        modes = plan.modes if args.modes != ",".join(MODES) else ("head", "last-k")
        plan = Plan(60, 1, plan.presets, modes)
    header = run_header(NAME, plan, environment("torch", "opacus", "flwr", torch_threads=_threads()))
    out = results_folder(args.out)
    rows: list[RoundTime] = []
    for preset in plan.presets:
        for mode in plan.modes:
            row = _in_child(preset, mode, plan)
            rows.append(row)
            rounds = ", ".join(f"{s:.1f} s" for s in row.round_s)
            print_flush(f"{preset} {row.mode}: {rounds} ({'/'.join(row.status)})")
    headers = [
        "preset",
        "mode",
        "records",
        "epochs",
        *[f"round {i + 1}" for i in range(plan.rounds)],
        "s / 1k rec / epoch",
    ]
    table = [
        [
            r.preset,
            r.mode,
            str(r.records),
            str(r.local_epochs),
            *[f"{s:.1f} s" for s in r.round_s],
            f"{r.per_1000_epoch_s:.1f}",
        ]
        for r in rows
    ]
    print(aligned_table(headers, table))
    print(markdown_table(headers, table))
    write_json(
        out / "site_round.json",
        {**header, "rows": [{**asdict(r), "per_1000_epoch_s": r.per_1000_epoch_s} for r in rows]},
    )
    return 0 if all(s == "trained" for r in rows for s in r.status) else 1


if __name__ == "__main__":
    raise SystemExit(main())
