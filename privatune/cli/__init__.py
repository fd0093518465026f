"""`privatune`: the command line. Each command is thin and imports its side lazily.

This module holds the typer app, the table of commands (in the order ``--help`` lists them), ``main`` and
the error handling every command shares: which errors are privatune's own (exit 2, one line) and which are
unexpected (exit 3, one line and a traceback log). The commands live in one module per group.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
from rich.markup import escape

from privatune.cli.app_folder import app_folder
from privatune.cli.audits import audit, canary_audit, whitebox_audit
from privatune.cli.budget import budget
from privatune.cli.evaluate import evaluate
from privatune.cli.fleet import fleet_proxy
from privatune.cli.inputs import UsageError, check_resources, describe_os_error
from privatune.cli.keys import POLY_MODULUS_DEGREES, decrypt, keygen, pki
from privatune.cli.personalise import personalise
from privatune.cli.simulation import simulate
from privatune.cli.site import site_check, site_migrate_ledger
from privatune.cli.sweep import sweep
from privatune.cli.terminal import console, err_console
from privatune.cli.tuning import tune
from privatune.common.offline import set_offline_env

__all__ = [
    "POLY_MODULUS_DEGREES",
    "PROJECT_ROOT",
    "UsageError",
    "app",
    "audit",
    "budget",
    "canary_audit",
    "check_resources",
    "console",
    "decrypt",
    "err_console",
    "evaluate",
    "fleet_proxy",
    "keygen",
    "main",
    "one_line_errors",
    "pki",
    "simulate",
    "site_app",
    "site_check",
    "site_migrate_ledger",
    "sweep",
    "tune",
    "whitebox_audit",
]

F = TypeVar("F", bound=Callable[..., Any])

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# privatune's own error classes, by module: each names the key, file or record and the fix.
_ERROR_CLASSES = {
    "privatune.common.config": ("ConfigError",),
    "privatune.client.site_config": ("SiteConfigError",),
    "privatune.client.site_data": ("SiteDataError",),
    "privatune.common.he": ("HEError",),
    "privatune.common.audit": ("AuditInputError",),
    "privatune.common.accounting": ("AccountingError",),
    "privatune.common.ledger": ("LedgerError",),
    "privatune.common.model_card": ("ModelCardError",),
    "privatune.simulations.canary_audit": ("CanaryAuditError",),
    "privatune.simulations.run_folder": ("RunFolderError",),
    "privatune.simulations.sweep": ("SweepError",),
    "privatune.simulations.tune_space": ("SpaceError",),  # privatune tune (issue 14)
    "privatune.simulations.tune": ("TuneError",),
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
                text = describe_os_error(known) if isinstance(known, OSError) else str(known)
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


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Federated, differentially private fine-tuning.",
)
site_app = typer.Typer(no_args_is_help=True, help="Commands a partner site runs.")
app.add_typer(site_app, name="site")

# The commands, in the order --help lists them; one_line_errors where a command reports errors in one line.
app.command()(one_line_errors(simulate))
app.command()(one_line_errors(sweep))
app.command()(one_line_errors(tune))  # issue 14
app.command()(one_line_errors(keygen))
app.command()(one_line_errors(decrypt))
app.command()(one_line_errors(evaluate))
app.command()(one_line_errors(personalise))  # issue 15
app.command()(one_line_errors(audit))
app.command()(one_line_errors(budget))
app.command("canary-audit")(one_line_errors(canary_audit))
app.command("whitebox-audit")(whitebox_audit)
site_app.command("check")(one_line_errors(site_check))
site_app.command("budget")(one_line_errors(budget))
site_app.command("migrate-ledger")(site_migrate_ledger)
app.command()(one_line_errors(pki))
app.command("fleet-proxy")(fleet_proxy)
app.command("app-folder")(one_line_errors(app_folder))


def main() -> None:
    set_offline_env()  # privatune's models come from installed packages; never reach a model hub
    app()
