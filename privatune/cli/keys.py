"""The key material commands: `keygen` and `decrypt` (CKKS) and `pki` (trial certificates). Separate because
they are the only ones that write or read secrets."""

from __future__ import annotations

from pathlib import Path

import typer

from privatune.cli.inputs import UsageError
from privatune.cli.terminal import console

POLY_MODULUS_DEGREES = (8192, 16384, 32768)  # the ring sizes that hold the default 180-bit modulus at 128-bit security


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
