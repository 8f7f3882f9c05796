"""Test PKI: the development PKI plus the certificates a server must refuse.

`make_test_pki(directory)` writes the development PKI (gateway.security.pki.create_dev_pki)
and, beside it, a client certificate that has expired (same CA), and a client certificate
issued by another CA that the server does not trust. Use it from a module- or session-scoped
fixture with `tmp_path_factory`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from gateway.security.pki import (
    CLIENT_COMMON_NAME,
    DevPki,
    create_ca,
    create_dev_pki,
    issue_certificate,
    load_certificate,
    load_private_key,
    write_certificate,
    write_private_key,
)

CLIENT_SUBJECT = "CN=xdsi-gateway dev client,O=xdsi-gateway development"


@dataclass(frozen=True)
class TestPki:
    dev: DevPki
    expired_cert: Path
    expired_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path

    __test__ = False  # not a pytest test class

    @property
    def client(self) -> tuple[str, str]:
        """(certificate, key) for requests' `cert=`."""
        return str(self.dev.client_cert), str(self.dev.client_key)

    @property
    def expired(self) -> tuple[str, str]:
        return str(self.expired_cert), str(self.expired_key)

    @property
    def other(self) -> tuple[str, str]:
        return str(self.other_client_cert), str(self.other_client_key)


def make_test_pki(directory: Path) -> TestPki:
    dev = create_dev_pki(directory)
    ca_cert, ca_key = load_certificate(dev.ca_cert), load_private_key(dev.ca_key)
    now = dt.datetime.now(dt.UTC)
    expired, expired_key = issue_certificate(
        ca_cert, ca_key, CLIENT_COMMON_NAME, client=True,
        not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    other_ca, other_ca_key = create_ca("another CA, not trusted by the gateway")
    other, other_key = issue_certificate(other_ca, other_ca_key, CLIENT_COMMON_NAME, client=True)
    return TestPki(
        dev=dev,
        expired_cert=write_certificate(directory / "expired-client.pem", expired),
        expired_key=write_private_key(directory / "expired-client-key.pem", expired_key),
        other_ca_cert=write_certificate(directory / "other-ca.pem", other_ca),
        other_client_cert=write_certificate(directory / "other-client.pem", other),
        other_client_key=write_private_key(directory / "other-client-key.pem", other_key),
    )
