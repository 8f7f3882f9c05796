"""The development PKI: files, permissions, extensions, validity and chaining."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.security.pki import (
    create_ca,
    create_dev_pki,
    issue_certificate,
    load_certificate,
    load_private_key,
    write_private_key,
)
from tests.support.pki import CLIENT_SUBJECT, make_test_pki


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki")


def eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_files_written_and_keys_private(pki_dir: Path) -> None:
    pki = create_dev_pki(pki_dir)
    names = {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem",
             "client-key.pem"}
    assert {p.name for p in pki_dir.iterdir()} >= names
    for key in (pki.ca_key, pki.server_key, pki.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert isinstance(load_private_key(key), ec.EllipticCurvePrivateKey)
    for cert, key in ((pki.ca_cert, pki.ca_key), (pki.server_cert, pki.server_key),
                      (pki.client_cert, pki.client_key)):
        assert load_certificate(cert).public_key() == load_private_key(key).public_key()


def test_ca_is_a_self_signed_ca(pki_dir: Path) -> None:
    pki = create_dev_pki(pki_dir)
    ca = load_certificate(pki.ca_cert)
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_server_certificate(pki_dir: Path) -> None:
    pki = create_dev_pki(pki_dir, hostnames=("localhost", "gw.example.org"),
                         ip_addresses=("127.0.0.1", "::1", "192.0.2.7"), days=30)
    ca, server = load_certificate(pki.ca_cert), load_certificate(pki.server_cert)
    server.verify_directly_issued_by(ca)
    # The node certificate also authenticates the gateway's outbound calls.
    assert eku(server) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gw.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "192.0.2.7")]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = server.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)


def test_client_certificate(pki_dir: Path) -> None:
    pki = create_dev_pki(pki_dir)
    ca, client = load_certificate(pki.ca_cert), load_certificate(pki.client_cert)
    client.verify_directly_issued_by(ca)
    assert eku(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert client.subject.rfc4514_string() == CLIENT_SUBJECT
    assert client.not_valid_before_utc < dt.datetime.now(dt.UTC) < client.not_valid_after_utc


def test_each_run_makes_a_new_ca(tmp_path: Path) -> None:
    first = load_certificate(create_dev_pki(tmp_path / "a").ca_cert)
    second = load_certificate(create_dev_pki(tmp_path / "b").ca_cert)
    assert first.public_key() != second.public_key()
    assert first.serial_number != second.serial_number


def test_issue_expired_and_foreign_certificates(tmp_path: Path) -> None:
    test = make_test_pki(tmp_path)
    ca = load_certificate(test.dev.ca_cert)
    expired = load_certificate(test.expired_cert)
    expired.verify_directly_issued_by(ca)
    assert expired.not_valid_after_utc < dt.datetime.now(dt.UTC)
    other = load_certificate(test.other_client_cert)
    with pytest.raises(ValueError):
        other.verify_directly_issued_by(ca)
    other.verify_directly_issued_by(load_certificate(test.other_ca_cert))


def test_issue_certificate_arguments() -> None:
    ca, key = create_ca("test CA", days=1)
    with pytest.raises(ValueError, match="client and/or a server"):
        issue_certificate(ca, key, "nobody")
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError, match="not_after"):
        issue_certificate(ca, key, "x", client=True, not_before=now, not_after=now)
    both, _ = issue_certificate(ca, key, "both", client=True, server=True,
                                not_before=dt.datetime(2030, 1, 1),  # naive: UTC
                                not_after=dt.datetime(2030, 2, 1))
    assert eku(both) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert both.not_valid_before_utc == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def test_private_key_permissions_tightened_on_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("old")
    path.chmod(0o644)
    write_private_key(path, ec.generate_private_key(ec.SECP256R1()))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in path.read_bytes()
