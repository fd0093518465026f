"""The throw-away PKI: what TLS and Flower's node authentication need, with safe file modes."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from privatune.pki import main, make_trial_pki, write_node_keypair


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return make_trial_pki(tmp_path_factory.mktemp("pki") / "out", 2)


def test_layout_and_modes(pki) -> None:
    out = pki.out_dir
    assert pki.ca_cert == out / "ca.crt" and pki.server_cert == out / "server.pem"
    assert pki.node_keys == [out / "keys" / "node-0", out / "keys" / "node-1"]
    assert pki.node_public_keys == [out / "keys" / "node-0.pub", out / "keys" / "node-1.pub"]
    for secret in [pki.server_key, *pki.node_keys]:
        assert _mode(secret) == 0o600, secret
    for public in [pki.ca_cert, pki.server_cert, *pki.node_public_keys]:
        assert _mode(public) == 0o644, public
    assert _mode(out) == 0o700 and _mode(out / "keys") == 0o700
    assert not any("ca" in p.name and p.suffix == ".key" for p in out.rglob("*"))  # CA key not kept


def test_server_certificate_chains_to_ca_with_loopback_names(pki) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    key = load_pem_private_key(pki.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_node_keys_are_p384_openssh_pairs(pki) -> None:
    for private_path, public_path in zip(pki.node_keys, pki.node_public_keys, strict=True):
        private = load_ssh_private_key(private_path.read_bytes(), None)  # as flower-supernode reads it
        public = load_ssh_public_key(public_path.read_bytes())  # as `flwr supernode register` reads it
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert pki.node_keys[0].read_bytes() != pki.node_keys[1].read_bytes()


def test_custom_hosts_and_overwrite_protection(tmp_path: Path) -> None:
    paths = make_trial_pki(tmp_path, 0, hosts=("link.example.org", "10.0.0.5"))
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    before = paths.server_key.read_bytes()
    with pytest.raises(FileExistsError, match=r"server.key|ca.crt"):
        make_trial_pki(tmp_path, 0)
    assert paths.server_key.read_bytes() == before
    make_trial_pki(tmp_path, 1, overwrite=True)
    assert paths.server_key.read_bytes() != before
    with pytest.raises(ValueError, match="num_nodes"):
        make_trial_pki(tmp_path / "x", -1)
    with pytest.raises(ValueError, match="hosts"):
        make_trial_pki(tmp_path / "y", 0, hosts=())


def test_cli_trial_and_site_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "pki"), "--nodes", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "pki" / "keys").iterdir()) == [
        "node-0",
        "node-0.pub",
        "node-1",
        "node-1.pub",
        "node-2",
        "node-2.pub",
    ]
    assert main(["--out", str(tmp_path / "pki"), "--nodes", "1"]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["--node-key", str(tmp_path / "site" / "node-key")]) == 0
    assert _mode(tmp_path / "site" / "node-key") == 0o600
    assert "send to the coordinator" in capsys.readouterr().out
    private, public = write_node_keypair(tmp_path / "site" / "second", overwrite=False)
    assert public.name == "second.pub" and private.exists()
