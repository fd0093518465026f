"""Transport security of a real loopback deployment: TLS on the SuperLink, registered node keys.

One SuperLink (TLS + ``--enable-supernode-auth``) and two registered SuperNodes are shared by
the module; each test adds what it needs. Admission is judged by the node itself (exit code,
no ``SuperNode ID`` line) and by the link's node list.
"""

from __future__ import annotations

import signal
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from privatune.pki import make_trial_pki

from .harness import Federation, HarnessError, stage_app, start_federation
from .tiny_app import write_tiny_app

SITES = [{"site-id": "site-a"}, {"site-id": "site-b"}]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    federation = start_federation(tmp_path_factory.mktemp("fed"), SITES)
    try:
        yield federation
    finally:
        leftovers = federation.teardown()
        assert leftovers == [], f"processes left behind: {leftovers}"


@pytest.fixture(scope="module")
def app_dir(fed: Federation) -> Path:
    return stage_app(write_tiny_app(fed.root / "app-src"), fed.root / "app")


def test_tls_and_auth_federation_completes(fed: Federation, app_dir: Path) -> None:
    result = fed.run_app(app_dir, {"num-server-rounds": 2}, timeout=300)
    assert result.ok, result.output
    assert "TINYAPP FINAL [2.0, 2.0, 2.0, 2.0]" in result.output  # 2 rounds, both sites each round
    for index, site in enumerate(SITES):
        log = fed.supernodes[index].log_text()
        assert log.count(f"TINYAPP TRAIN site={site['site-id']}") == 2, log  # node_config arrived
    online = {n["node-id"] for n in fed.list_nodes() if n["status"] == "online"}
    assert {str(fed.supernodes[i].node_id) for i in range(len(SITES))} <= online
    assert set(fed.registered.values()) == {fed.supernodes[i].node_id for i in range(len(SITES))}


def test_superlink_serves_only_verified_tls(fed: Federation) -> None:
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://{fed.address}/health", timeout=5,
                               context=ssl.create_default_context())  # system CAs do not know it
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{fed.address}/health", timeout=5)  # no plaintext


UNREGISTERED, NO_KEY, INSECURE, OTHER_CA = 10, 11, 12, 13


@pytest.fixture(scope="module")
def refused(fed: Federation) -> dict[int, str]:
    """Four nodes the link must not admit, started together; index -> that node's log."""
    other = make_trial_pki(fed.root / "other-pki", 0)
    fed.register(OTHER_CA)  # registered, so only the server-certificate check can stop it
    procs = fed.expect_refused_many(
        {
            UNREGISTERED: {},  # a valid P-384 key the coordinator never registered
            NO_KEY: {"use_key": False},
            # No key either: the refusal must come from the link speaking TLS only, not from
            # the node's own rule that authentication needs TLS (exit code 303).
            INSECURE: {"insecure": True, "use_key": False},
            OTHER_CA: {"root_certificates": other.ca_cert},
        }
    )
    assert procs[INSECURE].popen.returncode != 303
    return {index: proc.log_text() for index, proc in procs.items()}


def test_unregistered_node_is_refused(fed: Federation, refused: dict[int, str]) -> None:
    assert "Failed to activate SuperNode" in refused[UNREGISTERED], refused[UNREGISTERED]
    assert "No SuperNode found with the given public key" in fed.superlink.log_text()
    online = [n for n in fed.list_nodes() if n["status"] == "online"]
    assert len(online) == len(SITES)
    with pytest.raises(HarnessError, match="exited with code"):  # the harness says so, with the log
        fed.wait_supernode_ready(UNREGISTERED, timeout=5)


def test_node_without_key_is_refused(refused: dict[int, str]) -> None:
    assert "All SuperNodes must be registered" in refused[NO_KEY], refused[NO_KEY]


def test_insecure_node_is_refused(refused: dict[int, str]) -> None:
    assert "could not establish a connection to the SuperLink" in refused[INSECURE], refused[INSECURE]


def test_node_trusting_another_ca_is_refused(refused: dict[int, str]) -> None:
    assert "CERTIFICATE_VERIFY_FAILED" in refused[OTHER_CA], refused[OTHER_CA]


@pytest.mark.slow
def test_killed_node_run_completes_and_node_rejoins(tmp_path: Path) -> None:
    """SIGKILL one of three nodes mid-round: the run finishes with the other two; it rejoins."""
    sites = [{"site-id": f"site-{c}"} for c in "abc"]
    with start_federation(tmp_path / "fed", sites) as fed3:
        app = stage_app(write_tiny_app(tmp_path / "app-src"), tmp_path / "app")
        def kill_when_training() -> None:
            fed3.wait_for_log(2, "Received successfully", timeout=120)
            fed3.kill_supernode(2, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_training, daemon=True)
        killer.start()
        result = fed3.run_app(app, {"num-server-rounds": 2, "client-sleep": 4.0}, timeout=400)
        killer.join(5)
        assert result.ok, result.output
        assert "Node Unavailable" in result.output  # the link answered for the dead node
        assert "TINYAPP FINAL [2.0, 2.0, 2.0, 2.0]" in result.output
        old_id = fed3.supernodes[2].node_id
        fed3.restart_supernode(2, timeout=150)
        assert fed3.supernodes[2].node_id == old_id  # same key, same identity
        assert fed3.teardown() == []
