"""A locked-down coordinator: the SuperLink on loopback, nginx in front exposing only the Fleet API.

Sites dial the proxy and train; an outsider holding the CA certificate and reaching the same public address
cannot list runs, stop a run or register a node key (the proxy answers 403), and a SuperNode cannot register
itself through the Fleet API (the SuperLink refuses it with node authentication on).
"""

from __future__ import annotations

import json
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from privatune.server.fleet_proxy import FleetProxy, ProxyConfigError, render_nginx_conf

from .harness import REPO_ROOT, Federation, stage_app, start_federation
from .test_transport import digits_sites, ledger_entries, tiny_run_config


def _pki_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("server_cert", "server_key", "ca_cert"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("x")
    return files


def test_rendered_conf_forwards_only_the_fleet_api(tmp_path: Path) -> None:
    conf = render_nginx_conf(
        FleetProxy("0.0.0.0", 9443, "127.0.0.1", 9200, prefix=tmp_path / "p", **_pki_files(tmp_path))
    )
    locations = [line.strip() for line in conf.splitlines() if line.strip().startswith("location")]
    assert locations == ["location /v1/fleet/ {", "location = /health {", "location / {"]
    catch_all = conf.split("location / {", 1)[1]
    assert "return 403;" in catch_all and "proxy_pass" not in catch_all
    assert conf.count("proxy_ssl_verify on;") == 2  # the inner leg verifies the SuperLink's certificate
    assert "proxy_pass https://127.0.0.1:9200;" in conf and "/v1/control" not in conf


@pytest.mark.parametrize(
    "change, key",
    [
        ({"listen_port": 0}, "listen-port"),
        ({"superlink_port": 70000}, "superlink-port"),
        ({"superlink_host": "a b"}, "superlink-host"),
    ],
)
def test_bad_proxy_inputs_name_the_option(tmp_path: Path, change: dict, key: str) -> None:
    args = {
        "listen_host": "0.0.0.0",
        "listen_port": 9443,
        "superlink_host": "127.0.0.1",
        "superlink_port": 9200,
        **_pki_files(tmp_path),
        **change,
    }
    with pytest.raises(ProxyConfigError, match=key):
        FleetProxy(**args)


def test_missing_certificate_is_named(tmp_path: Path) -> None:
    files = _pki_files(tmp_path)
    files["server_key"].unlink()
    with pytest.raises(ProxyConfigError, match="server-key"):
        FleetProxy("0.0.0.0", 9443, "127.0.0.1", 9200, **files)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, list[dict]]]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.fail("nginx is required for the locked-down coordinator test (apt-get install nginx-light)")
    sites = digits_sites(tmp_path_factory.mktemp("proxy-sites"), 2)
    fed = start_federation(tmp_path_factory.mktemp("proxy-fed"), sites, proxy=True)
    try:
        yield fed, sites
    finally:
        assert fed.teardown() == []


def _post(fed: Federation, path: str) -> int:
    context = ssl.create_default_context(cafile=str(fed.pki.ca_cert))
    request = urllib.request.Request(
        f"https://{fed.site_address}{path}", data=b"", method="POST", headers={"Content-Type": "application/protobuf"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_sites_train_through_the_proxy_and_outsiders_are_refused(
    proxied: tuple[Federation, list[dict]], tmp_path: Path
) -> None:
    fed, sites = proxied
    assert fed.site_address != fed.address  # the SuperNodes dialled the proxy, not the SuperLink
    for index in range(len(sites)):
        assert f"--superlink {fed.site_address}" in " ".join(fed.supernodes[index].cmd)
    app = stage_app(REPO_ROOT, tmp_path / "app")
    result = fed.run_app(app, tiny_run_config(tmp_path / "out", rounds=1), timeout=900)
    assert result.ok, result.output
    for site in sites:
        assert [e.round for e in ledger_entries(site, result.run_id)] == [1], site["site-id"]
    access = (fed.root / "proxy" / "access.log").read_text()
    assert "/v1/fleet/pull-messages" in access and "/v1/fleet/push-messages" in access

    # An outsider with the CA certificate at the public address: the Control API is not there.
    _, public = fed.node_key(7)
    for args in (
        ("ls", "outside"),
        ("stop", str(result.run_id), "outside"),
        ("supernode", "register", str(public), "outside"),
    ):
        answer = fed.flwr(*args, "--format", "json", check=False)
        text = answer.stdout + answer.stderr
        assert '"success": false' in answer.stdout and "403 Forbidden" in text, (args, text)
    for path in (
        "/v1/control/list-runs",
        "/v1/control/stop-run",
        "/v1/control/register-node",
        "/v1/runtime/pull-messages",
    ):
        assert _post(fed, path) == 403, path
    # Self-registration through the Fleet API reaches the SuperLink, which refuses it (node auth on).
    assert _post(fed, "/v1/fleet/register-node") >= 400
    # The coordinator, on the SuperLink host, still sees its run and both registered nodes.
    runs = fed._json_from(fed.flwr("ls", fed.connection, "--format", "json").stdout)["runs"]
    assert any(int(r["run-id"]) == result.run_id for r in runs)
    nodes = [n for n in fed.list_nodes() if n["status"] == "online"]
    assert len(nodes) == len(sites), json.dumps(nodes)
