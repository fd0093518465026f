"""A real loopback deployment: TLS on the SuperLink, registered node keys, the project's app.

The module shares one SuperLink (TLS + ``--enable-supernode-auth``) and three registered
SuperNodes, each with its own digits file written here; site C's file has a bad label at
record 5. Admission is judged by the node itself (exit code, no ``SuperNode ID`` line) and by
the link's node list. The fast run uses a tiny generated app (plumbing only); the runs of the
real ServerApp/ClientApp (``preset=digits``) take minutes on 2 cores and are marked slow.
"""

from __future__ import annotations

import json
import signal
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from privatune.pki import make_trial_pki

from .harness import REPO_ROOT, Federation, HarnessError, stage_app, start_federation, write_node_config_toml
from .tiny_app import write_tiny_app

BAD_RECORD = 5  # 1-based record of site C's file that carries an unknown label


def write_digits_site(folder: Path, site_id: str, rows: np.ndarray, bad_record: int | None = None) -> dict:
    """Write one site's ``digits.npz`` (8x8 images, labels 0..9) and return its node config."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    labels = digits.target[rows].copy()
    if bad_record is not None:
        labels[bad_record - 1] = 42
    np.savez(folder / "digits.npz", x=digits.images[rows], y=labels)
    return {
        "site-id": site_id,
        "data-path": str(folder / "digits.npz"),
        "data-format": "npz",
        "ledger-path": str(folder / "ledger.sqlite"),
        "cache-dir": str(folder / "cache"),
        "max-epsilon": 50.0,
        "device": "cpu",
    }


def digits_sites(root: Path, n: int, bad_site: int | None = None) -> list[dict]:
    rows = np.random.default_rng(0).permutation(1797)[: 300 * n]
    return [
        write_digits_site(
            root / f"site-{chr(97 + i)}", f"site-{chr(97 + i)}", part, BAD_RECORD if i == bad_site else None
        )
        for i, part in enumerate(np.array_split(rows, n))
    ]


def tiny_run_config(out_dir: Path, rounds: int = 2) -> dict:
    return {"preset": "digits", "num-server-rounds": rounds, "local-epochs": 1, "out-dir": str(out_dir)}


def ledger_entries(node_config: dict, run_id: int | None = None) -> list:
    from privatune.common.ledger import SiteLedger

    path = Path(node_config["ledger-path"])
    if not path.exists():
        return []
    entries = [r.entry for r in SiteLedger(path).entries()]
    return [e for e in entries if run_id is None or e.run_id == str(run_id)]


@pytest.fixture(scope="module")
def he_keys(tmp_path_factory: pytest.TempPathFactory):
    from privatune.common import he

    return he.write_keys(tmp_path_factory.mktemp("he-keys"))


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory, he_keys) -> list[dict]:
    configured = digits_sites(tmp_path_factory.mktemp("sites"), 3, bad_site=2)
    for site in configured:  # every site holds the secret context; the coordinator only public.ctx
        site["he-secret-context"] = str(he_keys.secret)
    return configured


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, sites: list[dict]) -> Iterator[Federation]:
    # Site B's node config comes as a TOML file (`--node-config site.toml`), the others as strings.
    as_file = write_node_config_toml(Path(sites[1]["ledger-path"]).parent / "site.toml", sites[1])
    federation = start_federation(tmp_path_factory.mktemp("fed"), [sites[0], as_file, sites[2]])
    try:
        yield federation
    finally:
        leftovers = federation.teardown()
        assert leftovers == [], f"processes left behind: {leftovers}"


def test_tls_and_auth_federation_completes(fed: Federation, sites: list[dict]) -> None:
    app = stage_app(write_tiny_app(fed.root / "tiny-src"), fed.root / "tiny-app")
    result = fed.run_app(app, {"num-server-rounds": 2}, timeout=300)
    assert result.ok, result.output
    assert "TINYAPP FINAL [2.0, 2.0, 2.0, 2.0]" in result.output  # 2 rounds, all sites each round
    for index, site in enumerate(sites):
        log = fed.supernodes[index].log_text()
        assert log.count(f"TINYAPP TRAIN site={site['site-id']}") == 2, log  # node_config arrived
    online = {n["node-id"] for n in fed.list_nodes() if n["status"] == "online"}
    assert {str(p.node_id) for p in fed.supernodes.values()} <= online
    assert set(fed.registered.values()) == {p.node_id for p in fed.supernodes.values()}


def test_superlink_serves_only_verified_tls(fed: Federation) -> None:
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(
            f"https://{fed.address}/health", timeout=5, context=ssl.create_default_context()
        )  # system CAs do not know it
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
    assert len(online) == 3
    with pytest.raises(HarnessError, match="exited with code"):  # the harness says so, with the log
        fed.wait_supernode_ready(UNREGISTERED, timeout=5)


def test_node_without_key_is_refused(refused: dict[int, str]) -> None:
    assert "All SuperNodes must be registered" in refused[NO_KEY], refused[NO_KEY]


def test_insecure_node_is_refused(refused: dict[int, str]) -> None:
    assert "could not establish a connection to the SuperLink" in refused[INSECURE], refused[INSECURE]


def test_node_trusting_another_ca_is_refused(refused: dict[int, str]) -> None:
    assert "CERTIFICATE_VERIFY_FAILED" in refused[OTHER_CA], refused[OTHER_CA]


@pytest.mark.slow
def test_real_app_digits_over_tls_with_a_bad_site(fed: Federation, sites: list[dict]) -> None:
    """The project's app, 2 DP rounds on digits: improves; good sites' ledgers hold the spend; the
    site with a bad record says which, trains nothing, and the run completes without it."""
    out = fed.root / "server-out"
    app = stage_app(REPO_ROOT, fed.root / "app")
    result = fed.run_app(app, tiny_run_config(out), timeout=900)
    assert result.ok, result.output
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds_completed"] == 2
    assert rounds[-1]["central"]["accuracy"] > rounds[0]["central"]["accuracy"] + 0.2
    for site in sites[:2]:
        spent = ledger_entries(site, result.run_id)
        assert [e.round for e in spent] == [1, 2], site["site-id"]
        assert 0 < spent[-1].epsilon_run <= 8.0 + 1e-6
        assert summary["per_client_epsilon"][site["site-id"]] == pytest.approx(spent[-1].epsilon_run)
    bad = sites[2]
    assert ledger_entries(bad) == []  # nothing trained, nothing spent
    assert all(bad["site-id"] in r["dropped"] for r in rounds[1:])
    reason = json.dumps(rounds[1]["dropped"][bad["site-id"]])
    # The coordinator learns where (file name, record), not what: the bad value stays in the site's log.
    assert Path(bad["data-path"]).name in reason and f"record {BAD_RECORD}" in reason, reason
    assert "unknown label" not in reason


@pytest.mark.slow
def test_real_app_with_he_aggregation_over_tls(fed: Federation, sites: list[dict], he_keys) -> None:
    """The same deployment with CKKS aggregation: the coordinator holds only public.ctx, the sites
    decrypt, and the final (encrypted) checkpoint decrypts with a site's key to a model that learned."""
    from privatune.common import he
    from privatune.common.config import RunConfig
    from privatune.server.central_eval import CentralEvaluator

    out = fed.root / "server-out-he"
    app = stage_app(REPO_ROOT, fed.root / "app-he")
    config = {**tiny_run_config(out), "secure-aggregation": "he", "he-public-context": str(he_keys.public)}
    result = fed.run_app(app, config, timeout=900)
    assert result.ok, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["secure_aggregation"] == "he"
    # No site released a metric (release-metrics is off by default): no federated figure exists.
    assert summary["federated_accuracy"] is None and summary["federated_noised"] is None
    assert (out / "global.he-checkpoint").exists() and not (out / "global.safetensors").exists()
    decrypted = he.decrypt_checkpoint_to_safetensors(
        he_keys.secret, out / "global.he-checkpoint", fed.root / "he-final.safetensors"
    )
    from safetensors.numpy import load_file

    cfg = RunConfig.create(preset="digits")
    accuracy = CentralEvaluator(cfg, None)(load_file(str(decrypted))).accuracy
    assert accuracy > 0.5, accuracy  # a fresh head scores about 0.1
    for site in sites[:2]:
        assert [e.round for e in ledger_entries(site, result.run_id)] == [1, 2], site["site-id"]


@pytest.mark.slow
def test_killed_site_run_completes_and_its_budget_continues(tmp_path: Path) -> None:
    """SIGKILL a site in round 2: the run finishes with the others; restarted, the site's next
    run composes on top of what its ledger already holds."""
    sites = digits_sites(tmp_path / "sites", 3)
    with start_federation(tmp_path / "fed", sites) as fed3:
        app = stage_app(REPO_ROOT, tmp_path / "app")

        def kill_in_round_two() -> None:
            fed3.wait_for_log(2, "Receiving: train message", timeout=600, occurrence=2)  # round 2
            fed3.kill_supernode(2, signal.SIGKILL)

        killer = threading.Thread(target=kill_in_round_two, daemon=True)
        killer.start()
        first = fed3.run_app(app, tiny_run_config(tmp_path / "out-1"), timeout=900)
        killer.join(5)
        assert first.ok, first.output
        assert not fed3.supernodes[2].alive()
        assert "Node Unavailable" in first.output  # the link answered for the dead node
        spent_before = ledger_entries(sites[2])
        assert [e.round for e in spent_before] in ([1], [1, 2])  # round 2 may be written ahead

        old_id = fed3.supernodes[2].node_id
        fed3.restart_supernode(2, timeout=150)
        assert fed3.supernodes[2].node_id == old_id  # same key, same identity
        second = fed3.run_app(app, tiny_run_config(tmp_path / "out-2", rounds=1), timeout=600)
        assert second.ok, second.output
        after = ledger_entries(sites[2], second.run_id)
        assert len(after) == 1
        assert after[0].epsilon_dataset > max(e.epsilon_dataset for e in spent_before)
        assert after[0].epsilon_dataset > after[0].epsilon_run  # earlier runs counted
        assert fed3.teardown() == []


def test_superlink_restart_keeps_registrations_and_nodes_reconnect(fed: Federation) -> None:
    """Last in the module: SIGTERM the SuperLink, start it on the same port with the same database."""
    before = {n["node-id"]: n["status"] for n in fed.list_nodes()}
    fed.superlink.signal_group(signal.SIGTERM)
    assert fed.superlink.wait(30) is not None
    fed.start_superlink(same_port=True)
    for index in range(3):
        fed.wait_for_log(index, "Connection successful after", timeout=90)
    after = {n["node-id"]: n["status"] for n in fed.list_nodes()}
    assert set(after) == set(before)  # registered keys kept in --database
    assert all(after[str(fed.supernodes[i].node_id)] == "online" for i in range(3))
