"""`privatune fleet-proxy`: the coordinator's nginx front for the Fleet API. Separate because it is deployment,
not training or auditing."""

from __future__ import annotations

from pathlib import Path

import typer

from privatune.cli.terminal import console, err_console


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
