"""A locked-down coordinator: only the Fleet API is reachable from the sites.

Flower 1.42 serves its Fleet API (what SuperNodes call), its Control API (register node keys, start, stop and list
runs) and its Runtime API on one HTTPS port, and the Control API has no account authentication in this
distribution. So the SuperLink listens on loopback and a reverse proxy on the public address forwards only the
routes a SuperNode uses (``/v1/fleet/``, plus ``/health``) and answers 403 to everything else. With
``--enable-supernode-auth`` the SuperLink itself refuses Fleet self-registration, so node keys are allow-listed by
the coordinator alone (``flwr supernode register`` on the SuperLink host).

This module renders the nginx configuration (nginx is Debian's ``nginx-light``); it is a pure function of its
inputs so it can be reviewed and tested without nginx.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The SuperNode's routes (Flower 1.42 ``flwr/superlink/routers/fleet/router.py``) and the health check.
FLEET_PREFIX = "/v1/fleet/"
HEALTH_PATH = "/health"
#: Large enough for an HE update of a full model in one request (Flower chunks objects at 5 MB, but be generous).
MAX_BODY = "512m"


class ProxyConfigError(ValueError):
    """An input the proxy configuration cannot use; names the option."""


#: The `privatune fleet-proxy` option behind each field, so an error names what the user typed.
_OPTION = {
    "listen_host": "--listen",
    "listen_port": "--listen",
    "superlink_host": "--superlink",
    "superlink_port": "--superlink",
    "server_cert": "--cert",
    "server_key": "--key",
    "ca_cert": "--ca",
    "superlink_tls_name": "--superlink-name",
}


def _name(field: str) -> str:
    return f"{field.replace('_', '-')} ({_OPTION[field]})"


@dataclass(frozen=True)
class FleetProxy:
    """Where the proxy listens, where the SuperLink is, and the TLS material of both legs."""

    listen_host: str
    listen_port: int
    superlink_host: str  # loopback or a private interface
    superlink_port: int
    server_cert: Path  # the certificate sites verify (its SAN names the public address)
    server_key: Path
    ca_cert: Path  # verifies the SuperLink's own certificate on the inner leg
    superlink_tls_name: str = "localhost"  # a DNS name in the SuperLink certificate's SAN
    prefix: Path = Path("/var/lib/privatune-proxy")  # pid, logs and temp files
    user: str | None = None  # nginx `user` directive; None keeps nginx's default

    def __post_init__(self) -> None:
        for name in ("listen_port", "superlink_port"):
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ProxyConfigError(f"{_name(name)} must be a TCP port 1..65535, got {port!r}")
        for name in ("server_cert", "server_key", "ca_cert"):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise ProxyConfigError(f"{_name(name)}: {path} is not a file")
        for name in ("listen_host", "superlink_host", "superlink_tls_name"):
            value = getattr(self, name)
            if not value or any(c in value for c in " ;{}\n\"'"):
                raise ProxyConfigError(f"{_name(name)}: {value!r} is not a host name or address")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def render_nginx_conf(proxy: FleetProxy) -> str:
    """The whole nginx.conf: TLS on the public address, the Fleet routes forwarded over TLS, all else 403."""
    p = proxy.prefix
    upstream = f"https://{_host(proxy.superlink_host)}:{proxy.superlink_port}"
    inner_tls = "\n".join(
        [
            f"            proxy_pass {upstream};",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_set_header Host $host;",
            "            proxy_ssl_verify on;",
            f"            proxy_ssl_trusted_certificate {proxy.ca_cert};",
            f"            proxy_ssl_name {proxy.superlink_tls_name};",
            "            proxy_ssl_server_name on;",
        ]
    )
    user = f"user {proxy.user};\n" if proxy.user else ""
    return f"""# Written by `privatune fleet-proxy`: sites reach only the Fleet API of the SuperLink.
{user}worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    client_max_body_size {MAX_BODY};
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_read_timeout 900s;
    proxy_send_timeout 900s;
    server_tokens off;
    server {{
        listen {_host(proxy.listen_host)}:{proxy.listen_port} ssl;
        ssl_certificate {proxy.server_cert};
        ssl_certificate_key {proxy.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location {FLEET_PREFIX} {{
{inner_tls}
        }}
        location = {HEALTH_PATH} {{
{inner_tls}
        }}
        # The Control API (keys, runs) and the Runtime API stay on the SuperLink host.
        location / {{
            return 403;
        }}
    }}
}}
"""


def write_nginx_conf(proxy: FleetProxy, path: Path) -> Path:
    """Write the configuration and create the prefix folders nginx needs."""
    for sub in ("", "tmp", "tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (proxy.prefix / sub).mkdir(parents=True, exist_ok=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_nginx_conf(proxy), encoding="utf-8")
    return path
