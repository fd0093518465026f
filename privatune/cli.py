"""`privatune`: the command line. Each command is thin and imports its side lazily."""

from __future__ import annotations

import functools
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Federated, differentially private fine-tuning.",
)
site_app = typer.Typer(no_args_is_help=True, help="Commands a partner site runs.")
app.add_typer(site_app, name="site")
console = Console()
err_console = Console(stderr=True)


class UsageError(ValueError):
    """Bad command-line input; the message names the option and the fix."""


F = TypeVar("F", bound=Callable[..., Any])


PROJECT_ROOT = Path(__file__).resolve().parents[1]
# privatune's own error classes, by module: each names the key, file or record and the fix.
_ERROR_CLASSES = {
    "privatune.common.config": ("ConfigError",),
    "privatune.client.site_config": ("SiteConfigError",),
    "privatune.client.site_data": ("SiteDataError",),
    "privatune.common.he": ("HEError",),
    "privatune.common.audit": ("AuditInputError",),
    "privatune.common.accounting": ("AccountingError",),
    "privatune.common.ledger": ("LedgerError",),
    "privatune.simulations.canary_audit": ("CanaryAuditError",),
    "privatune.simulations.run_folder": ("RunFolderError",),
}


def _known_errors() -> tuple[type[BaseException], ...]:
    """The loaded privatune error classes (an error can only come from a loaded module), plus file errors."""
    known: list[type[BaseException]] = [UsageError, OSError]
    for module, names in _ERROR_CLASSES.items():
        mod = sys.modules.get(module)
        known += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(known)


def _is_known(err: BaseException) -> bool:
    """A privatune error class, a file error, or a ValueError that privatune's own code raised (its
    messages name the key); a ValueError from inside a library is unexpected."""
    if isinstance(err, _known_errors()):
        return True
    if type(err) is ValueError and err.__traceback__ is not None:
        frames = traceback.extract_tb(err.__traceback__)
        return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PROJECT_ROOT)
    return False


def _innermost_known(err: BaseException) -> BaseException | None:
    """The deepest known error in the cause chain (Flower wraps a ServerApp's in a RuntimeError)."""
    found: BaseException | None = None
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if _is_known(cur):
            found = cur
        cur = cur.__cause__
    return found


def _describe_os_error(err: OSError) -> str:
    import errno

    what = err.filename if err.filename is not None else ""
    why = "symlink loop" if err.errno == errno.ELOOP else (err.strerror or str(err))
    if isinstance(err, IsADirectoryError):
        return f"{what} is a folder; give a file path"
    return f"{what}: {why}" if what else why


def one_line_errors(func: F) -> F:
    """Every command: a known error becomes `error: <one line>` and exit 2; anything else one line and a
    log file holding the traceback (exit 3)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException, KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            from privatune.server.reasons import one_line

            known = _innermost_known(err)
            if known is not None:
                text = _describe_os_error(known) if isinstance(known, OSError) else str(known)
                err_console.print(f"[bold red]error:[/] {escape(one_line(text))}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            log = _write_traceback(err)
            err_console.print(
                f"[bold red]error:[/] unexpected {type(err).__name__}: {escape(one_line(str(err)))} "
                f"(traceback in {log}; please report it)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(3) from None

    return wrapper  # type: ignore[return-value]


def _write_traceback(err: BaseException) -> str:
    fd, path = tempfile.mkstemp(prefix="privatune-error-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(traceback.format_exception(err)))
    return path


def _parse_kv(text: str, option: str = "--run-config") -> dict[str, str]:
    """`"k=v k2='a b'"` -> dict, the syntax of Flower's --run-config / --node-config."""
    import shlex

    try:
        tokens = shlex.split(text or "")
    except ValueError:
        raise UsageError(_quote_problem(text, option)) from None
    out: dict[str, str] = {}
    for tok in tokens:
        if "=" not in tok:
            raise UsageError(f"{option}: '{tok}' is not key=value; write e.g. {option} \"lr=0.5 batch-size=32\"")
        k, v = tok.split("=", 1)
        if not k.strip():
            raise UsageError(f"{option}: '{tok}' has no key before '='")
        out[k.strip()] = v.strip()
    return out


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


def _finite(value: float, option: str, minimum: float, strict: bool = False, maximum: float | None = None) -> float:
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if maximum is not None:
        ok = ok and value <= maximum
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        if maximum is not None:
            bound += f" and <= {maximum:g}"
        raise UsageError(f"{option} must be a finite number {bound}, got {value:g}")
    return value


def check_resources(client_cpus: float, client_gpus: float) -> None:
    """Ray makes no client actor (and the run waits forever) when one client asks for more than the machine has."""
    cpus = os.cpu_count() or 1
    _finite(client_cpus, "--client-cpus", 0.0, strict=True, maximum=float(cpus))
    _finite(client_gpus, "--client-gpus", 0.0)
    if client_gpus > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise UsageError("--client-gpus > 0 but this machine has no CUDA GPU; Flower would start no clients")
        if client_gpus > gpus:
            raise UsageError(f"--client-gpus {client_gpus:g} is more than the {gpus} GPU(s) this machine has")


@app.command()
@one_line_errors
def simulate(
    preset: str = typer.Option("sms-spam", help="sms-spam | trec6 | digits"),
    clients: int = typer.Option(10, help="number of simulated clients"),
    rounds: int = typer.Option(0, help="server rounds (0 = the preset's)"),
    epsilon: str = typer.Option("8", help="target epsilon per client over the whole run; 'inf' = no DP"),
    no_dp: bool = typer.Option(False, "--no-dp", help="train without DP (a baseline)"),
    mode: str = typer.Option("", help="head | partial | full (default: the preset's)"),
    partition: str = typer.Option("dirichlet", help="iid | dirichlet"),
    alpha: float = typer.Option(1.0, help="Dirichlet concentration (smaller = more label skew)"),
    seed: int = typer.Option(42, help="simulation seed (>= 0)"),
    secure_aggregation: str = typer.Option("none", "--secure-aggregation", help="none | he"),
    out: Path = typer.Option(Path("runs/latest"), help="output folder (one run per folder)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete the run already in --out first"),
    run_config: str = typer.Option("", "--run-config", help='extra overrides, e.g. "lr=0.5 batch-size=32"'),
    client_cpus: float = typer.Option(1.0, "--client-cpus", help="CPU cores per simulated client"),
    client_gpus: float = typer.Option(0.0, "--client-gpus", help="GPU share per simulated client (0.5 = two per GPU)"),
    verbose: bool = typer.Option(False, "--verbose", help="show Flower's and Ray's logs"),
) -> None:
    """Run a simulated federation on this machine and report accuracy against epsilon.

    Exit codes: 0 completed (or stopped early after training), 1 failed (no round aggregated: the
    reasons are printed), 2 bad input, 130/143 interrupted by SIGINT/SIGTERM.
    """
    from privatune.common.config import RunConfig

    try:
        eps = math.inf if epsilon.strip().lower() in ("inf", "infinity") else float(epsilon)
    except ValueError:
        raise UsageError(f"--epsilon must be a number or 'inf', got {epsilon!r}") from None
    if clients < 1:
        raise UsageError(f"--clients must be at least 1, got {clients}")
    if rounds < 0:
        raise UsageError(f"--rounds must be >= 1 (or 0 for the preset's), got {rounds}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    check_resources(client_cpus, client_gpus)
    values: dict[str, object] = {
        "preset": preset,
        "target-epsilon": eps,
        "dp": not no_dp and not math.isinf(eps),
        "partition": partition,
        "alpha": alpha,
        "seed": seed,
        "secure-aggregation": secure_aggregation,
        "out-dir": str(out),
    }
    if rounds:
        values["num-server-rounds"] = rounds
    if mode:
        values["mode"] = mode
    values.update(_parse_kv(run_config))
    cfg = RunConfig.from_flower(values)
    from privatune.simulations.run_folder import claim
    from privatune.simulations.simulate import confine_writes, prepare_config

    out = claim(out, overwrite)  # one run per folder; a probe file proves it is writable
    confine_writes(out)
    cfg = prepare_config(cfg, clients, out)  # refuse bad sizes and missing keys before Ray starts

    from privatune.simulations.progress import RoundPrinter
    from privatune.simulations.simulate import run_simulation

    printer = RoundPrinter(console, cfg, clients)
    printer.header()
    summary = run_simulation(
        cfg,
        clients,
        out,
        observer=printer,
        verbose=verbose,
        client_gpus=client_gpus,
        client_cpus=client_cpus,
        stop_on_signal=True,
    )
    printer.final(summary, out)
    if summary.get("status") == "failed":
        raise typer.Exit(1)


POLY_MODULUS_DEGREES = (8192, 16384, 32768)  # the ring sizes that hold the default 180-bit modulus at 128-bit security


@app.command()
@one_line_errors
def keygen(
    out: Path = typer.Option(..., help="folder for secret.ctx, public.ctx, fingerprint.txt"),
    poly_modulus_degree: int = typer.Option(0, help="CKKS ring size: 8192, 16384 or 32768 (0 = 8192)"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace existing keys (old checkpoints become undecryptable)"
    ),
) -> None:
    """Make a CKKS context: secret.ctx for the sites only, public.ctx for the server."""
    from privatune.common import he

    if poly_modulus_degree and poly_modulus_degree not in POLY_MODULUS_DEGREES:
        raise UsageError(
            f"--poly-modulus-degree must be one of {', '.join(map(str, POLY_MODULUS_DEGREES))} "
            f"(or 0 for the default), got {poly_modulus_degree}"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the key files")
    params = he.HEParams() if not poly_modulus_degree else he.HEParams(poly_modulus_degree=poly_modulus_degree)
    try:
        paths = he.write_keys(out, params, overwrite=overwrite)
    except FileExistsError:
        raise UsageError(
            f"{out} already holds key files; a new key makes checkpoints made with the old one undecryptable: "
            "choose another --out folder, or pass --overwrite to replace them"
        ) from None
    console.print(f"secret      {paths.secret}")
    console.print(f"public      {paths.public}")
    console.print(f"fingerprint {paths.fingerprint}")
    console.print("[yellow]secret.ctx holds the secret key: give it to the sites only, never to the server.[/]")


@app.command()
@one_line_errors
def decrypt(
    secret_context: Path = typer.Option(..., "--secret-context"),
    checkpoint: Path = typer.Option(...),
    out: Path = typer.Option(...),
) -> None:
    """Decrypt an encrypted global checkpoint into plaintext safetensors (key holders only)."""
    from privatune.common import he

    if secret_context.is_dir():
        raise UsageError(f"--secret-context {secret_context} is a folder; give the secret.ctx file inside it")
    if checkpoint.is_dir():
        raise UsageError(f"--checkpoint {checkpoint} is a folder; give the run's global.he-checkpoint file")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name, e.g. {out / 'global.decrypted.safetensors'}")
    he.decrypt_checkpoint_to_safetensors(secret_context, checkpoint, out)
    console.print(f"wrote {out}")


@app.command()
@one_line_errors
def audit(
    paths: list[Path] = typer.Argument(..., help="ledger files or folders holding them"),
    json_out: Path | None = typer.Option(None, "--json", help="write the machine-readable audit here"),
    report: Path | None = typer.Option(None, help="folder for the Markdown report and its PNG"),
    entries: bool = typer.Option(False, "--entries", help="print every ledger row (wide) instead of the summary"),
) -> None:
    """Verify ledgers, recompute every epsilon, cross-check server against sites; exit 1 on any violation."""
    from privatune.common.audit import audit_paths, json_text, render_table, render_violations, write_report

    if json_out:
        _check_output_file(json_out, "--json")
    rep = audit_paths(paths)
    console.print(render_table(rep, entries=entries))
    if json_out:
        try:
            json_out.write_text(json_text(rep, sort_keys=False))
        except OSError as err:
            raise UsageError(f"--json {json_out}: cannot write ({_describe_os_error(err)})") from None
    if report:
        files = write_report(rep, report)
        for p in (files.markdown, files.plot, files.json):
            console.print(f"wrote {p}")
    if not rep.ok:
        err_console.print(render_violations(rep))
        raise typer.Exit(1)
    console.print("[green]audit clean[/]")


@app.command("canary-audit")
@one_line_errors
def canary_audit(
    preset: str = typer.Option("digits", help="the preset whose client data the canaries join"),
    canaries: int = typer.Option(1000, help="m: canaries, each included with probability 1/2"),
    epsilon: float = typer.Option(8.0, help="target epsilon of the one training run"),
    no_dp: bool = typer.Option(False, "--no-dp", help="train without DP (the control: the bound should be high)"),
    mode: str = typer.Option("", help="head | partial | full (default: partial for images, head for text)"),
    epochs: int = typer.Option(0, help="local epochs (0 = the audit's default for the mode)"),
    lr: float = typer.Option(0.0, help="learning rate (0 = the audit's default for the mode)"),
    batch_size: int = typer.Option(0, "--batch-size", help="batch size (0 = the audit's default)"),
    k: int = typer.Option(0, help="guesses on each side (0 = canaries // 10)"),
    clients: int = typer.Option(3, help="simulated clients the preset is split into"),
    client: int = typer.Option(0, help="which of them trains"),
    seed: int = typer.Option(42),
    accountant: str = typer.Option("rdp", help="rdp | prv: the accountant whose epsilon is the claim"),
    json_out: Path | None = typer.Option(None, "--json", help="write the result here"),
) -> None:
    """Empirical privacy audit in one training run: canaries, the client's DP-SGD path, a 95 % epsilon lower
    bound beside the claimed epsilon; exit 1 if the bound exceeds the claim (a bug)."""
    from privatune.simulations.canary_audit import CanaryAuditError, CanarySettings, report, run_canary_audit

    settings = CanarySettings(
        preset=preset,
        canaries=canaries,
        dp=not no_dp,
        epsilon=epsilon,
        mode=mode,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        k=k,
        clients=clients,
        client=client,
        seed=seed,
        accountant=accountant,
    )
    try:
        res = run_canary_audit(settings)
    except CanaryAuditError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    raise typer.Exit(report(res, json_out, console))


@app.command("whitebox-audit")
def whitebox_audit(
    epsilon: float = typer.Option(2.0, help="target epsilon of the audited run (the noise is calibrated to it)"),
    canaries: int = typer.Option(5000, help="m: Dirac gradient canaries, each included with probability 1/2"),
    plant: str = typer.Option("none", help="none | noise-half | noise-seeded | no-clip: a known bug to catch"),
    adversary: str = typer.Option("informed", help="informed (replays noise seeded from the run config) | blind"),
    k_plus: int = typer.Option(-1, "--k-plus", help="'in' guesses (-1 = chosen from m and the claim)"),
    k_minus: int = typer.Option(0, "--k-minus", help="'out' guesses"),
    auditor_seed: int = typer.Option(0, "--auditor-seed", help="the auditor's coin flips and data"),
    json_out: Path | None = typer.Option(None, "--json", help="write the result here"),
) -> None:
    """White-box one-run audit through the real DP-SGD step: gradient canaries, per-step models, a 95 % epsilon
    lower bound beside the claim; exit 1 if the bound exceeds the claim (a bug), 2 on bad input."""
    from privatune.simulations.whitebox_audit import WhiteboxAuditError, WhiteboxSettings, report, run_whitebox_audit

    settings = WhiteboxSettings(
        epsilon=epsilon,
        canaries=canaries,
        plant=plant,
        adversary=adversary,
        k_plus=k_plus,
        k_minus=k_minus,
        auditor_seed=auditor_seed,
    )
    try:
        res = run_whitebox_audit(settings)
    except WhiteboxAuditError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    raise typer.Exit(report(res, json_out, console))


@site_app.command("check")
@one_line_errors
def site_check(
    node_config: str = typer.Option(..., "--node-config", help="the SuperNode's --node-config string"),
    run_config: str = typer.Option(
        "", "--run-config", help="the coordinator's run config, as for flwr: 'preset=\"digits\" batch-size=32'"
    ),
    he_fingerprint: str | None = typer.Option(
        None, "--he-fingerprint", help="the key fingerprint the coordinator published"
    ),
) -> None:
    """Check a site's data, ledger, budget, keys and device without connecting to anything."""
    from privatune.client.site_check import check_site

    rep = check_site(_parse_kv(node_config, "--node-config"), _parse_kv(run_config), he_fingerprint)
    table = Table(title="privatune site check")
    table.add_column("check")
    table.add_column("", justify="center")
    table.add_column("detail", overflow="fold")
    for c in rep.checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[bold red]FAIL[/]", c.detail)
    console.print(table)
    if not rep.ok:
        err_console.print("[bold red]site check failed[/]: fix the lines marked FAIL; this site would not train.")
        raise typer.Exit(1)
    console.print("[green]site ready[/]")


@site_app.command("migrate-ledger")
def site_migrate_ledger(
    path: Path = typer.Argument(..., help="a version 1 ledger file (stop the site first)"),
) -> None:
    """Rewrite a version 1 ledger as the current version; every row and hash is kept, the original is backed up."""
    from privatune.common.ledger import LedgerError, migrate_ledger

    try:
        backup = migrate_ledger(path)
    except LedgerError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(1) from None
    console.print(f"migrated {path}; the version 1 original is kept as {backup}")


@app.command()
@one_line_errors
def pki(
    out: Path | None = typer.Option(None, help="folder for the trial CA, server certificate and node keys"),
    nodes: int = typer.Option(3, help="number of SuperNode key pairs"),
    host: list[str] = typer.Option([], "--host", help="SuperLink host name or IP for the certificate (repeatable)"),
    days: int = typer.Option(30, help="certificate lifetime"),
    node_key: Path | None = typer.Option(None, "--node-key", help="make only this site's own key pair at PATH"),
    force: bool = typer.Option(False, "--force", help="overwrite existing files"),
) -> None:
    """Make a throw-away CA, server certificate and SuperNode keys for trials, or one site's key pair."""
    from privatune.pki import main as pki_main

    argv: list[str] = []
    if node_key is not None:
        argv += ["--node-key", str(node_key)]
    else:
        if out is None:
            raise typer.BadParameter("give --out DIR (or --node-key PATH for one site's key)")
        argv += ["--out", str(out), "--nodes", str(nodes), "--days", str(days)]
        for h in host:
            argv += ["--host", h]
    if force:
        argv.append("--force")
    raise typer.Exit(pki_main(argv))


def _check_output_file(path: Path, option: str) -> None:
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


@app.command("fleet-proxy")
def fleet_proxy(
    superlink: str = typer.Option("127.0.0.1:9092", help="HOST:PORT where the SuperLink listens (loopback)"),
    listen: str = typer.Option("0.0.0.0:9443", help="HOST:PORT the sites dial"),
    cert: Path = typer.Option(..., help="certificate the sites verify (its SAN names the public address)"),
    key: Path = typer.Option(..., help="private key of that certificate"),
    ca: Path = typer.Option(..., help="CA certificate that verifies the SuperLink's own certificate"),
    superlink_name: str = typer.Option("localhost", help="a DNS name in the SuperLink certificate's SAN"),
    prefix: Path = typer.Option(Path("/var/lib/privatune-proxy"), help="folder for nginx's pid, logs, temp files"),
    out: Path = typer.Option(Path("nginx-fleet.conf"), help="where to write the nginx configuration"),
) -> None:
    """Write an nginx configuration that exposes only the SuperLink's Fleet API (docs/deploy-coordinator.md)."""
    from privatune.server.fleet_proxy import FleetProxy, ProxyConfigError, write_nginx_conf

    def split(value: str, option: str) -> tuple[str, int]:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit():
            raise typer.BadParameter(f"{option} must be HOST:PORT, got {value!r}")
        return host.strip("[]"), int(port)

    try:
        lhost, lport = split(listen, "--listen")
        shost, sport = split(superlink, "--superlink")
        proxy = FleetProxy(
            lhost,
            lport,
            shost,
            sport,
            server_cert=cert,
            server_key=key,
            ca_cert=ca,
            superlink_tls_name=superlink_name,
            prefix=prefix,
        )
        path = write_nginx_conf(proxy, out)
    except (ProxyConfigError, OSError) as err:
        err_console.print(f"[bold red]error[/]: {err}")
        raise typer.Exit(2) from None
    console.print(f"wrote {path}; start it with: nginx -p {prefix} -c {path.resolve()}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
