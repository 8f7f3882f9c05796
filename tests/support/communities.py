"""Several gateway communities on loopback, for integration tests and benchmarks.

`community_config` writes a gateway configuration (gateway.demo.write_config) under another
homeCommunityId, with extra TOML appended (the dev PKI's node certificate serves and is also
the client certificate of an initiating gateway's outbound calls); `shut_down` closes the
clients and stops the servers of one run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from gateway.demo import HOME, write_config
from gateway.security.pki import (
    DevPki,
)
from gateway.soap.client import SoapClient


class Stoppable(Protocol):
    def stop(self) -> object: ...


def community_config(workdir: Path, pki: DevPki, port: int, home: str,
                     extra: str = "", *, workers: int = 1) -> Path:
    """The demo configuration in `workdir` for community `home`, `extra` appended."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_config(workdir, pki, port, workers=workers)
    text = path.read_text().replace(f'"{HOME}"', f'"{home}"')
    assert f'"{home}"' in text
    path.write_text(text + extra)
    return path


def shut_down(clients: Iterable[SoapClient], *servers: Stoppable) -> None:
    """Close every client, then stop the servers in the order given."""
    for c in clients:
        c.close()
    for s in servers:
        s.stop()
