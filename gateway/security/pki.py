"""A throw-away development PKI: one CA, a server certificate and a client certificate.

DEVELOPMENT AND TESTS ONLY - NEVER FOR PRODUCTION. The CA key is written next to the
certificates, unencrypted, and anybody who holds it can impersonate any node that trusts the
CA. On an IHE network, node certificates come from the affinity domain's own CA.

`create_dev_pki` writes, in one folder:

  ca.pem, ca-key.pem          a self-signed CA (EC P-256, SHA-256, pathlen 0)
  server.pem, server-key.pem  serverAuth, with DNS and IP subjectAltNames
  client.pem, client-key.pem  clientAuth, subject CN=xdsi-gateway dev client,O=...

Private keys are written with mode 0600. `issue_certificate` signs any further certificate with
a given CA (tests use it for an expired client certificate and for certificates of another CA).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "xdsi-gateway development"
CA_COMMON_NAME = "xdsi-gateway development CA (not for production)"
SERVER_COMMON_NAME = "xdsi-gateway dev server"
CLIENT_COMMON_NAME = "xdsi-gateway dev client"
CLOCK_SKEW = dt.timedelta(minutes=5)  # not_before is back-dated by this much

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class DevPki:
    """Where `create_dev_pki` wrote the PEM files."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def new_key() -> PrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str | None) -> x509.Name:
    attributes = []
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(common_name: str = CA_COMMON_NAME, *, organization: str | None = ORGANIZATION,
              days: int = 825, key: PrivateKey | None = None,
              ) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA certificate (pathlen 0: it signs end-entity certificates only)."""
    key = key or new_key()
    name = _name(common_name, organization)
    now = _utcnow()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    *,
    client: bool = False,
    server: bool = False,
    organization: str | None = ORGANIZATION,
    hostnames: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = 825,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """An end-entity certificate signed by `ca_cert`/`ca_key`; returns (certificate, key).

    `client` adds the clientAuth extended key usage, `server` serverAuth; `hostnames` and
    `ip_addresses` become subjectAltNames. Validity runs from `not_before` (default: now minus
    five minutes) to `not_after` (default: `days` after now); pass dates in the past to make an
    expired certificate. Datetimes without a time zone are taken as UTC.
    """
    if not (client or server):
        raise ValueError("issue_certificate: ask for a client and/or a server certificate")
    key = key or new_key()
    now = _utcnow()
    start = not_before or (now - CLOCK_SKEW)
    end = not_after or (now + dt.timedelta(days=days))
    start = start if start.tzinfo else start.replace(tzinfo=dt.UTC)
    end = end if end.tzinfo else end.replace(tzinfo=dt.UTC)
    if end <= start:
        raise ValueError("issue_certificate: not_after must be after not_before")
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + \
        ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organization))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_certificate(path: Path, *certificates: x509.Certificate) -> Path:
    """Write one or more certificates as PEM (a chain: leaf first)."""
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                              for c in certificates))
    return path


def write_private_key(path: Path, key: PrivateKey) -> Path:
    """Write an unencrypted PKCS#8 PEM private key readable by its owner only (0600)."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have existed with wider permissions
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def create_dev_pki(directory: Path, *, hostnames: Iterable[str] = ("localhost",),
                   ip_addresses: Iterable[str] = ("127.0.0.1", "::1"),
                   days: int = 825) -> DevPki:
    """Create a development CA plus server and client certificates in `directory`.

    DEVELOPMENT AND TESTS ONLY - never for production: the CA key is stored unencrypted
    beside the certificates. Existing files of the same names are overwritten.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = create_ca(days=days)
    # The gateway's node certificate: it serves (serverAuth) and it is the client certificate
    # of its outbound calls to other gateways and to the audit repository (clientAuth).
    server_cert, server_key = issue_certificate(
        ca_cert, ca_key, SERVER_COMMON_NAME, server=True, client=True,
        hostnames=tuple(hostnames),
        ip_addresses=tuple(ip_addresses), days=days)
    client_cert, client_key = issue_certificate(
        ca_cert, ca_key, CLIENT_COMMON_NAME, client=True, days=days)
    pki = DevPki(
        directory=directory,
        ca_cert=directory / "ca.pem", ca_key=directory / "ca-key.pem",
        server_cert=directory / "server.pem", server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem", client_key=directory / "client-key.pem")
    write_certificate(pki.ca_cert, ca_cert)
    write_private_key(pki.ca_key, ca_key)
    write_certificate(pki.server_cert, server_cert)
    write_private_key(pki.server_key, server_key)
    write_certificate(pki.client_cert, client_cert)
    write_private_key(pki.client_key, client_key)
    return pki


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_private_key(path: Path) -> PrivateKey:
    """An unencrypted PEM EC private key (as written by `write_private_key`)."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key
