"""Pilot public-key infrastructure for a small federation.

* a **pilot CA** (self-signed, kept by the coordinator) signs
* the **SuperLink server certificate**, whose subject alternative names cover
  the addresses the labs dial (loopback is always added), and
* each lab makes its own **SuperNode key pair** (``napari-feddp federation
  keys``, :func:`create_node_keys`): Flower 1.42 authenticates SuperNodes with
  NIST elliptic-curve keys in OpenSSH format. The private key never leaves the
  lab (``flower-supernode --auth-supernode-private-key``); the coordinator
  registers only its public key (``flwr supernode register``) and so can never
  impersonate a lab. The SuperLink runs with ``--enable-supernode-auth``
  (which requires TLS).

Private keys are written with mode ``0o600``. Nothing here talks to the network.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .processes import write_private

#: Always in the server certificate: the coordinator's own processes dial the SuperLink on loopback.
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
    """Paths of the SuperLink TLS certificate (signed by the CA) and its key."""

    cert: Path
    key: Path


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
        """The ``pki.json`` manifest (paths as strings)."""
        return {"ca_cert": str(self.ca.cert), "ca_key": str(self.ca.key),
                "server_cert": str(self.server.cert), "server_key": str(self.server.key)}  # fmt: skip


def validate_lab_name(lab: str) -> str:
    """Return ``lab`` if it is a safe file and node name (1-64 letters, digits, ``_.-``), else raise ValueError."""
    if not isinstance(lab, str) or not _LAB_NAME.match(lab):
        raise ValueError(f"invalid lab name {lab!r}: use 1-64 letters, digits, '_', '.', '-' "
                         "(starting with a letter or digit)")  # fmt: skip
    return lab


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _issue(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           signer: ec.EllipticCurvePrivateKey, days: int, extensions: list[tuple[x509.ExtensionType, bool]],
           cert_path: Path, key_path: Path) -> None:
    """Sign a certificate for ``key`` valid from 5 minutes ago for ``days``; write it and its key (0600)."""
    start = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start)
               .not_valid_after(start + _dt.timedelta(days=days)))  # fmt: skip
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    _write_public(cert_path, builder.sign(signer, hashes.SHA384()).public_bytes(serialization.Encoding.PEM))
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))  # fmt: skip


def create_ca(out_dir: str | os.PathLike, common_name: str = "napari-feddp pilot CA",
              days: int = 365) -> CertificateAuthority:
    """Create a self-signed pilot certificate authority: ``out_dir/ca.pem`` and ``ca.key``."""
    ca = CertificateAuthority(cert=Path(out_dir) / "ca.pem", key=Path(out_dir) / "ca.key")
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)  # fmt: skip
    _issue(name, key, name, key, days, [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True),
           (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)], ca.cert, ca.key)  # fmt: skip
    return ca


def create_server_cert(ca: CertificateAuthority, out_dir: str | os.PathLike, hosts: Sequence[str] = LOOPBACK_HOSTS,
                       days: int = 365) -> ServerCertificate:
    """Create the SuperLink TLS certificate signed by ``ca``: ``out_dir/server.pem`` and ``server.key``.

    ``hosts`` (IP addresses and DNS names) become the subject alternative
    names; TLS clients accept the certificate for these only.
    """
    if not hosts:
        raise ValueError("the server certificate needs at least one host")
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"CA key {ca.key} is not an elliptic-curve key")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = ServerCertificate(cert=Path(out_dir) / "server.pem", key=Path(out_dir) / "server.key")
    _issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ec.generate_private_key(_CURVE()),
           ca_cert.subject, ca_key, days, [
               (x509.BasicConstraints(ca=False, path_length=None), True),
               (x509.SubjectAlternativeName(names), False),
               (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
               (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
           ], server.cert, server.key)  # fmt: skip
    return server


def create_node_keys(out_dir: str | os.PathLike, lab: str, *, overwrite: bool = False) -> NodeKeyPair:
    """Create a lab's SuperNode authentication key pair (on the lab's machine).

    Parameters
    ----------
    out_dir : path
        Folder (mode 0700) for ``<lab>.key`` (OpenSSH private key, mode 0600)
        and ``<lab>.pub`` (OpenSSH public key, ``ecdsa-sha2-nistp384 ...``).
    lab : str
        Lab name (see :func:`validate_lab_name`); also the key comment.
    overwrite : bool
        Replace an existing key pair (otherwise FileExistsError: a new key
        means the coordinator must register the lab again).
    """
    validate_lab_name(lab)
    out = Path(out_dir)
    pair = NodeKeyPair(lab=lab, private_key=out / f"{lab}.key", public_key=out / f"{lab}.pub")
    if pair.private_key.exists() and not overwrite:
        raise FileExistsError(f"{pair.private_key} exists; keep it, or pass overwrite to make a new key pair")
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    key = ec.generate_private_key(_CURVE())
    write_private(pair.private_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()))  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(pair.public_key, public + f" {lab}\n".encode())
    return pair


def create_pilot_pki(out_dir: str | os.PathLike, hosts: Sequence[str] = (), days: int = 365) -> PilotPKI:
    """Create ``out_dir/ca/`` (CA), ``out_dir/superlink/`` (server certificate) and the manifest ``pki.json``.

    ``hosts``: the addresses labs dial, put in the server certificate with
    :data:`LOOPBACK_HOSTS`. Lab key pairs are not made here: each lab makes its
    own (:func:`create_node_keys`) and sends only the public key.
    """
    root = Path(out_dir).resolve()
    ca = create_ca(root / "ca", days=days)
    server = create_server_cert(ca, root / "superlink", hosts=list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS])), days=days)
    pki = PilotPKI(root=root, ca=ca, server=server)
    (root / "pki.json").write_text(json.dumps(pki.to_json(), indent=2) + "\n")
    return pki


def load_pilot_pki(out_dir: str | os.PathLike) -> PilotPKI:
    """Read the manifest ``pki.json`` written by :func:`create_pilot_pki`."""
    root = Path(out_dir)
    if not (root / "pki.json").is_file():
        raise FileNotFoundError(f"no pki.json in {root}; create it with 'federation certs'")
    data = json.loads((root / "pki.json").read_text())
    return PilotPKI(root=root, ca=CertificateAuthority(cert=Path(data["ca_cert"]), key=Path(data["ca_key"])),
                    server=ServerCertificate(cert=Path(data["server_cert"]), key=Path(data["server_key"])))
