"""Throw-away public-key infrastructure for trying a federation on one machine.

A trial needs three things that production gets elsewhere (see docs/security.md):

* a CA certificate (``ca.crt``) that SuperNodes and the ``flwr`` CLI trust,
* a SuperLink server certificate (``server.pem``) and its key (``server.key``),
  valid for the loopback names the SuperNodes dial (SAN ``IP:127.0.0.1``, ``DNS:localhost``),
* one ECDSA P-384 key pair per SuperNode in OpenSSH format (``keys/node-<i>``,
  ``keys/node-<i>.pub``): the SuperLink only admits nodes whose public key was registered.

The CA private key is never written to disk: the CA exists only to sign this one server
certificate, so nobody can later mint another certificate that the nodes would trust.
Everything is made with the ``cryptography`` package (no ``openssl`` or ``ssh-keygen``
subprocess), and secrets are created with mode 0600 from the start, never chmod-ed after.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 30
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


@dataclass(frozen=True)
class PkiPaths:
    """Where :func:`make_trial_pki` wrote each file."""

    out_dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path] = field(default_factory=list)
    node_public_keys: list[Path] = field(default_factory=list)


def _write_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Create ``path`` with ``mode`` already set, so a secret is never briefly world-readable."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if not overwrite:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as err:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite key material. "
            "Choose an empty --out folder or pass overwrite=True."
        ) from err
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # O_CREAT's mode is filtered by the umask; make it exact.


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """IP literals become IP SANs and everything else a DNS SAN (gRPC/HTTPS check both)."""
    if not hosts:
        raise ValueError("hosts is empty: the server certificate needs at least one name")
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise ValueError(f"empty host name in {list(hosts)!r}")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privatune trial"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca_and_server_cert(
    hosts: Sequence[str] = DEFAULT_HOSTS, days: int = DEFAULT_DAYS
) -> tuple[bytes, bytes, bytes]:
    """Return PEM ``(ca_cert, server_cert, server_key)`` for a SuperLink reachable at ``hosts``.

    The CA is P-384, self-signed, ``CA:TRUE, pathlen:0``; the server certificate is a leaf
    for ``serverAuth`` only, signed by it. The CA key is dropped when this returns.
    """
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    sans = _subject_alt_names(hosts)
    now = _dt.datetime.now(_dt.UTC)
    not_before = now - _dt.timedelta(minutes=5)  # tolerate small clock skew between hosts
    not_after = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("privatune trial CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return (
        ca_cert.public_bytes(pem),
        server_cert.public_bytes(pem),
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def make_node_keypair(comment: str = "") -> tuple[bytes, bytes]:
    """Return an ECDSA P-384 ``(private, public)`` pair in OpenSSH format, as Flower's SuperNode reads them.

    ``flower-supernode --auth-supernode-private-key`` loads the private part with
    ``load_ssh_private_key`` and ``flwr supernode register`` the public part (a NIST curve).
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode("ascii", "replace").replace(b" ", b"_")
    return private, public + b"\n"


def write_node_keypair(private_path: Path | str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a SuperNode key pair to ``private_path`` (0600) and ``private_path.pub`` (0644).

    A partner site runs this itself: only the ``.pub`` file is sent to the coordinator.
    """
    private_path = Path(private_path)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path = private_path.with_name(private_path.name + ".pub")
    private, public = make_node_keypair(comment=private_path.name)
    _write_file(private_path, private, SECRET_MODE, overwrite)
    _write_file(public_path, public, PUBLIC_MODE, overwrite)
    return private_path, public_path


def make_trial_pki(
    out_dir: Path | str,
    num_nodes: int,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> PkiPaths:
    """Write a throw-away CA, SuperLink certificate and ``num_nodes`` SuperNode key pairs to ``out_dir``.

    Layout: ``ca.crt``, ``server.pem``, ``server.key`` (0600), ``keys/node-<i>`` (0600) and
    ``keys/node-<i>.pub`` for ``i`` in ``0..num_nodes-1``; folders are 0700. Refuses to
    overwrite existing files unless ``overwrite`` is true. For trials only: production
    certificates come from the organisation's CA (docs/security.md).
    """
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
    out = Path(out_dir)
    keys_dir = out / "keys"
    for folder in (out, keys_dir):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, DIR_MODE)

    ca_pem, server_pem, server_key_pem = make_ca_and_server_cert(hosts, days)
    paths = PkiPaths(
        out_dir=out,
        ca_cert=out / "ca.crt",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    _write_file(paths.ca_cert, ca_pem, PUBLIC_MODE, overwrite)
    _write_file(paths.server_cert, server_pem, PUBLIC_MODE, overwrite)
    _write_file(paths.server_key, server_key_pem, SECRET_MODE, overwrite)
    for i in range(num_nodes):
        private_path, public_path = write_node_keypair(keys_dir / f"node-{i}", overwrite)
        paths.node_keys.append(private_path)
        paths.node_public_keys.append(public_path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``privatune pki``: make a trial PKI (``--out DIR --nodes N``) or one site key (``--node-key PATH``)."""
    parser = argparse.ArgumentParser(
        prog="privatune pki",
        description=(
            "Make a throw-away CA, SuperLink TLS certificate and SuperNode keys for a trial "
            "on one machine, or (--node-key) one SuperNode key pair for a partner site."
        ),
    )
    parser.add_argument("--out", type=Path, help="folder for ca.crt, server.pem, server.key, keys/")
    parser.add_argument("--nodes", type=int, default=0, help="number of SuperNode key pairs")
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        help="a name the SuperLink is reached by (repeatable; default 127.0.0.1 and localhost)",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    parser.add_argument(
        "--node-key",
        type=Path,
        help="write only one SuperNode key pair: PATH (private, 0600) and PATH.pub",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(list(argv) if argv is not None else None)

    try:
        if args.node_key is not None:
            if args.out is not None:
                parser.error("use either --node-key or --out, not both")
            private_path, public_path = write_node_keypair(args.node_key, args.force)
            print(f"private key (keep at the site, never send): {private_path}")
            print(f"public key (send to the coordinator):       {public_path}")
            return 0
        if args.out is None:
            parser.error("--out DIR is required (or --node-key PATH)")
        paths = make_trial_pki(args.out, args.nodes, tuple(args.hosts or DEFAULT_HOSTS), args.days, args.force)
    except (FileExistsError, ValueError) as err:
        print(f"privatune pki: {err}", file=sys.stderr)
        return 2
    print(f"CA certificate (give to every SuperNode): {paths.ca_cert}")
    print(f"SuperLink certificate and key:            {paths.server_cert}, {paths.server_key}")
    for private_path, public_path in zip(paths.node_keys, paths.node_public_keys, strict=True):
        print(f"SuperNode key pair:                       {private_path}, {public_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
