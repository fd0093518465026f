"""Checking command-line input before any work starts: the usage error, key=value strings, numbers,
resources and output files. Separate so every command group checks its options the same way."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input; the message names the option and the fix."""


def describe_os_error(err: OSError) -> str:
    """One line for a file error: the path and why (a symlink loop or a folder named as a file spelled out)."""
    import errno

    what = err.filename if err.filename is not None else ""
    why = "symlink loop" if err.errno == errno.ELOOP else (err.strerror or str(err))
    if isinstance(err, IsADirectoryError):
        return f"{what} is a folder; give a file path"
    return f"{what}: {why}" if what else why


def parse_kv(text: str, option: str = "--run-config") -> dict[str, str]:
    """`"k=v k2='a b'"` -> dict, the syntax of Flower's --run-config / --node-config."""
    import shlex

    try:
        tokens = shlex.split(text or "")
    except ValueError:
        raise UsageError(_quote_problem(text, option)) from None
    out: dict[str, str] = {}
    for tok in _join_lists(tokens):
        if "=" not in tok:
            raise UsageError(f"{option}: '{tok}' is not key=value; write e.g. {option} \"lr=0.5 batch-size=32\"")
        k, v = tok.split("=", 1)
        if not k.strip():
            raise UsageError(f"{option}: '{tok}' has no key before '='")
        out[k.strip()] = v.strip()
    return out


def _join_lists(tokens: list[str]) -> list[str]:
    """Rejoin a list value the shell split at its spaces (`labels=["neg", "pos"]`), as Flower reads it whole."""
    joined: list[str] = []
    for tok in tokens:
        if joined and joined[-1].partition("=")[2].startswith("[") and not joined[-1].endswith("]"):
            joined[-1] += " " + tok
        else:
            joined.append(tok)
    return joined


def _quote_problem(text: str, option: str) -> str:
    """Which key opened a quote that never closes, and how to quote it."""
    import re

    quote, key = None, "?"
    for m in re.finditer(r"(?:^|\s)([\w.-]+)=|['\"]", text):
        if m.group(1) is not None and quote is None:
            key = m.group(1)
        elif m.group(1) is None:
            ch = m.group(0)
            if quote is None:
                quote = ch
            elif quote == ch:
                quote = None
    q = quote or "'"
    return (
        f"{option}: the value of '{key}' opens a {q} quote that is never closed; close it "
        f"({key}={q}...{q}) or drop it: numbers need no quotes (lr=0.5), text with spaces takes one pair "
        f"(text-column='my column')"
    )


def finite(value: float, option: str, minimum: float, strict: bool = False, maximum: float | None = None) -> float:
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if maximum is not None:
        ok = ok and value <= maximum
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        if maximum is not None:
            bound += f" and <= {maximum:g}"
        raise UsageError(f"{option} must be a finite number {bound}, got {value:g}")
    return value


def check_resources(client_cpus: float, client_gpus: float, ray_address: str = "") -> None:
    """Ray makes no client actor (and the run waits forever) when one client asks for more than the machine (or,
    with ``ray_address``, the largest node of that cluster) has."""
    if ray_address:
        finite(client_cpus, "--client-cpus", 0.0, strict=True)
        finite(client_gpus, "--client-gpus", 0.0)
        check_ray_cluster(ray_address, client_cpus, client_gpus)
        return
    cpus = os.cpu_count() or 1
    finite(client_cpus, "--client-cpus", 0.0, strict=True, maximum=float(cpus))
    finite(client_gpus, "--client-gpus", 0.0)
    if client_gpus > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise UsageError("--client-gpus > 0 but this machine has no CUDA GPU; Flower would start no clients")
        if client_gpus > gpus:
            raise UsageError(f"--client-gpus {client_gpus:g} is more than the {gpus} GPU(s) this machine has")


def check_ray_cluster(address: str, client_cpus: float, client_gpus: float) -> None:
    """Join the cluster at ``address`` once before anything is claimed: it must be reachable, and one of its nodes
    must hold a client's CPUs and GPUs (a client that fits no node would wait forever)."""
    import socket

    import ray

    host, sep, port = address.rpartition(":")
    if address != "auto" and not address.startswith("ray://"):
        if not sep or not host or not port.isdigit():
            raise UsageError(f"--ray-address {address!r}: give the head's HOST:PORT (e.g. 10.0.0.5:6379) or auto")
        try:  # Ray itself retries a dead address for minutes: a plain TCP probe answers in seconds
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as err:
            raise UsageError(
                f"--ray-address {address}: nothing listens there ({err.strerror or err}); start the cluster with "
                "`ray start --head --port PORT` and give its HOST:PORT (docs/ray-cluster.md)"
            ) from None
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no FutureWarning on a CPU cluster
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as err:  # ConnectionError, or a ValueError for a malformed address
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"--ray-address {address}: no running Ray cluster answers there ({first}); start one with "
            "`ray start --head` and give its HOST:PORT (docs/ray-cluster.md)"
        ) from None
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
    if not any(n.get("CPU", 0) >= client_cpus and n.get("GPU", 0) >= client_gpus for n in nodes):
        largest = max(((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes), default=(0, 0))
        raise UsageError(
            f"--ray-address {address}: no node of the cluster has --client-cpus {client_cpus:g} and --client-gpus "
            f"{client_gpus:g} free for one client (its largest node: {largest[0]:g} CPUs, {largest[1]:g} GPUs)"
        )


def check_output_file(path: Path, option: str) -> None:
    """Before the work: the file's folder exists (or can be made) and takes a new file."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".privatune-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"{option} {path}: cannot write in {path.parent} ({err.strerror or err}); choose a writable path"
        ) from None


# Run-config keys a run-config file may not set: the command's own options say where a run goes.
NOT_IN_CONFIG_FILE = ("out-dir", "sim-ledger-dir")


def read_run_config_file(path: Path, option: str = "--config") -> dict[str, object]:
    """A TOML file of run-config keys (``lr = 0.5``; what ``privatune tune`` writes for its best trial), flat;
    the keys are checked by RunConfig as any run config's are."""
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"{option} {path}: {describe_os_error(err)}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(
            f"{option} {path}: not valid TOML ({err}); write one run-config key per line: lr = 0.5"
        ) from None
    nested = sorted(k for k, v in data.items() if isinstance(v, dict))
    if nested:
        raise UsageError(
            f"{option} {path}: tables [{', '.join(nested)}] are not run-config keys; write the keys at the top level "
            "(lr = 0.5, no [section])"
        )
    refused = sorted(set(data) & set(NOT_IN_CONFIG_FILE))
    if refused:
        raise UsageError(f"{option} {path}: {', '.join(refused)} cannot come from a file; use --out for the folder")
    return dict(data)
