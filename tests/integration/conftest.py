"""A real gateway for the integration tests: `xdsi-gateway serve` in a child process, HTTPS
with mutual TLS on loopback, a fresh development PKI, registry and repository."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.demo import free_port, start_gateway, write_config
from gateway.security.pki import DevPki, create_dev_pki
from gateway.soap.client import SoapClient

MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024


@dataclass
class LiveGateway:
    base_url: str
    pki: DevPki
    config: Path
    workdir: Path

    def client(self) -> SoapClient:
        return SoapClient(self.base_url, ca_bundle=self.pki.ca_cert,
                          certificate=self.pki.client_cert, private_key=self.pki.client_key)


@pytest.fixture(scope="session")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    workdir = tmp_path_factory.mktemp("gateway")
    pki = create_dev_pki(workdir / "pki")
    port = free_port()
    config = write_config(workdir, pki, port, max_request_bytes=MAX_REQUEST_BYTES,
                          max_envelope_bytes=MAX_ENVELOPE_BYTES)
    running = start_gateway(config, pki, port)
    try:
        yield LiveGateway(running.base_url, pki, config, workdir)
    finally:
        running.stop()
