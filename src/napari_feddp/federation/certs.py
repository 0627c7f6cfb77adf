"""Pilot public-key infrastructure for a small federation.

A pilot federation needs three kinds of key material:

* a **pilot CA** (self-signed, kept by the coordinator) that signs
* a **SuperLink server certificate** whose subject alternative names cover the
  addresses the labs dial (``127.0.0.1`` and ``localhost`` by default), and
* one **SuperNode key pair per lab**, made by the lab itself
  (``napari-feddp federation keys``, :func:`create_node_keys`). Flower 1.42
  authenticates SuperNodes with NIST elliptic-curve keys in OpenSSH format:
  the private key never leaves the lab
  (``flower-supernode --auth-supernode-private-key``); the lab sends only its
  public key, which the coordinator registers with the SuperLink
  (``flwr supernode register``) before the lab connects. The SuperLink runs
  with ``--enable-supernode-auth`` (which requires TLS). The coordinator never
  holds a lab's private key, so it cannot impersonate a lab.

Private keys are written with mode ``0o600``. Nothing here talks to the network.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Hosts the SuperLink certificate is valid for unless told otherwise.
DEFAULT_SERVER_HOSTS = ("127.0.0.1", "localhost")
#: Always in the certificate: the coordinator's own processes dial the SuperLink on loopback.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
#: Curve used for every key (Flower's own node keys use P-384 as well).
_CURVE = ec.SECP384R1
_LAB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class CertificateAuthority:
    """Paths of the pilot CA certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertificate:
    """Paths of the SuperLink TLS certificate (signed by the CA) and key."""

    cert: Path
    key: Path
    ca_cert: Path


@dataclass(frozen=True)
class NodeKeyPair:
    """A lab's SuperNode authentication key pair (OpenSSH-format EC keys)."""

    lab: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class PilotPKI:
    """The coordinator's TLS material (:func:`create_pilot_pki`), as paths. No lab keys."""

    root: Path
    ca: CertificateAuthority
    server: ServerCertificate

    def to_json(self) -> dict:
        """Return a JSON-serialisable manifest (paths as strings)."""
        return {
            "ca_cert": str(self.ca.cert),
            "ca_key": str(self.ca.key),
            "server_cert": str(self.server.cert),
            "server_key": str(self.server.key),
        }


def validate_lab_name(lab: str) -> str:
    """Return ``lab`` if it is a safe file and node name, else raise ValueError.

    Parameters
    ----------
    lab : str
        Lab identifier: letters, digits, ``_``, ``.``, ``-``; 1 to 64 characters,
        starting with a letter or digit.
    """
    if not isinstance(lab, str) or not _LAB_NAME.match(lab):
        raise ValueError(
            f"invalid lab name {lab!r}: use 1-64 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return lab


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_ca(
    out_dir: str | os.PathLike,
    common_name: str = "napari-feddp pilot CA",
    days: int = 365,
) -> CertificateAuthority:
    """Create a self-signed pilot certificate authority.

    Parameters
    ----------
    out_dir : path
        Directory for ``ca.pem`` and ``ca.key``.
    common_name : str
        Subject common name of the CA.
    days : int
        Validity in days.

    Returns
    -------
    CertificateAuthority
        Paths of the written files.
    """
    out = Path(out_dir)
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now() - _dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    ca = CertificateAuthority(cert=out / "ca.pem", key=out / "ca.key")
    _write_public(ca.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(ca.key, _pem_key(key))
    return ca


def _load_ca(ca: CertificateAuthority) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"CA key {ca.key} is not an elliptic-curve key")
    return cert, key


def _san_entries(hosts: tuple[str, ...] | list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def create_server_cert(
    ca: CertificateAuthority,
    out_dir: str | os.PathLike,
    hosts: tuple[str, ...] | list[str] = DEFAULT_SERVER_HOSTS,
    days: int = 365,
) -> ServerCertificate:
    """Create the SuperLink TLS certificate signed by the pilot CA.

    Parameters
    ----------
    ca : CertificateAuthority
        The signing CA (from :func:`create_ca`).
    out_dir : path
        Directory for ``server.pem`` and ``server.key``.
    hosts : sequence of str
        IP addresses and DNS names put in the subject alternative names; TLS
        clients only accept the certificate for these.
    days : int
        Validity in days.

    Returns
    -------
    ServerCertificate
        Paths of the written files (and of the CA certificate clients need).
    """
    if not hosts:
        raise ValueError("the server certificate needs at least one host")
    out = Path(out_dir)
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(_CURVE())
    start = _now() - _dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_san_entries(list(hosts))), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server = ServerCertificate(cert=out / "server.pem", key=out / "server.key", ca_cert=ca.cert)
    _write_public(server.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(server.key, _pem_key(key))
    return server


def create_node_keys(out_dir: str | os.PathLike, lab: str, *, overwrite: bool = False) -> NodeKeyPair:
    """Create a lab's SuperNode authentication key pair (on the lab's machine).

    Parameters
    ----------
    out_dir : path
        Directory for ``<lab>.key`` (OpenSSH private key, mode 600) and
        ``<lab>.pub`` (OpenSSH public key, ``ecdsa-sha2-nistp384 ...``).
    lab : str
        Lab name (see :func:`validate_lab_name`); also the key comment.
    overwrite : bool
        Replace an existing key pair (otherwise FileExistsError: a new key
        means the coordinator must register the lab again).

    Returns
    -------
    NodeKeyPair
        Paths of the written files.
    """
    validate_lab_name(lab)
    out = Path(out_dir)
    if (out / f"{lab}.key").exists() and not overwrite:
        raise FileExistsError(f"{out / f'{lab}.key'} exists; keep it, or pass overwrite to make a new key pair")
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pair = NodeKeyPair(lab=lab, private_key=out / f"{lab}.key", public_key=out / f"{lab}.pub")
    _write_private(pair.private_key, private)
    _write_public(pair.public_key, public + f" {lab}\n".encode())
    return pair


def create_pilot_pki(
    out_dir: str | os.PathLike,
    hosts: tuple[str, ...] | list[str] = DEFAULT_SERVER_HOSTS,
    days: int = 365,
) -> PilotPKI:
    """Create the pilot CA and the SuperLink certificate under ``out_dir``.

    Layout::

        out_dir/ca/ca.pem, ca.key
        out_dir/superlink/server.pem, server.key
        out_dir/pki.json              (manifest of the above)

    Lab key pairs are not made here: each lab makes its own
    (:func:`create_node_keys`) and sends only the public key.

    Parameters
    ----------
    out_dir : path
        Target directory (created; existing files are overwritten).
    hosts : sequence of str
        Addresses labs dial, for the SuperLink certificate; loopback is always
        added (the coordinator's own processes use it).
    days : int
        Validity of the certificates in days.

    Returns
    -------
    PilotPKI
        Paths of everything written.
    """
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ca = create_ca(root / "ca", days=days)
    server = create_server_cert(ca, root / "superlink", hosts=hosts, days=days)
    pki = PilotPKI(root=root, ca=ca, server=server)
    (root / "pki.json").write_text(json.dumps(pki.to_json(), indent=2) + "\n")
    return pki


def load_pilot_pki(out_dir: str | os.PathLike) -> PilotPKI:
    """Read the manifest written by :func:`create_pilot_pki`.

    Parameters
    ----------
    out_dir : path
        Directory that holds ``pki.json``.

    Returns
    -------
    PilotPKI
    """
    root = Path(out_dir)
    manifest_path = root / "pki.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no pki.json in {root}; create it with 'federation certs'")
    data = json.loads(manifest_path.read_text())
    ca = CertificateAuthority(cert=Path(data["ca_cert"]), key=Path(data["ca_key"]))
    server = ServerCertificate(
        cert=Path(data["server_cert"]), key=Path(data["server_key"]), ca_cert=ca.cert
    )
    return PilotPKI(root=root, ca=ca, server=server)
