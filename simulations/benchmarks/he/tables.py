"""The HE benchmark's printed tables (pure: the results dict in, text out; pasted into docs/benchmarks.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from privatune.simulations.benchmarks.he.records import per_million
from privatune.simulations.benchmarks.report import aligned_table, fmt_bytes, fmt_num


def render(result: Mapping[str, Any]) -> str:
    """The tables printed at the end (and pasted into docs/benchmarks.md)."""
    cases = [c for c in result["cases"] if "error" not in c]
    lines = []
    rows = []
    for c in cases:
        rt = c["round_time"]
        rows.append(
            [
                c["case"]["name"],
                f"{c['records']['num_params']:,}",
                str(c["case"]["clients"]),
                f"{fmt_num(rt['plain']['steady_median_s'])} ({rt['plain']['steady_samples']})",
                f"{fmt_num(rt['he']['steady_median_s'])} ({rt['he']['steady_samples']})",
                f"{fmt_num(rt['ratio_steady'])}x",
                f"{fmt_num(rt['modelled_ratio'], '.3f')}x",
                f"{fmt_num(rt['plain']['steady_slowest_training_median_s'])} / {fmt_num(rt['he']['steady_slowest_training_median_s'])}",
                f"{fmt_num(rt['plain']['first_round_median_s'], '.1f')} / {fmt_num(rt['he']['first_round_median_s'], '.1f')}",
                ""
                if rt["goal"] is None
                else ("met" if rt["ratio_steady"] <= rt["goal"] else "MISSED") + f" (<= {rt['goal']}x)",
            ]
        )
    lines.append("Round wall time, seconds (median over steady rounds >= 2 of all repeats; samples in brackets)")
    lines.append(
        aligned_table(
            [
                "config",
                "params",
                "clients",
                "plain s",
                "HE s",
                "HE/plain",
                "modelled",
                "training s plain/HE",
                "round 1 plain/HE s",
                "goal",
            ],
            rows,
        )
    )

    rows = []
    for c in cases:
        b, br, n = c["records"]["bytes"], c["bytes_ratio"], c["records"]["num_params"]
        for what in ("upload", "download"):
            p, h = b[f"{what}_plain"]["proto"], b[f"{what}_he"]["proto"]
            rows.append(
                [
                    c["case"]["name"],
                    what,
                    fmt_bytes(p),
                    fmt_bytes(h),
                    f"{h / n:.1f}",
                    f"{fmt_num(br[what], '.1f')}x",
                    ("met" if br[what] <= br["goal"] else "MISSED") + f" (<= {br['goal']:g}x)",
                ]
            )
    lines.append(
        "\nBytes on the wire per client and message (protobuf ArrayRecord as Flower serialises it; "
        "per round: 1 upload, 2 downloads)"
    )
    lines.append(aligned_table(["config", "message", "plaintext", "HE", "HE B/param", "HE/plain", "goal"], rows))

    rows = []
    for c in cases:
        ops, wall, n, k = (
            c["records"]["ops_cpu_seconds"],
            c["records"]["ops_wall_seconds"],
            c["records"]["num_params"],
            c["records"]["clients"],
        )
        rows.append(
            [
                c["case"]["name"],
                f"{n:,} ({c['records']['num_ciphertexts']} ct)",
                f"{per_million(ops['encrypt'], n):.3f}",
                f"{per_million(ops['aggregate'] / k, n):.3f}",
                f"{per_million(ops['decrypt'], n):.3f}",
                f"{1e3 * ops['encrypt']:.1f} / {1e3 * ops['aggregate']:.1f} / {1e3 * ops['decrypt']:.1f}",
                f"{1e3 * wall['encrypt']:.1f} / {1e3 * wall['aggregate']:.1f} / {1e3 * wall['decrypt']:.1f}",
                f"{1e3 * ops['ctx_load']:.1f}",
                f"{1e3 * ops['plain_encode']:.2f} / {1e3 * ops['plain_aggregate']:.2f} / {1e3 * ops['plain_decode']:.2f}",
            ]
        )
    lines.append(
        "\nHE operations (median CPU seconds of this process; aggregate = all K replies, "
        "s/M per reply; ct = ciphertexts)"
    )
    lines.append(
        aligned_table(
            [
                "config",
                "params",
                "enc s/M",
                "agg s/M/reply",
                "dec s/M",
                "enc/agg(K)/dec ms cpu",
                "same, wall ms",
                "key load ms",
                "plain enc/agg/dec ms",
            ],
            rows,
        )
    )

    rows = []
    for c in cases:
        a = c["accuracy"]
        rows.append(
            [
                c["case"]["name"],
                " ".join(f"{100 * x:.2f}" for x in a["plain"]),
                " ".join(f"{100 * x:.2f}" for x in a["he"]),
                f"{fmt_num(a['median_he_minus_plain_points'], '+.2f')}",
                f"{c['records']['he_vs_fedavg_relative_error']:.1e} / {c['records']['plain_vs_fedavg_relative_error']:.1e}",
                ("met" if abs(a["median_he_minus_plain_points"]) <= a["goal_points"] else "MISSED")
                + f" (<= {a['goal_points']} pts)",
            ]
        )
    lines.append(
        "\nTest accuracy, %, per repeat (same seeds); error of the aggregate (HE: decrypted, float32 like the "
        "model; plain: Flower's FedAvg) vs float64 FedAvg of the same updates"
    )
    lines.append(aligned_table(["config", "plaintext", "HE", "HE - plain pts", "rel. error HE / plain", "goal"], rows))

    rows = []
    for c in cases:
        pb = c["alternatives_plain_bytes"]
        for a in c["alternatives"]:
            if "error" in a:
                rows.append([c["case"]["name"], a["params"], "-", "-", "-", a["error"][:60]])
                continue
            rows.append(
                [
                    c["case"]["name"],
                    a["params"],
                    str(a["num_ciphertexts"]),
                    f"{fmt_bytes(a['upload'])} ({a['upload'] / pb['upload']:.1f}x)",
                    f"{fmt_bytes(a['download'])} ({a['download'] / pb['download']:.1f}x)",
                    f"{a['relative_error']:.1e}",
                ]
            )
    lines.append(
        "\nCKKS parameter alternatives on the same updates (bytes and error only; the default is what runs; "
        "error measured on float64 updates, i.e. the CKKS error itself)"
    )
    lines.append(
        aligned_table(["config", "parameters", "ct", "upload (vs plain)", "download (vs plain)", "rel. error"], rows)
    )
    return "\n".join(lines)
