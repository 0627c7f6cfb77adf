"""Pilot PKI: CA and SuperLink certificate for the coordinator; node keys each lab makes itself."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from napari_feddp.federation.certs import create_node_keys, create_pilot_pki, load_pilot_pki, validate_lab_name


def test_pilot_pki_layout_and_chain(tmp_path):
    pki = create_pilot_pki(tmp_path / "pki", hosts=["coordinator.example.org"])
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "coordinator.example.org" in san.get_values_for_type(x509.DNSName)
    for path in (pki.ca.key, pki.server.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_coordinators_pki_holds_no_lab_key(tmp_path):
    pki = create_pilot_pki(tmp_path / "pki")
    assert not list(pki.root.rglob("*.pub")) and "nodes" not in pki.to_json()
    keys = [p.name for p in pki.root.rglob("*.key")]
    assert sorted(keys) == ["ca.key", "server.key"]


def test_node_keys_are_what_flower_supernode_and_register_load(tmp_path):
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    pair = create_node_keys(tmp_path / "lab", "lab-a")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.private_key.parent.stat().st_mode) == 0o700
    private = load_ssh_private_key(pair.private_key.read_bytes(), None)  # as flower-supernode does
    public = load_ssh_public_key(pair.public_key.read_bytes())  # as flwr supernode register does
    assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
    assert private.public_key().public_numbers() == public.public_numbers()


def test_manifest_round_trip_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pki = create_pilot_pki("relative")
    loaded = load_pilot_pki(tmp_path / "relative")
    assert loaded.ca.cert == pki.ca.cert and loaded.ca.cert.is_absolute()


@pytest.mark.parametrize("name", ["", "../x", "a b", "-lead", "x" * 65])
def test_bad_lab_names_are_refused(name):
    with pytest.raises(ValueError):
        validate_lab_name(name)


def test_an_existing_lab_key_is_never_silently_replaced(tmp_path):
    first = create_node_keys(tmp_path, "a")
    before = first.private_key.read_bytes()
    with pytest.raises(FileExistsError, match="exists"):
        create_node_keys(tmp_path, "a")
    assert first.private_key.read_bytes() == before
    assert create_node_keys(tmp_path, "a", overwrite=True).private_key.read_bytes() != before
