"""Several gateway communities on loopback, for integration tests and benchmarks.

`community_config` writes a gateway configuration (gateway.demo.write_config) under another
homeCommunityId, with extra TOML appended; `node_certificate` issues the certificate an
initiating gateway presents to the communities it calls and `present_node_certificate` makes a
configuration use it; `shut_down` closes the clients and stops the servers of one run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from gateway.demo import HOME, write_config
from gateway.security.pki import (
    DevPki,
    issue_certificate,
    load_certificate,
    load_private_key,
    write_certificate,
    write_private_key,
)
from gateway.soap.client import SoapClient


class Stoppable(Protocol):
    def stop(self) -> object: ...


def node_certificate(pki: DevPki, directory: Path) -> tuple[Path, Path]:
    """A certificate for both ends of mutual TLS (serverAuth + clientAuth): an initiating
    gateway presents its node certificate to the communities it calls."""
    cert, key = issue_certificate(load_certificate(pki.ca_cert), load_private_key(pki.ca_key),
                                  "localhost", server=True, client=True,
                                  hostnames=("localhost",), ip_addresses=("127.0.0.1",))
    return (write_certificate(directory / "node.pem", cert),
            write_private_key(directory / "node-key.pem", key))


def community_config(workdir: Path, pki: DevPki, port: int, home: str,
                     extra: str = "", *, workers: int = 1) -> Path:
    """The demo configuration in `workdir` for community `home`, `extra` appended."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_config(workdir, pki, port, workers=workers)
    text = path.read_text().replace(f'"{HOME}"', f'"{home}"')
    assert f'"{home}"' in text
    path.write_text(text + extra)
    return path


def present_node_certificate(config: Path, pki: DevPki, node_cert: Path,
                             node_key: Path) -> None:
    """Make the gateway of `config` present the node certificate instead of pki's server one."""
    config.write_text(config.read_text()
                      .replace(f'certificate = "{pki.server_cert}"',
                               f'certificate = "{node_cert}"')
                      .replace(f'private_key = "{pki.server_key}"',
                               f'private_key = "{node_key}"'))


def shut_down(clients: Iterable[SoapClient], *servers: Stoppable) -> None:
    """Close every client, then stop the servers in the order given."""
    for c in clients:
        c.close()
    for s in servers:
        s.stop()
